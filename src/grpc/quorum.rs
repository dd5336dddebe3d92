//! `arca.v1.QuorumService`: proto ↔ domain conversion around the seal and approval
//! use cases.

use std::collections::HashMap;
use std::sync::Arc;

use arca_hsm::AuthPin;
use tonic::{Request, Response, Status};

use super::pb;
use super::status::{caller, to_status};
use crate::clock::rfc3339;
use crate::quorum::age;
use crate::service::{
    ApprovalRecord, CustodianKit, KeyService, RequestResult, SealStatus, ServiceError,
};

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

fn status_to_pb(s: SealStatus) -> pb::SealStatusResponse {
    pb::SealStatusResponse {
        initialized: s.initialized,
        sealed: s.sealed,
        threshold: s.threshold,
        shares: s.shares,
        progress: s.progress,
    }
}

/// An approval request on the wire (no share is part of a record).
pub(super) fn request_to_pb(r: &ApprovalRecord) -> pb::ApprovalRequest {
    pb::ApprovalRequest {
        id: r.id.clone(),
        operation: r.operation.as_str().to_string(),
        parameters: r.parameters.clone().into_iter().collect(),
        digest: r.digest.clone(),
        requester: r.requester.clone(),
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::Approval {
                custodian: a.custodian.clone(),
                approved_at: rfc3339(a.approved_at),
            })
            .collect(),
        threshold: u32::from(r.threshold),
        state: r.state.as_str().to_string(),
        expires_at: rfc3339(r.expires_at),
        result: r.result.as_ref().and_then(|res| match res {
            RequestResult::Key(k) => Some(super::keys::key_to_pb(k)),
            RequestResult::Rekey { .. } | RequestResult::Note(_) => None,
        }),
        rejected_by: r.decided_by.clone().unwrap_or_default(),
        reason: r.reason.clone().unwrap_or_default(),
        created_at: rfc3339(r.created_at),
        decided_at: r.decided_at.map(rfc3339).unwrap_or_default(),
        new_kits: Vec::new(),
        outcome: r
            .result
            .as_ref()
            .map(|res| res.summary())
            .unwrap_or_default(),
    }
}

fn kit_to_pb(k: CustodianKit) -> pb::CustodianKit {
    pb::CustodianKit {
        custodian: k.name,
        share: k.share.to_string(),
        token: k.token.expose().to_string(),
        totp_uri: k.totp_uri.to_string(),
    }
}

/// Parses `custodian → age1…`; every name must be one of the ceremony's custodians.
fn age_recipients(
    map: &HashMap<String, String>,
    custodians: &[String],
) -> Result<HashMap<String, [u8; 32]>, ServiceError> {
    map.iter()
        .map(|(name, r)| {
            if !custodians.iter().any(|c| c == name) {
                return Err(ServiceError::InvalidArgument(
                    "age recipient for an unknown custodian",
                ));
            }
            let key = age::parse_recipient(r)
                .map_err(|_| ServiceError::InvalidArgument("invalid age recipient"))?;
            Ok((name.clone(), key))
        })
        .collect()
}

/// Replaces the share of a custodian that has an age recipient by its armored
/// encryption to that recipient.
fn encrypt_share(
    mut k: CustodianKit,
    recipients: &HashMap<String, [u8; 32]>,
) -> Result<CustodianKit, ServiceError> {
    if let Some(r) = recipients.get(&k.name) {
        let armored = age::encrypt_armored(r, k.share.as_bytes())
            .map_err(|e| ServiceError::Internal(Box::new(e)))?;
        k.share = zeroize::Zeroizing::new(armored);
    }
    Ok(k)
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
        // Validated before anything is initialised: a bad recipient must not cost a
        // ceremony whose kits could then not be handed out as planned.
        let recipients = age_recipients(&r.age_recipients, &r.custodians)
            .map_err(|e| to_status(e, &c.request_id))?;
        let so_pin = AuthPin::from(std::mem::take(&mut r.so_pin));
        let kits = self
            .svc
            .init_quorum(&c, threshold, &r.custodians, so_pin, MIN_THRESHOLD)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        let kits = kits
            .into_iter()
            .map(|k| encrypt_share(k, &recipients))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::InitResponse {
            custodians: kits.into_iter().map(kit_to_pb).collect(),
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

    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let (recs, next) = self
            .svc
            .list_requests(&c, &r.state, r.page_size, &r.page_token)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::ListRequestsResponse {
            requests: recs.iter().map(request_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let c = caller(&req)?;
        let r = self
            .svc
            .get_request(&c, &req.get_ref().id)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(request_to_pb(&r)))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let c = caller(&req)?;
        let mut r = req.into_inner();
        let share = zeroize::Zeroizing::new(std::mem::take(&mut r.share));
        let totp = zeroize::Zeroizing::new(std::mem::take(&mut r.totp));
        let out = self
            .svc
            .approve(&c, &r.id, &r.digest, &share, &totp)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        let mut msg = request_to_pb(&out.request);
        msg.new_kits = out.new_kits.into_iter().map(kit_to_pb).collect();
        Ok(Response::new(msg))
    }

    async fn rekey(
        &self,
        req: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let threshold = u8::try_from(r.threshold).map_err(|_| {
            to_status(
                crate::service::ServiceError::InvalidArgument("threshold too large"),
                &c.request_id,
            )
        })?;
        let shares = (r.shares != 0).then_some(r.shares);
        let rec = self
            .svc
            .request_rekey(
                &c,
                threshold,
                &r.custodians,
                shares,
                MIN_THRESHOLD,
                &r.age_recipients.clone().into_iter().collect(),
            )
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(request_to_pb(&rec)))
    }

    async fn reject(
        &self,
        req: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let rec = self
            .svc
            .reject(&c, &r.id, &r.reason)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(request_to_pb(&rec)))
    }
}
