//! `arca.v1.AccessService` over the access services ([`Tokens`], [`Grants`],
//! [`Policies`], [`Totp`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::call::{accept, reply};
use super::convert::{
    change_to_pb, request_to_pb, review_to_pb, seconds_to_ms_saturating, token_to_pb,
};
use super::pb;
use crate::clock::rfc3339;
use crate::service::{Grants, NewToken, Policies, TokenOutcome, Tokens, Totp};

/// The gRPC face of access administration.
pub struct AccessApi {
    tokens: Arc<Tokens>,
    grants: Arc<Grants>,
    policies: Arc<Policies>,
    totp: Arc<Totp>,
}

impl AccessApi {
    /// Over the access services.
    pub fn new(
        tokens: Arc<Tokens>,
        grants: Arc<Grants>,
        policies: Arc<Policies>,
        totp: Arc<Totp>,
    ) -> Self {
        AccessApi {
            tokens,
            grants,
            policies,
            totp,
        }
    }
}

#[tonic::async_trait]
impl pb::access_service_server::AccessService for AccessApi {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (c, r) = accept(req)?;
        let new = NewToken {
            principal: r.principal,
            roles: r.roles,
            key_globs: r.key_globs,
            ttl_ms: seconds_to_ms_saturating(r.ttl_seconds),
            cidrs: r.cidrs,
            bound_principal: (!r.bound_principal.is_empty()).then_some(r.bound_principal),
            description: r.description,
            token_sha256: (!r.token_sha256.is_empty()).then_some(r.token_sha256),
        };
        let out = self.tokens.create_token(&c, new).await;
        reply(&c, out, |outcome| match outcome {
            TokenOutcome::Done(record, token) => pb::CreateTokenResponse {
                id: record.id.clone(),
                token: token.map(|t| t.expose().to_string()).unwrap_or_default(),
                expires_at: record.expires_at.map(rfc3339).unwrap_or_default(),
                approval_request: None,
            },
            TokenOutcome::Pending(req) => pb::CreateTokenResponse {
                approval_request: Some(request_to_pb(&req)),
                ..Default::default()
            },
        })
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.tokens.revoke_token(&c, &r.id).await;
        reply(&c, out, |()| pb::RevokeTokenResponse {})
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let (c, _) = accept(req)?;
        let out = self.tokens.list_tokens(&c).await;
        reply(&c, out, |tokens| pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_to_pb).collect(),
        })
    }

    async fn elevate(
        &self,
        req: Request<pb::ElevateRequest>,
    ) -> Result<Response<pb::AccessChangeResponse>, Status> {
        let (c, r) = accept(req)?;
        let ms = seconds_to_ms_saturating(r.duration_seconds);
        let out = self.grants.elevate(&c, &r.role, ms, &r.reason).await;
        reply(&c, out, change_to_pb)
    }

    async fn break_glass(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassResponse>, Status> {
        let (c, r) = accept(req)?;
        let ms = seconds_to_ms_saturating(r.duration_seconds);
        let out = self.grants.break_glass(&c, &r.reason, ms).await;
        reply(&c, out, |(grant, review)| pb::BreakGlassResponse {
            grant_id: grant.id,
            role: grant.role,
            expires_at: rfc3339(grant.expires_at),
            review: Some(review_to_pb(review)),
        })
    }

    async fn enroll_totp(
        &self,
        req: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let (c, _) = accept(req)?;
        let out = self.totp.enroll(&c).await;
        reply(&c, out, |enrolled| pb::EnrollTotpResponse {
            totp_uri: enrolled.uri.to_string(),
        })
    }

    async fn list_reviews(
        &self,
        req: Request<pb::ListReviewsRequest>,
    ) -> Result<Response<pb::ListReviewsResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.grants.list_reviews(&c, r.open_only).await;
        reply(&c, out, |reviews| pb::ListReviewsResponse {
            reviews: reviews.into_iter().map(review_to_pb).collect(),
        })
    }

    async fn close_review(
        &self,
        req: Request<pb::CloseReviewRequest>,
    ) -> Result<Response<pb::Review>, Status> {
        let (c, r) = accept(req)?;
        let out = self.grants.close_review(&c, &r.id, &r.note).await;
        reply(&c, out, review_to_pb)
    }

    async fn update_policy(
        &self,
        req: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::AccessChangeResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.policies.update_policy(&c, &r.policy).await;
        reply(&c, out, change_to_pb)
    }
}
