//! Approval requests of quorum operations (DESIGN §2 "Quorum operations"): list, show,
//! approve, reject. The K-th approval runs the operation (`execute.rs`).
//!
//! Invariants:
//! - Only a custodian of the request's quorum generation approves, once per person, never
//!   the requester through any principal of theirs (people from `[people]`, ADR 15: the
//!   approver's person is compared with the requester's person as recorded at the request
//!   and by the policy in force at approval), only with the request's digest, and only while the request is pending and
//!   unexpired. Each share passes the same checks as at unseal (commitment, fresh TOTP
//!   step, failure counting and lock-out) before it is stored — and it is stored only
//!   sealed under `arca:meta`, with AAD binding the request and the custodian.
//! - A caller whose credential is limited to some keys sees no request about others.
//! - No share, TOTP code or quorum secret reaches a log, an error or the database in clear.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod execute;

pub use execute::REKEY_NEEDS_LIVE_APPROVER;

use std::sync::Arc;

use zeroize::Zeroizing;

use super::ceremony::Ceremony;
use super::custodians::{custodian_name, CustodianKit, Custodians};
use crate::authz::CUSTODIAN_PREFIX;
use crate::quorum::approvals::{self, Approver, Refusal, RequestState, PARAM_KEY};
use crate::service::access::{act, Act, Authorized, Guard, Scope};
use crate::service::admin::{Grants, Policies, Tokens};
use crate::service::context::{Context, Permit};
use crate::service::error::{Conflict, Rejection, Result, ServiceError};
use crate::service::gate::request_conflict;
use crate::service::lifecycle::Lifecycle;
use crate::service::rotation::Rotation;
use crate::service::Caller;
use crate::store::{ApprovalRecord, StoreError};

/// Largest page of `ListRequests`.
pub const MAX_REQUEST_PAGE: u32 = 100;
/// Longest rejection reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// What an approval answers: the request as it is after, and — only from the approval
/// that executed a rekey — the new custodians' kits, which exist nowhere else.
pub struct ApproveOutcome {
    /// The request.
    pub request: ApprovalRecord,
    /// The new kits of an executed rekey (empty otherwise). Shown once; never stored.
    pub new_kits: Vec<CustodianKit>,
}

impl ApproveOutcome {
    fn plain(request: ApprovalRecord) -> Self {
        ApproveOutcome {
            request,
            new_kits: Vec::new(),
        }
    }
}

fn refusal(r: Refusal) -> ServiceError {
    match r {
        Refusal::NotPending(s) => ServiceError::Conflict(Conflict::Request(s)),
        Refusal::Expired => ServiceError::Conflict(Conflict::Request(RequestState::Expired)),
        Refusal::Requester => ServiceError::Rejected(Rejection::Requester),
        Refusal::AlreadyApproved => ServiceError::Rejected(Rejection::AlreadyApproved),
        Refusal::DigestMismatch => ServiceError::InvalidArgument(
            "the digest does not match this request: review it again with `arca request show`",
        ),
    }
}

/// Whether the holder of `proof` may see a request: one about a key only if its
/// credential covers the key and its policy allows `A` on it (a rule with key globs for
/// `ListRequests`/`GetRequest` limits what it shows).
fn visible<A: Act>(proof: &Authorized<A>, rec: &ApprovalRecord) -> bool {
    rec.parameters
        .get(PARAM_KEY)
        .is_none_or(|k| Guard::may_see(proof, k))
}

/// The record with its state as of `now` (a pending request past its expiry without K
/// approvals shows `EXPIRED`).
fn effective(mut rec: ApprovalRecord, now: i64) -> ApprovalRecord {
    rec.state = rec.standing().effective_state(now);
    rec
}

fn encode_request_token(created_at: i64, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
}

fn decode_request_token(t: &str) -> Result<(i64, String)> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let (at, id) = s.split_once(':')?;
            Some((at.parse().ok()?, id.to_string()))
        })
        .ok_or(ServiceError::InvalidArgument("invalid page token"))
}

/// The approval service, and the services whose operations it runs once approved.
pub struct Approvals {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    custodians: Arc<Custodians>,
    ceremony: Arc<Ceremony>,
    rotation: Arc<Rotation>,
    lifecycle: Arc<Lifecycle>,
    grants: Arc<Grants>,
    policies: Arc<Policies>,
    tokens: Arc<Tokens>,
}

/// The services an approved request may run.
pub struct Executors {
    /// `Rekey`.
    pub ceremony: Arc<Ceremony>,
    /// `RotateKey`.
    pub rotation: Arc<Rotation>,
    /// Disable, enable, retire, cancel, retention.
    pub lifecycle: Arc<Lifecycle>,
    /// `Elevate`.
    pub grants: Arc<Grants>,
    /// `UpdatePolicy`.
    pub policies: Arc<Policies>,
    /// `CreateToken`.
    pub tokens: Arc<Tokens>,
}

impl Approvals {
    /// The approval service over `ctx`.
    pub fn new(
        ctx: Arc<Context>,
        guard: Arc<Guard>,
        custodians: Arc<Custodians>,
        run: Executors,
    ) -> Self {
        Approvals {
            ctx,
            guard,
            custodians,
            ceremony: run.ceremony,
            rotation: run.rotation,
            lifecycle: run.lifecycle,
            grants: run.grants,
            policies: run.policies,
            tokens: run.tokens,
        }
    }

    /// Refuses a request whose stored operation and parameters are not what its digest
    /// says (changed in the database after custodians were shown it): it is failed, an
    /// ERROR is logged and the audit trail records it.
    async fn check_bound(&self, permit: &impl Permit, req: &ApprovalRecord) -> Result<()> {
        if approvals::binds(req.operation, &req.parameters, &req.digest) {
            return Ok(());
        }
        tracing::error!(
            alert = "approval-request-altered",
            request = %req.id,
            operation = %req.operation,
            "ALERT: a stored approval request does not match its digest; it is failed"
        );
        self.ctx.record_job(
            "approval.request_altered",
            false,
            None,
            &format!("request={}", req.id),
        );
        let reason = Conflict::RequestAltered.to_string();
        let now = self.ctx.clock.now_ms();
        match self
            .ctx
            .db(permit)
            .fail_request(&req.id, &reason, now)
            .await
        {
            Ok(_) | Err(StoreError::Conflict(_)) => {}
            Err(e) => {
                tracing::warn!(request = %req.id, error = %e, "could not fail an altered request")
            }
        }
        Err(ServiceError::Conflict(Conflict::RequestAltered))
    }

    async fn load(&self, permit: &impl Permit, id: &str) -> Result<ApprovalRecord> {
        self.ctx
            .db(permit)
            .request(id)
            .await
            .map_err(request_conflict)
    }

    /// `ListRequests`: a page of approval requests, newest first, optionally in one state.
    pub async fn list_requests(
        &self,
        caller: &Caller,
        state: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ApprovalRecord>, String)> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::ListRequests>(caller, Scope::none())
            .await?;
        let state = match state.trim() {
            "" => None,
            s => Some(
                RequestState::parse(s)
                    .ok_or(ServiceError::InvalidArgument("unknown request state"))?,
            ),
        };
        let size = match page_size {
            0 => 50,
            n => n.min(MAX_REQUEST_PAGE),
        };
        let after = match page_token {
            "" => None,
            t => Some(decode_request_token(t)?),
        };
        let now = self.ctx.clock.now_ms();
        let db = self.ctx.db(&proof);
        // So that a PENDING filter does not show requests whose time ran out.
        db.expire_requests(now).await?;
        let recs = db
            .list_requests(
                state,
                after.as_ref().map(|(at, id)| (*at, id.as_str())),
                size,
            )
            .await?;
        let next = match recs.last() {
            Some(last) if recs.len() == size as usize => {
                encode_request_token(last.created_at, &last.id)
            }
            _ => String::new(),
        };
        Ok((
            recs.into_iter()
                .filter(|r| visible(&proof, r))
                .map(|r| effective(r, now))
                .collect(),
            next,
        ))
    }

    /// `GetRequest`.
    pub async fn get_request(&self, caller: &Caller, id: &str) -> Result<ApprovalRecord> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::GetRequest>(caller, Scope::none())
            .await?;
        let rec = self.load(&proof, id).await?;
        if !visible(&proof, &rec) {
            return Err(ServiceError::PermissionDenied);
        }
        Ok(effective(rec, self.ctx.clock.now_ms()))
    }

    /// `Approve`: a custodian approves request `id`, having reviewed `digest`, with their
    /// share and a TOTP code. The K-th approval runs the operation; the answer is the
    /// request as it is after, and the new kits if it executed a rekey.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        digest: &str,
        share_text: &str,
        totp_code: &str,
    ) -> Result<ApproveOutcome> {
        let engine = self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::Approve>(caller, Scope::none())
            .await?;
        let name = custodian_name(caller)
            .ok_or(ServiceError::Rejected(Rejection::NotCustodian))?
            .to_string();
        let req = self.load(&proof, id).await?;
        self.check_bound(&proof, &req).await?;
        // People by the policy in force at this approval (the one `proof` was decided
        // under); the person recorded at the request is on `req.standing()`.
        let person = proof.person();
        let requester_person = proof.person_of(&req.requester);
        let already = req.approvals.iter().any(|a| {
            a.custodian == name
                || proof.person_of(&format!("{CUSTODIAN_PREFIX}{}", a.custodian)) == person
        });
        let now = self.ctx.clock.now_ms();
        let checked = approvals::check_approval(
            &req.standing(),
            &Approver {
                principal: &caller.principal.name,
                person: &person,
                requester_person: &requester_person,
                already,
            },
            digest,
            now,
        );
        match checked {
            Ok(()) => {}
            // K approvals are in, but the operation did not run (an outage interrupted
            // it): run it now. The shares are in the store; nothing is taken from the
            // caller. Only a custodian of the current generation may set it going.
            Err(Refusal::NotPending(RequestState::Pending)) => {
                let cfg = self.custodians.config(&proof).await?;
                if !self
                    .custodians
                    .is_custodian(&proof, &name, cfg.generation)
                    .await?
                {
                    return Err(ServiceError::PermissionDenied);
                }
                return self.execute(&proof, id).await;
            }
            Err(Refusal::Requester) => {
                tracing::warn!(
                    request = id,
                    approver = %caller.principal.name,
                    person = %person,
                    requester = %req.requester,
                    "approval refused: the approver is the requester (as a person)"
                );
                return Err(refusal(Refusal::Requester));
            }
            Err(r) => return Err(refusal(r)),
        }
        let cfg = self.custodians.config(&proof).await?;
        if cfg.generation != req.generation {
            return Err(ServiceError::Conflict(Conflict::QuorumChanged));
        }
        // Commitment, TOTP (once per step), failures counted towards lock-out.
        let share = self
            .custodians
            .check(&proof, &name, &cfg, share_text, totp_code)
            .await?;
        engine.ensure_meta_key().await?;
        let sealed = engine
            .seal_meta(
                approvals::share_aad(id, &req.digest, &name),
                Zeroizing::new(share.expose().to_vec()),
            )
            .await?;
        drop(share);
        let db = self.ctx.db(&proof);
        let rec = match db
            .add_approval(id, &name, &sealed, self.ctx.clock.now_ms())
            .await
        {
            Ok(rec) => rec,
            Err(StoreError::AlreadyExists) => return Err(refusal(Refusal::AlreadyApproved)),
            // K approvals arrived meanwhile: run (or report) it.
            Err(StoreError::Conflict(crate::store::Conflict::RequestState(
                RequestState::Pending,
            ))) => return self.execute(&proof, id).await,
            Err(e) => return Err(request_conflict(e)),
        };
        tracing::info!(
            request = id,
            custodian = %name,
            have = rec.approvals.len(),
            need = rec.threshold,
            "approval accepted"
        );
        if rec.approvals.len() >= usize::from(rec.threshold) {
            return self.execute(&proof, id).await;
        }
        Ok(ApproveOutcome::plain(effective(
            rec,
            self.ctx.clock.now_ms(),
        )))
    }

    /// `Reject`: a custodian of the current quorum, or the requester, cancels a pending
    /// request.
    pub async fn reject(&self, caller: &Caller, id: &str, reason: &str) -> Result<ApprovalRecord> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::Reject>(caller, Scope::none())
            .await?;
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(ServiceError::InvalidArgument(
                "a reason of 1 to 1024 bytes is required",
            ));
        }
        let req = self.load(&proof, id).await?;
        if !req
            .parameters
            .get(PARAM_KEY)
            .is_none_or(|k| caller.principal.may_use_key(k))
        {
            return Err(ServiceError::PermissionDenied);
        }
        let allowed = match custodian_name(caller) {
            Some(name) => {
                let cfg = self.custodians.config(&proof).await?;
                self.custodians
                    .is_custodian(&proof, name, cfg.generation)
                    .await?
            }
            None => caller.principal.name == req.requester,
        };
        if !allowed {
            return Err(ServiceError::PermissionDenied);
        }
        let now = self.ctx.clock.now_ms();
        approvals::check_reject(&req.standing(), now).map_err(refusal)?;
        let rec = self
            .ctx
            .db(&proof)
            .reject_request(id, &caller.principal.name, reason, now)
            .await
            .map_err(request_conflict)?;
        tracing::warn!(request = id, by = %caller.principal.name, "approval request rejected");
        Ok(effective(rec, now))
    }
}
