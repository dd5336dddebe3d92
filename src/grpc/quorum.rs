//! `arca.v1.QuorumService`: proto ↔ domain conversion around the seal use cases.

use std::sync::Arc;

use arca_hsm::AuthPin;
use tonic::{Request, Response, Status};

use super::pb;
use super::status::to_status;
use crate::service::{Caller, KeyService, SealStatus};

/// Smallest K outside dev mode (DESIGN §2: 2 ≤ K).
const MIN_THRESHOLD: u8 = 2;

/// The gRPC face of dual control.
pub struct QuorumApi {
    svc: Arc<KeyService>,
}

impl QuorumApi {
    /// Wraps the service.
    pub fn new(svc: Arc<KeyService>) -> Self {
        QuorumApi { svc }
    }
}

fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("unauthenticated"))
}

fn status_to_pb(s: SealStatus) -> pb::SealStatusResponse {
    pb::SealStatusResponse {
        initialized: s.initialized,
        sealed: s.sealed,
        threshold: s.threshold,
        shares: s.shares,
        progress: s.progress,
    }
}

#[tonic::async_trait]
impl pb::quorum_service_server::QuorumService for QuorumApi {
    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let c = caller(&req)?;
        let mut r = req.into_inner();
        let threshold = u8::try_from(r.threshold).map_err(|_| {
            to_status(
                crate::service::ServiceError::InvalidArgument("threshold too large"),
                &c.request_id,
            )
        })?;
        let so_pin = AuthPin::from(std::mem::take(&mut r.so_pin));
        let kits = self
            .svc
            .init_quorum(&c, threshold, &r.custodians, so_pin, MIN_THRESHOLD)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::InitResponse {
            custodians: kits
                .into_iter()
                .map(|k| pb::CustodianKit {
                    custodian: k.name,
                    share: k.share.to_string(),
                    token: k.token.expose().to_string(),
                    totp_uri: k.totp_uri.to_string(),
                })
                .collect(),
            threshold: u32::from(threshold),
        }))
    }

    async fn unseal(
        &self,
        req: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let share = zeroize::Zeroizing::new(r.share);
        let s = self
            .svc
            .unseal(&c, &share, &r.totp)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(status_to_pb(s)))
    }

    async fn seal(
        &self,
        req: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let c = caller(&req)?;
        let s = self
            .svc
            .seal(&c)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(status_to_pb(s)))
    }

    async fn seal_status(
        &self,
        req: Request<pb::SealStatusRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let c = caller(&req)?;
        let s = self
            .svc
            .seal_status()
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(status_to_pb(s)))
    }
}
