//! Running an approved request, exactly once.
//!
//! Invariants:
//! - At K approvals the shares are opened, the quorum secret is rebuilt and checked
//!   against the verifier (a `QuorumApproved` proof), and wiped; the operation's effect
//!   and `EXECUTED` commit in one transaction that refuses a request no longer pending:
//!   the operation runs exactly once, or not at all and the request says so.
//! - A request with K approvals that did not run (a crash, an HSM or database outage)
//!   runs at the next unseal ([`Approvals::recover`]) or the next approval attempt — except
//!   a rekey, whose new kits would reach no one: it is failed instead.
//! - A failure that can never succeed marks the request `FAILED` (shares wiped); a
//!   transient one leaves it pending.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use zeroize::Zeroizing;

use super::{effective, Approvals, ApproveOutcome};
use crate::keys::{KeyName, KeysError};
use crate::quorum::approvals::{
    self, Operation, QuorumApproved, RequestState, PARAM_KEY, PARAM_VERSION,
};
use crate::quorum::{crypto, QuorumError};
use crate::secret::Share;
use crate::service::context::Permit;
use crate::service::error::{Conflict, Result, ServiceError};
use crate::service::gate::Commit;
use crate::service::quorum::custodians::CustodianKit;
use crate::service::rotation::{Target, When};
use crate::store::{ApprovalRecord, KeyRecord, QuorumConfig, StoreError};

/// Why a rekey with K approvals found at unseal is failed rather than run: its new kits
/// would reach no one.
pub const REKEY_NEEDS_LIVE_APPROVER: &str = "rekey needs a live approver; request again";

/// What an approved operation produced.
enum Ran {
    /// A key operation: the key as it is after.
    Key(KeyRecord),
    /// A rekey: the new kits.
    Rekey(Vec<CustodianKit>),
    /// An access operation (policy change, elevation): what it did.
    Access(String),
}

/// Whether a failed execution can never succeed (the request is then marked `FAILED`);
/// anything else (outages, lost races) leaves it pending, to run again.
fn is_permanent(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::NotFound(_)
            | ServiceError::AlreadyExists(_)
            | ServiceError::Conflict(_)
            | ServiceError::FailedPrecondition(_)
            | ServiceError::InvalidArgument(_)
            | ServiceError::InvalidWrappedKey
            | ServiceError::PermissionDenied
            | ServiceError::InvalidPolicy(_)
    )
}

impl Approvals {
    /// Runs an approved request and returns it as it is after. A request that is no
    /// longer pending (another approval or node ran it, or it was rejected) is returned
    /// as it is.
    pub(super) async fn execute(&self, permit: &impl Permit, id: &str) -> Result<ApproveOutcome> {
        let req = self.load(permit, id).await?;
        let now = self.ctx.clock.now_ms();
        if req.state != RequestState::Pending || req.approvals.len() < usize::from(req.threshold) {
            return Ok(ApproveOutcome::plain(effective(req, now)));
        }
        // What runs is what the custodians approved: the digest is recomputed here too.
        self.check_bound(permit, &req).await?;
        let outcome = match self.rebuild_quorum(permit, &req).await {
            Ok((approved, cfg, pin)) => {
                self.run(&req, &approved, &cfg, pin.as_deref().map(|p| &p[..]))
                    .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(ran) => {
                let new_kits = match ran {
                    Ran::Key(key) => {
                        tracing::info!(request = id, operation = %req.operation, key = %key.name, "approved request executed");
                        Vec::new()
                    }
                    Ran::Access(what) => {
                        tracing::info!(request = id, operation = %req.operation, outcome = %what, "approved request executed");
                        Vec::new()
                    }
                    Ran::Rekey(kits) => {
                        tracing::warn!(
                            request = id,
                            operation = %req.operation,
                            custodians = kits.len(),
                            "approved rekey executed; the new kits go to the executing custodian only"
                        );
                        kits
                    }
                };
                let rec = self.load(permit, id).await?;
                Ok(ApproveOutcome {
                    request: effective(rec, self.ctx.clock.now_ms()),
                    new_kits,
                })
            }
            Err(e) => self
                .after_failed_run(permit, &req, e)
                .await
                .map(ApproveOutcome::plain),
        }
    }

    /// Opens the stored shares, rebuilds the quorum secret and checks it against the
    /// verifier; for a rekey, also opens the sealed HSM PIN with it. The shares and the
    /// secret are wiped before this returns.
    async fn rebuild_quorum(
        &self,
        permit: &impl Permit,
        req: &ApprovalRecord,
    ) -> Result<(QuorumApproved, QuorumConfig, Option<Zeroizing<Vec<u8>>>)> {
        let engine = self.ctx.engine()?;
        let cfg = self.custodians.config(permit).await?;
        if cfg.generation != req.generation {
            return Err(ServiceError::Conflict(Conflict::QuorumChanged));
        }
        let sealed = self.ctx.db(permit).sealed_shares(&req.id).await?;
        let mut shares: Vec<Share> = Vec::with_capacity(usize::from(req.threshold));
        for s in sealed.into_iter().take(usize::from(req.threshold)) {
            match engine
                .open_meta(
                    approvals::share_aad(&req.id, &req.digest, &s.custodian),
                    s.sealed,
                )
                .await
            {
                Ok(bytes) => shares.push(Share::new(bytes)),
                Err(KeysError::InvalidWrappedKey) => {
                    return Err(ServiceError::Conflict(Conflict::StoredShareCorrupt))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let refs: Vec<&Share> = shares.iter().collect();
        let want_pin = req.operation == Operation::Rekey;
        let (ok, pin) =
            approvals::verify_quorum_with(&refs, req.threshold, &cfg.verifier, |secret| {
                if want_pin {
                    crypto::open_pin(secret, &cfg.sealed_pin).map(Some)
                } else {
                    Ok(None)
                }
            })
            .map_err(|e| match e {
                QuorumError::NotEnoughShares => {
                    ServiceError::FailedPrecondition("fewer stored shares than the threshold")
                }
                QuorumError::SealedValueCorrupt => {
                    ServiceError::Conflict(Conflict::SealedPinCorrupt)
                }
                _ => ServiceError::Conflict(Conflict::QuorumMismatch),
            })?;
        drop(shares);
        Ok((ok, cfg, pin))
    }

    /// Runs the request's operation, committing its effect with `EXECUTED`. `pin` is the
    /// opened HSM PIN (a rekey only).
    async fn run(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
        cfg: &QuorumConfig,
        pin: Option<&[u8]>,
    ) -> Result<Ran> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let commit = Commit::Approved(&req.id, ok);
        let key = || {
            req.parameters
                .get(PARAM_KEY)
                .and_then(|k| KeyName::parse(k).ok())
                .ok_or(BAD)
        };
        let version = match req.parameters.get(PARAM_VERSION) {
            Some(v) => Some(v.parse::<u32>().map_err(|_| BAD)?),
            None => None,
        };
        match req.operation {
            Operation::RotateKey => {
                let name = key()?;
                self.rotation
                    .rotate(ok, Target::Name(&name), When::Always, commit)
                    .await?
                    .map(Ran::Key)
                    .ok_or(ServiceError::Aborted("concurrent rotation; retry"))
            }
            op @ (Operation::DisableKeyVersion
            | Operation::EnableKeyVersion
            | Operation::RetireKeyVersion
            | Operation::RetireKey
            | Operation::CancelRetirement
            | Operation::SetRetention) => self
                .lifecycle
                .run_approved(op, &req.parameters, &key()?, version, commit)
                .await
                .map(Ran::Key),
            Operation::Rekey => {
                let pin = pin.ok_or(ServiceError::internal("rekey without the PIN"))?;
                self.ceremony
                    .run_rekey(req, ok, cfg, pin)
                    .await
                    .map(Ran::Rekey)
            }
            Operation::UpdatePolicy => self
                .policies
                .run_update_policy(req, ok)
                .await
                .map(Ran::Access),
            Operation::Elevate => self.grants.run_elevation(req, ok).await.map(Ran::Access),
            Operation::CreateToken => self.tokens.run_create_token(req, ok).await.map(Ran::Access),
        }
    }

    /// After a run that did not complete: a request decided meanwhile is returned as it
    /// is; a permanent failure marks it `FAILED` (shares wiped); a transient one leaves
    /// it pending. The error goes back to the caller in both latter cases.
    async fn after_failed_run(
        &self,
        permit: &impl Permit,
        req: &ApprovalRecord,
        e: ServiceError,
    ) -> Result<ApprovalRecord> {
        let now_rec = self.load(permit, &req.id).await?;
        if now_rec.state != RequestState::Pending {
            return Ok(effective(now_rec, self.ctx.clock.now_ms()));
        }
        if is_permanent(&e) {
            let reason = e.to_string();
            tracing::error!(request = %req.id, operation = %req.operation, reason = %reason, "approved request failed");
            let now = self.ctx.clock.now_ms();
            match self
                .ctx
                .db(permit)
                .fail_request(&req.id, &reason, now)
                .await
            {
                Ok(_) | Err(StoreError::Conflict(_)) => {}
                Err(se) => return Err(se.into()),
            }
        } else {
            tracing::warn!(
                request = %req.id,
                error = %e,
                "approved request could not run now; it stays pending and runs at the next \
                 unseal or approval attempt"
            );
        }
        Err(e)
    }

    /// After an unseal: makes `arca:meta` if the token lacks it, expires overdue
    /// requests, and runs every request that has K approvals but did not run (the
    /// process died, or the HSM or database failed, between the K-th approval and the
    /// commit). Failures are logged; the service stays unsealed.
    pub async fn recover(&self) {
        let Ok(engine) = self.ctx.engine() else {
            return;
        };
        match engine.ensure_meta_key().await {
            Ok(true) => tracing::info!(
                label = crate::keys::META_KEY_LABEL,
                "made the HSM system key"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot make the HSM system key arca:meta; approvals will fail")
            }
        }
        let system = self.ctx.system();
        let db = self.ctx.db(&system);
        let now = self.ctx.clock.now_ms();
        if let Err(e) = db.expire_requests(now).await {
            tracing::warn!(error = %e, "could not expire overdue approval requests");
        }
        let ready = match db.ready_requests().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for approved requests to run");
                return;
            }
        };
        for id in ready {
            match self.load(&system, &id).await {
                // A rekey's new kits go to the custodian whose approval runs it; run
                // here, they would reach no one.
                Ok(r) if r.operation == Operation::Rekey => {
                    let now = self.ctx.clock.now_ms();
                    match db.fail_request(&id, REKEY_NEEDS_LIVE_APPROVER, now).await {
                        Ok(_) => {
                            tracing::warn!(request = %id, reason = REKEY_NEEDS_LIVE_APPROVER, "approved rekey failed after unseal")
                        }
                        Err(e) => {
                            tracing::warn!(request = %id, error = %e, "could not fail an approved rekey after unseal")
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "could not load an approved request");
                    continue;
                }
            }
            let outcome = self.execute(&system, &id).await;
            self.ctx.record_job(
                "approval.run_after_unseal",
                outcome.is_ok(),
                None,
                &format!("request={id}"),
            );
            match outcome {
                Ok(r) => {
                    tracing::info!(request = %id, state = r.request.state.as_str(), "approved request completed after unseal")
                }
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "approved request could not run after unseal")
                }
            }
        }
    }
}
