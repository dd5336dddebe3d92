//! `arca.v1.AccessService`: proto ↔ domain conversion around token administration.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb;
use super::status::to_status;
use crate::clock::rfc3339;
use crate::service::{Caller, KeyService, NewToken};

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

fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("unauthenticated"))
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
}
