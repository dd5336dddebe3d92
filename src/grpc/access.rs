//! `arca.v1.AccessService`: proto ↔ domain conversion around token administration,
//! elevation, break-glass, TOTP enrolment, reviews and policy changes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use super::status::{caller, to_status};
use crate::clock::rfc3339;
use crate::service::ReviewRecord;
use crate::service::{AccessOutcome, KeyService, NewToken};

/// The gRPC face of token administration.
pub struct AccessApi {
    svc: Arc<KeyService>,
}

impl AccessApi {
    /// Wraps the service.
    pub fn new(svc: Arc<KeyService>) -> Self {
        AccessApi { svc }
    }
}

#[tonic::async_trait]
impl pb::access_service_server::AccessService for AccessApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let ttl_ms = i64::try_from(r.ttl_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let (id, token) = self
            .svc
            .create_token(
                &c,
                NewToken {
                    principal: r.principal,
                    roles: r.roles,
                    key_globs: r.key_globs,
                    ttl_ms,
                    cidrs: r.cidrs,
                    bound_principal: (!r.bound_principal.is_empty()).then_some(r.bound_principal),
                    description: r.description,
                },
            )
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        let listed = self
            .svc
            .list_tokens(&c)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        let expires_at = listed
            .iter()
            .find(|t| t.record.id == id)
            .and_then(|t| t.record.expires_at)
            .map(rfc3339)
            .unwrap_or_default();
        Ok(Response::new(pb::CreateTokenResponse {
            id,
            token: token.expose().to_string(),
            expires_at,
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let c = caller(&req)?;
        self.svc
            .revoke_token(&c, &req.get_ref().id)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let c = caller(&req)?;
        let tokens = self
            .svc
            .list_tokens(&c)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens
                .into_iter()
                .map(|t| {
                    let r = t.record;
                    pb::TokenInfo {
                        id: r.id,
                        principal: r.principal,
                        roles: r.roles,
                        key_globs: r.key_globs,
                        cidrs: r.cidrs,
                        bound_principal: r.bound_principal.unwrap_or_default(),
                        created_at: rfc3339(r.created_at),
                        expires_at: r.expires_at.map(rfc3339).unwrap_or_default(),
                        revoked_at: r.revoked_at.map(rfc3339).unwrap_or_default(),
                        description: r.description,
                    }
                })
                .collect(),
        }))
    }

    async fn elevate(
        &self,
        req: Request<pb::ElevateRequest>,
    ) -> Result<Response<pb::AccessChangeResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let ms = i64::try_from(r.duration_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let out = self
            .svc
            .elevate(&c, &r.role, ms, &r.reason)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(change_to_pb(out)))
    }

    async fn break_glass(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let ms = i64::try_from(r.duration_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let (grant, review) = self
            .svc
            .break_glass(&c, &r.reason, ms)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::BreakGlassResponse {
            grant_id: grant.id,
            role: grant.role,
            expires_at: rfc3339(grant.expires_at),
            review: Some(review_to_pb(review)),
        }))
    }

    async fn enroll_totp(
        &self,
        req: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let c = caller(&req)?;
        let enrolled = self
            .svc
            .enroll_totp(&c)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::EnrollTotpResponse {
            totp_uri: enrolled.uri.to_string(),
        }))
    }

    async fn list_reviews(
        &self,
        req: Request<pb::ListReviewsRequest>,
    ) -> Result<Response<pb::ListReviewsResponse>, Status> {
        let c = caller(&req)?;
        let reviews = self
            .svc
            .list_reviews(&c, req.get_ref().open_only)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::ListReviewsResponse {
            reviews: reviews.into_iter().map(review_to_pb).collect(),
        }))
    }

    async fn close_review(
        &self,
        req: Request<pb::CloseReviewRequest>,
    ) -> Result<Response<pb::Review>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let review = self
            .svc
            .close_review(&c, &r.id, &r.note)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(review_to_pb(review)))
    }

    async fn update_policy(
        &self,
        req: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::AccessChangeResponse>, Status> {
        let c = caller(&req)?;
        let out = self
            .svc
            .update_policy(&c, &req.get_ref().policy)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(change_to_pb(out)))
    }
}

fn change_to_pb(out: AccessOutcome) -> pb::AccessChangeResponse {
    match out {
        AccessOutcome::Done(outcome) => pb::AccessChangeResponse {
            outcome,
            approval_request: None,
        },
        AccessOutcome::Pending(r) => pb::AccessChangeResponse {
            outcome: String::new(),
            approval_request: Some(super::quorum::request_to_pb(&r)),
        },
    }
}

fn review_to_pb(r: ReviewRecord) -> pb::Review {
    pb::Review {
        id: r.id,
        grant_id: r.grant_id,
        principal: r.principal,
        reason: r.reason,
        opened_at: rfc3339(r.opened_at),
        closed_at: r.closed_at.map(rfc3339).unwrap_or_default(),
        closed_by: r.closed_by.unwrap_or_default(),
        note: r.note.unwrap_or_default(),
    }
}
