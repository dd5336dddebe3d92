//! `arca.v1.QuorumService` over the dual-control services ([`Sealing`], [`Ceremony`],
//! [`Approvals`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::call::{accept, reply};
use super::convert::{kit_to_pb, request_to_pb, seal_to_pb};
use super::pb;
use crate::service::{Approvals, Ceremony, Sealing};

/// The gRPC face of dual control.
pub struct QuorumApi {
    sealing: Arc<Sealing>,
    ceremony: Arc<Ceremony>,
    approvals: Arc<Approvals>,
}

impl QuorumApi {
    /// Over the dual-control services.
    pub fn new(sealing: Arc<Sealing>, ceremony: Arc<Ceremony>, approvals: Arc<Approvals>) -> Self {
        QuorumApi {
            sealing,
            ceremony,
            approvals,
        }
    }
}

#[tonic::async_trait]
impl pb::quorum_service_server::QuorumService for QuorumApi {
    async fn init(
        &self,
        req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let (c, mut r) = accept(req)?;
        let so_pin = Zeroizing::new(std::mem::take(&mut r.so_pin));
        let recipients = r.age_recipients.into_iter().collect();
        let out = self
            .ceremony
            .init(&c, r.threshold, &r.custodians, so_pin, &recipients)
            .await;
        reply(&c, out, |kits| pb::InitResponse {
            custodians: kits.into_iter().map(kit_to_pb).collect(),
            threshold: r.threshold,
        })
    }

    async fn unseal(
        &self,
        req: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let (c, r) = accept(req)?;
        let share = Zeroizing::new(r.share);
        let totp = Zeroizing::new(r.totp);
        let out = self.sealing.unseal(&c, &share, &totp).await;
        reply(&c, out, seal_to_pb)
    }

    async fn seal(
        &self,
        req: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let (c, _) = accept(req)?;
        let out = self.sealing.seal(&c).await;
        reply(&c, out, seal_to_pb)
    }

    async fn seal_status(
        &self,
        req: Request<pb::SealStatusRequest>,
    ) -> Result<Response<pb::SealStatusResponse>, Status> {
        let (c, _) = accept(req)?;
        let out = self.sealing.status(&c).await;
        reply(&c, out, seal_to_pb)
    }

    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self
            .approvals
            .list_requests(&c, &r.state, r.page_size, &r.page_token)
            .await;
        reply(&c, out, |(recs, next)| pb::ListRequestsResponse {
            requests: recs.iter().map(request_to_pb).collect(),
            next_page_token: next,
        })
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let (c, r) = accept(req)?;
        let out = self.approvals.get_request(&c, &r.id).await;
        reply(&c, out, |r| request_to_pb(&r))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let (c, mut r) = accept(req)?;
        let share = Zeroizing::new(std::mem::take(&mut r.share));
        let totp = Zeroizing::new(std::mem::take(&mut r.totp));
        let out = self
            .approvals
            .approve(&c, &r.id, &r.digest, &share, &totp)
            .await;
        reply(&c, out, |out| {
            let mut msg = request_to_pb(&out.request);
            msg.new_kits = out.new_kits.into_iter().map(kit_to_pb).collect();
            msg
        })
    }

    async fn rekey(
        &self,
        req: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let (c, r) = accept(req)?;
        let recipients = r.age_recipients.into_iter().collect();
        let out = self
            .ceremony
            .request_rekey(&c, r.threshold, &r.custodians, r.shares, &recipients)
            .await;
        reply(&c, out, |r| request_to_pb(&r))
    }

    async fn reject(
        &self,
        req: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let (c, r) = accept(req)?;
        let out = self.approvals.reject(&c, &r.id, &r.reason).await;
        reply(&c, out, |r| request_to_pb(&r))
    }
}
