//! Approval requests of quorum operations (DESIGN §2 "Quorum operations").
//!
//! When an operation needs quorum here (the policy lists it and the server runs a real
//! quorum: `quorum_gates`), its call creates an approval request instead of acting.
//! Custodians approve with the digest they reviewed, their share and a TOTP code; the
//! K-th approval runs the operation.
//!
//! Invariants:
//! - Only a custodian of the request's quorum generation approves, once, never the
//!   requester, only with the request's digest, and only while the request is pending and
//!   unexpired. Each share passes the same checks as at unseal ([`KeyService::
//!   check_custodian`]: commitment, fresh TOTP step, failure counting and lock-out)
//!   before it is stored — and it is stored only sealed under `arca:meta`, with AAD
//!   binding the request and the custodian.
//! - At K approvals the shares are opened, the quorum secret is rebuilt and checked
//!   against the verifier (a [`QuorumApproved`] proof), and wiped; the operation's effect
//!   and `EXECUTED` commit in one transaction that refuses a request no longer pending:
//!   the operation runs exactly once, or not at all and the request says so.
//! - A request with K approvals that did not run (a crash, an HSM or database outage)
//!   runs at the next unseal ([`KeyService::after_unseal`]) or the next approval attempt.
//! - No share, TOTP code or quorum secret reaches a log, an error or the database in clear.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use zeroize::Zeroizing;

use super::seal::{custodian_name, valid_custodian_name};
use super::{Caller, CustodianKit, KeyService, Result, ServiceError};
use crate::authz::policy::Action;
use crate::keys::{KeyName, KeysError, VersionState};
use crate::quorum::approvals::{
    self, Operation, Parameters, QuorumApproved, Refusal, RequestState, PARAM_CUSTODIANS,
    PARAM_KEY, PARAM_SHARES, PARAM_THRESHOLD, PARAM_VERSION,
};
use crate::quorum::{crypto, shamir, QuorumError};
use crate::secret::Share;
use crate::store::{ApprovalRecord, KeyRecord, NewQuorum, NewRequest, QuorumConfig, StoreError};

/// Why a rekey with K approvals found at unseal is failed rather than run: its new kits
/// would reach no one.
pub const REKEY_NEEDS_LIVE_APPROVER: &str = "rekey needs a live approver; request again";

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

/// What an approved operation produced.
enum Ran {
    /// A key operation: the key as it is after.
    Key(KeyRecord),
    /// A rekey: the new kits.
    Rekey(Vec<CustodianKit>),
    /// An access operation (policy change, elevation): what it did.
    Access(String),
}

/// Largest page of `ListRequests`.
pub const MAX_REQUEST_PAGE: u32 = 100;
/// Longest rejection reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// How an administrative change commits.
#[derive(Clone, Copy)]
pub(super) enum Commit<'a> {
    /// On its own: the operation needs no approval here.
    Direct,
    /// In one transaction with the completion of the request `id`, which K custodians
    /// approved.
    Approved(&'a str, &'a QuorumApproved),
}

/// The parameters of an operation on a key.
pub(super) fn key_params(name: &KeyName, version: Option<u32>) -> Parameters {
    let mut p = Parameters::new();
    p.insert(PARAM_KEY.to_string(), name.to_string());
    if let Some(v) = version {
        p.insert(PARAM_VERSION.to_string(), v.to_string());
    }
    p
}

fn refusal(r: Refusal) -> ServiceError {
    match r {
        Refusal::NotPending(s) => decided(s),
        Refusal::Expired => decided(RequestState::Expired),
        Refusal::Requester => {
            ServiceError::Rejected("the requester cannot approve their own request")
        }
        Refusal::AlreadyApproved => {
            ServiceError::Rejected("this custodian has already approved this request")
        }
        Refusal::DigestMismatch => ServiceError::InvalidArgument(
            "the digest does not match this request: review it again with `arca request show`",
        ),
    }
}

fn decided(s: RequestState) -> ServiceError {
    ServiceError::FailedPrecondition(match s {
        RequestState::Pending => "the request has all its approvals and is waiting to run",
        RequestState::Executed => "the request was executed already",
        RequestState::Rejected => "the request was rejected",
        RequestState::Expired => "the request has expired",
        RequestState::Failed => "the request failed",
    })
}

/// A store conflict on a request, as the state it names.
pub(super) fn request_conflict(e: StoreError) -> ServiceError {
    match e {
        StoreError::Conflict(crate::store::Conflict::RequestState(s)) => decided(s),
        StoreError::Conflict(_) => ServiceError::Internal(Box::new(e)),
        StoreError::NotFound => ServiceError::NotFound("approval request not found"),
        e => e.into(),
    }
}

/// Whether a failed execution can never succeed (the request is then marked `FAILED`);
/// anything else (outages, lost races) leaves it pending, to run again.
fn is_permanent(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::NotFound(_)
            | ServiceError::AlreadyExists(_)
            | ServiceError::FailedPrecondition(_)
            | ServiceError::InvalidArgument(_)
            | ServiceError::InvalidWrappedKey
            | ServiceError::PermissionDenied
    )
}

/// Whether the caller's credential covers the key a request is about (a token limited to
/// some keys sees no request about others, so their names do not leak).
fn visible(caller: &Caller, rec: &ApprovalRecord) -> bool {
    rec.parameters
        .get(PARAM_KEY)
        .is_none_or(|k| caller.principal.may_use_key(k))
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

impl KeyService {
    /// Whether `op` waits for K-of-N approval on this server.
    pub(super) fn needs_quorum(&self, op: Operation) -> bool {
        self.cfg.quorum_gates && self.cfg.quorum_policy.requires(op)
    }

    /// Creates the approval request for `op` with `parameters`, asked by `caller`.
    pub(super) async fn open_request(
        &self,
        caller: &Caller,
        op: Operation,
        parameters: Parameters,
    ) -> Result<ApprovalRecord> {
        let cfg = self
            .quorum
            .quorum_config()
            .await?
            .ok_or(ServiceError::FailedPrecondition(
                "dual control is not initialised",
            ))?;
        let raw = crypto::random::<16>().map_err(|e| ServiceError::Internal(Box::new(e)))?;
        let id = format!("req_{}", hex::encode(raw.as_ref()));
        let digest = approvals::digest(op, &parameters);
        let now = self.clock.now_ms();
        let rec = self
            .quorum
            .create_request(&NewRequest {
                id: &id,
                operation: op,
                parameters: &parameters,
                digest: &digest,
                requester: &caller.principal.name,
                threshold: cfg.threshold,
                generation: cfg.generation,
                created_at: now,
                expires_at: now.saturating_add(self.cfg.quorum_policy.request_ttl_ms()),
            })
            .await?;
        tracing::info!(
            request = %id,
            operation = %op,
            requester = %caller.principal.name,
            threshold = cfg.threshold,
            "approval request created"
        );
        Ok(rec)
    }

    /// A page of approval requests, newest first, optionally in one state.
    pub async fn list_requests(
        &self,
        caller: &Caller,
        state: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ApprovalRecord>, String)> {
        self.engine()?;
        self.authorize(caller, Action::ListRequests, None, None)
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
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_request_token(page_token)?)
        };
        let now = self.clock.now_ms();
        // So that a PENDING filter does not show requests whose time ran out.
        self.quorum.expire_requests(now).await?;
        let recs = self
            .quorum
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
                .filter(|r| visible(caller, r))
                .map(|r| self.effective(r, now))
                .collect(),
            next,
        ))
    }

    /// One approval request.
    pub async fn get_request(&self, caller: &Caller, id: &str) -> Result<ApprovalRecord> {
        self.engine()?;
        self.authorize(caller, Action::GetRequest, None, None)
            .await?;
        let rec = self.load_request(id).await?;
        if !visible(caller, &rec) {
            return Err(ServiceError::PermissionDenied);
        }
        Ok(self.effective(rec, self.clock.now_ms()))
    }

    /// A custodian approves request `id`, having reviewed `digest`, with their share and
    /// a TOTP code. The K-th approval runs the operation; the answer is the request as it
    /// is after (`EXECUTED`, with the result, once it ran), and the new kits if it
    /// executed a rekey.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        digest: &str,
        share_text: &str,
        totp_code: &str,
    ) -> Result<ApproveOutcome> {
        let engine = self.engine()?;
        self.authorize(caller, Action::Approve, None, None).await?;
        let name = custodian_name(caller)
            .map_err(|_| ServiceError::Rejected("only custodians approve requests"))?
            .to_string();
        let req = self.load_request(id).await?;
        let already = req.approvals.iter().any(|a| a.custodian == name);
        let checked = approvals::check_approval(
            &req.standing(),
            &caller.principal.name,
            already,
            digest,
            self.clock.now_ms(),
        );
        match checked {
            Ok(()) => {}
            // K approvals are in, but the operation did not run (an outage interrupted
            // it): run it now. The shares are in the store; nothing is taken from the
            // caller.
            Err(Refusal::NotPending(RequestState::Pending)) => {
                // Only a custodian of the current generation may set it going.
                let cfg = self
                    .quorum
                    .quorum_config()
                    .await?
                    .ok_or(ServiceError::FailedPrecondition("not initialised"))?;
                match self.quorum.custodian(&name, cfg.generation).await {
                    Ok(_) => return self.execute(id).await,
                    Err(StoreError::NotFound) => return Err(ServiceError::PermissionDenied),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(r) => return Err(refusal(r)),
        }
        let cfg = self
            .quorum
            .quorum_config()
            .await?
            .ok_or(ServiceError::FailedPrecondition("not initialised"))?;
        if cfg.generation != req.generation {
            return Err(ServiceError::FailedPrecondition(
                "the custodians changed since this request was made",
            ));
        }
        // Commitment, TOTP (once per step), failures counted towards lock-out.
        let share = self
            .check_custodian(&name, &cfg, share_text, totp_code)
            .await?;
        engine.ensure_meta_key().await?;
        let sealed = engine
            .seal_meta(
                approvals::share_aad(id, &name),
                Zeroizing::new(share.expose().to_vec()),
            )
            .await?;
        drop(share);
        let rec = match self
            .quorum
            .add_approval(id, &name, &sealed, self.clock.now_ms())
            .await
        {
            Ok(rec) => rec,
            Err(StoreError::AlreadyExists) => return Err(refusal(Refusal::AlreadyApproved)),
            // K approvals arrived meanwhile: run (or report) it.
            Err(StoreError::Conflict(crate::store::Conflict::RequestState(
                RequestState::Pending,
            ))) => return self.execute(id).await,
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
            return self.execute(id).await;
        }
        Ok(ApproveOutcome::plain(
            self.effective(rec, self.clock.now_ms()),
        ))
    }

    /// A custodian of the current quorum, or the requester, cancels a pending request.
    pub async fn reject(&self, caller: &Caller, id: &str, reason: &str) -> Result<ApprovalRecord> {
        self.engine()?;
        self.authorize(caller, Action::Reject, None, None).await?;
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_REASON_BYTES {
            return Err(ServiceError::InvalidArgument(
                "a reason of 1 to 1024 bytes is required",
            ));
        }
        let req = self.load_request(id).await?;
        if !visible(caller, &req) {
            return Err(ServiceError::PermissionDenied);
        }
        let allowed = match custodian_name(caller) {
            Ok(name) => {
                let cfg = self
                    .quorum
                    .quorum_config()
                    .await?
                    .ok_or(ServiceError::FailedPrecondition("not initialised"))?;
                match self.quorum.custodian(name, cfg.generation).await {
                    Ok(_) => true,
                    Err(StoreError::NotFound) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(_) => caller.principal.name == req.requester,
        };
        if !allowed {
            return Err(ServiceError::PermissionDenied);
        }
        let now = self.clock.now_ms();
        approvals::check_reject(&req.standing(), now).map_err(refusal)?;
        let rec = self
            .quorum
            .reject_request(id, &caller.principal.name, reason, now)
            .await
            .map_err(request_conflict)?;
        tracing::warn!(request = id, by = %caller.principal.name, "approval request rejected");
        Ok(self.effective(rec, now))
    }

    /// After an unseal: makes `arca:meta` if the token lacks it, expires overdue
    /// requests, and runs every request that has K approvals but did not run (the
    /// process died, or the HSM or database failed, between the K-th approval and the
    /// commit). Failures are logged; the service stays unsealed.
    pub(super) async fn after_unseal(&self) {
        let Ok(engine) = self.engine() else { return };
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
        if let Err(e) = self.quorum.expire_requests(self.clock.now_ms()).await {
            tracing::warn!(error = %e, "could not expire overdue approval requests");
        }
        let ready = match self.quorum.ready_requests().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for approved requests to run");
                return;
            }
        };
        for id in ready {
            // A rekey's new kits go to the custodian whose approval runs it; run here,
            // they would reach no one.
            match self.load_request(&id).await {
                Ok(r) if r.operation == Operation::Rekey => {
                    match self
                        .quorum
                        .fail_request(&id, REKEY_NEEDS_LIVE_APPROVER, self.clock.now_ms())
                        .await
                    {
                        Ok(_) => tracing::warn!(
                            request = %id,
                            reason = REKEY_NEEDS_LIVE_APPROVER,
                            "approved rekey failed after unseal"
                        ),
                        Err(e) => tracing::warn!(
                            request = %id,
                            error = %e,
                            "could not fail an approved rekey after unseal"
                        ),
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(request = %id, error = %e, "could not load an approved request");
                    continue;
                }
            }
            let outcome = self.execute(&id).await;
            self.audit_job(
                "approval.run_after_unseal",
                outcome.is_ok(),
                None,
                &format!("request={id}"),
            );
            match outcome {
                Ok(r) => tracing::info!(
                    request = %id,
                    state = r.request.state.as_str(),
                    "approved request completed after unseal"
                ),
                Err(e) => tracing::warn!(
                    request = %id,
                    error = %e,
                    "approved request could not run after unseal"
                ),
            }
        }
    }

    async fn load_request(&self, id: &str) -> Result<ApprovalRecord> {
        self.quorum.request(id).await.map_err(request_conflict)
    }

    /// The record with its state as of `now` (a pending request past its expiry
    /// without K approvals shows `EXPIRED`).
    fn effective(&self, mut rec: ApprovalRecord, now: i64) -> ApprovalRecord {
        rec.state = rec.standing().effective_state(now);
        rec
    }

    /// Runs an approved request and returns it as it is after. A request that is no
    /// longer pending (another approval or node ran it, or it was rejected) is returned
    /// as it is.
    async fn execute(&self, id: &str) -> Result<ApproveOutcome> {
        let req = self.load_request(id).await?;
        if req.state != RequestState::Pending || req.approvals.len() < usize::from(req.threshold) {
            return Ok(ApproveOutcome::plain(
                self.effective(req, self.clock.now_ms()),
            ));
        }
        let outcome = match self.rebuild_quorum(&req).await {
            Ok((approved, cfg, pin)) => {
                self.run_approved(&req, &approved, &cfg, pin.as_deref().map(|p| &p[..]))
                    .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(ran) => {
                let new_kits = match ran {
                    Ran::Key(key) => {
                        tracing::info!(
                            request = id,
                            operation = %req.operation,
                            key = %key.name,
                            "approved request executed"
                        );
                        Vec::new()
                    }
                    Ran::Access(what) => {
                        tracing::info!(
                            request = id,
                            operation = %req.operation,
                            outcome = %what,
                            "approved request executed"
                        );
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
                let rec = self.load_request(id).await?;
                Ok(ApproveOutcome {
                    request: self.effective(rec, self.clock.now_ms()),
                    new_kits,
                })
            }
            Err(e) => self
                .after_failed_run(&req, e)
                .await
                .map(ApproveOutcome::plain),
        }
    }

    /// Opens the stored shares, rebuilds the quorum secret and checks it against the
    /// verifier; for a rekey, also opens the sealed HSM PIN with it. The shares and the
    /// secret are wiped before this returns.
    async fn rebuild_quorum(
        &self,
        req: &ApprovalRecord,
    ) -> Result<(QuorumApproved, QuorumConfig, Option<Zeroizing<Vec<u8>>>)> {
        let engine = self.engine()?;
        let cfg = self
            .quorum
            .quorum_config()
            .await?
            .ok_or(ServiceError::FailedPrecondition("not initialised"))?;
        if cfg.generation != req.generation {
            return Err(ServiceError::FailedPrecondition(
                "the custodians changed since this request was made",
            ));
        }
        let sealed = self.quorum.sealed_shares(&req.id).await?;
        let mut shares: Vec<Share> = Vec::with_capacity(usize::from(req.threshold));
        for s in sealed.into_iter().take(usize::from(req.threshold)) {
            match engine
                .open_meta(approvals::share_aad(&req.id, &s.custodian), s.sealed)
                .await
            {
                Ok(bytes) => shares.push(Share::new(bytes)),
                Err(KeysError::InvalidWrappedKey) => {
                    return Err(ServiceError::FailedPrecondition(
                        "a stored share failed authentication",
                    ))
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
                QuorumError::SealedValueCorrupt => ServiceError::FailedPrecondition(
                    "the sealed HSM PIN does not open with the quorum secret",
                ),
                _ => ServiceError::FailedPrecondition(
                    "the approvals' shares do not rebuild the quorum secret",
                ),
            })?;
        drop(shares);
        Ok((ok, cfg, pin))
    }

    /// Runs the request's operation, committing its effect with `EXECUTED`. `pin` is the
    /// opened HSM PIN (a rekey only).
    async fn run_approved(
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
        let version = || {
            req.parameters
                .get(PARAM_VERSION)
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or(BAD)
        };
        let key_op = match req.operation {
            Operation::RotateKey => self.rotate(&key()?, commit).await,
            Operation::DisableKeyVersion => {
                self.change_state(&key()?, version()?, VersionState::Disabled, commit)
                    .await
            }
            Operation::EnableKeyVersion => {
                self.change_state(&key()?, version()?, VersionState::Enabled, commit)
                    .await
            }
            Operation::Rekey => {
                let pin = pin.ok_or(ServiceError::Internal("rekey without the PIN".into()))?;
                return self.rekey(req, ok, cfg, pin).await.map(Ran::Rekey);
            }
            op @ (Operation::RetireKeyVersion
            | Operation::RetireKey
            | Operation::CancelRetirement
            | Operation::SetRetention) => {
                let version = match req.parameters.get(PARAM_VERSION) {
                    Some(_) => Some(version()?),
                    None => None,
                };
                self.run_approved_lifecycle(op, &req.parameters, &key()?, version, commit)
                    .await
            }
            Operation::UpdatePolicy => {
                return self.run_update_policy(req, ok).await.map(Ran::Access);
            }
            Operation::Elevate => return self.run_elevation(req, ok).await.map(Ran::Access),
        };
        key_op.map(Ran::Key)
    }

    /// Runs an approved rekey: a new quorum secret split K'-of-N' among the new
    /// custodians, the PIN sealed under it, and — in one transaction with `EXECUTED` —
    /// the new configuration, custodians and tokens, with every earlier custodian token
    /// revoked. Returns the new kits (nothing of them is stored but hashes, commitments
    /// and share-sealed TOTP secrets).
    async fn rekey(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
        cfg: &QuorumConfig,
        pin: &[u8],
    ) -> Result<Vec<CustodianKit>> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let threshold: u8 = req
            .parameters
            .get(PARAM_THRESHOLD)
            .and_then(|v| v.parse().ok())
            .ok_or(BAD)?;
        let custodians: Vec<String> = req
            .parameters
            .get(PARAM_CUSTODIANS)
            .ok_or(BAD)?
            .split(',')
            .map(str::to_string)
            .collect();
        let shares: usize = req
            .parameters
            .get(PARAM_SHARES)
            .and_then(|v| v.parse().ok())
            .ok_or(BAD)?;
        let mut seen = std::collections::HashSet::new();
        if shares != custodians.len()
            || threshold == 0
            || usize::from(threshold) > shares
            || shares > usize::from(shamir::MAX_SHARES)
            || !custodians
                .iter()
                .all(|c| valid_custodian_name(c) && seen.insert(c.as_str()))
        {
            return Err(BAD);
        }
        let q = self.new_quorum(threshold, &custodians, pin, cfg.generation + 1)?;
        let revoked = self
            .quorum
            .complete_rekey(
                &req.id,
                ok,
                &NewQuorum {
                    previous_generation: cfg.generation,
                    config: &q.config,
                    custodians: &q.custodians,
                    tokens: &q.tokens,
                },
                self.clock.now_ms(),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(crate::store::Conflict::Generation) => {
                    ServiceError::FailedPrecondition(
                        "the custodians changed since this request was made",
                    )
                }
                e => request_conflict(e),
            })?;
        // Revoked custodian tokens stop working here at once (other nodes: within the
        // token cache's lifetime).
        for id in &revoked {
            self.auth.forget_token(id);
        }
        tracing::warn!(
            threshold,
            custodians = custodians.len(),
            generation = q.config.generation,
            revoked_tokens = revoked.len(),
            "quorum rekeyed: earlier shares and custodian tokens no longer work"
        );
        // Kits whose custodian named an age key leave only encrypted to it.
        let mut kits = q.kits;
        for kit in &mut kits {
            let param = format!("{}{}", super::seal::AGE_PARAM_PREFIX, kit.name);
            if let Some(recipient) = req.parameters.get(&param) {
                let key = crate::quorum::age::parse_recipient(recipient).map_err(|_| BAD)?;
                let armored = crate::quorum::age::encrypt_armored(&key, kit.share.as_bytes())
                    .map_err(|e| ServiceError::Internal(Box::new(e)))?;
                kit.share = zeroize::Zeroizing::new(armored);
            }
        }
        Ok(kits)
    }

    /// After a run that did not complete: a request decided meanwhile is returned as it
    /// is; a permanent failure marks it `FAILED` (shares wiped); a transient one leaves
    /// it pending. The error goes back to the caller in both latter cases.
    async fn after_failed_run(
        &self,
        req: &ApprovalRecord,
        e: ServiceError,
    ) -> Result<ApprovalRecord> {
        let now_rec = self.load_request(&req.id).await?;
        if now_rec.state != RequestState::Pending {
            return Ok(self.effective(now_rec, self.clock.now_ms()));
        }
        if is_permanent(&e) {
            let reason = e.to_string();
            tracing::error!(
                request = %req.id,
                operation = %req.operation,
                reason = %reason,
                "approved request failed"
            );
            match self
                .quorum
                .fail_request(&req.id, &reason, self.clock.now_ms())
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::sync::Arc;

    use arca_hsm::fake::FakeHsm;
    use arca_hsm::{AuthPin, Hsm};

    use super::*;
    use crate::authz::{AuthMethod, Principal};
    use crate::clock::{Clock, ManualClock};
    use crate::keys::EngineConfig;
    use crate::quorum::{shamir, totp};
    use crate::service::seal::CUSTODIAN_PREFIX;
    use crate::service::{
        AdminOutcome, CustodianKit, HsmOpener, PinSetter, SealControl, ServiceConfig,
    };
    use crate::store::{ApprovalStore, QuorumStore, RequestResult, SqlStore};

    const T0: i64 = 1_800_000_000_000;
    const STEP: i64 = 30_000;
    const DAY: i64 = 24 * 3600 * 1000;

    struct World {
        _dir: tempfile::TempDir,
        store: Arc<SqlStore>,
        svc: KeyService,
        clock: Arc<ManualClock>,
        kits: Vec<CustodianKit>,
    }

    fn principal(name: &str, roles: &[&str]) -> Caller {
        Caller {
            principal: Arc::new(Principal {
                name: name.to_string(),
                method: AuthMethod::Token {
                    token_id: "t".into(),
                },
                roles: roles.iter().map(|r| r.to_string()).collect(),
                key_globs: Vec::new(),
            }),
            request_id: "r".into(),
            peer: crate::authz::Peer::default(),
            mfa: None,
        }
    }

    fn admin() -> Caller {
        principal("dev-admin", &["admin"])
    }

    fn custodian(n: usize) -> Caller {
        principal(&format!("{CUSTODIAN_PREFIX}c{n}"), &["custodian"])
    }

    /// A 3-of-5 quorum (custodians c1..c5), unsealed by c1, c2, c3, with gates on.
    async fn world(gates: bool) -> World {
        let clock = Arc::new(ManualClock::at(T0));
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("a.db"))
                .await
                .unwrap(),
        );
        // One fake HSM for every unseal: a re-opened HSM keeps its objects.
        let hsm = Arc::new(FakeHsm::new());
        let opener: HsmOpener = Arc::new(move |_pin| Ok(hsm.clone() as Arc<dyn Hsm>));
        let setter: PinSetter = Arc::new(|_, _| Ok(()));
        let svc = KeyService::new(
            store.clone(),
            store.clone(),
            store.clone(),
            SealControl::new(opener, setter, EngineConfig::default()),
            clock.clone(),
            ServiceConfig {
                quorum_gates: gates,
                ..ServiceConfig::default()
            },
        );
        let names: Vec<String> = (1..=5).map(|i| format!("c{i}")).collect();
        let kits = svc
            .init_quorum(&admin(), 3, &names, AuthPin::from("so".to_string()), 2)
            .await
            .unwrap();
        let w = World {
            _dir: dir,
            store,
            svc,
            clock,
            kits,
        };
        for n in 1..=3 {
            let code = w.code(n).await;
            w.svc
                .unseal(&custodian(n), &w.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
        assert!(w.svc.engine().is_ok());
        w
    }

    impl World {
        /// Custodian n's TOTP code now. Each custodian's code is used once per step: the
        /// tests move the clock a step on before a custodian submits again.
        async fn code(&self, n: usize) -> String {
            let kit = &self.kits[n - 1];
            let rec = self.store.custodian(&kit.name, 1).await.unwrap();
            let share = shamir::decode(&kit.share).unwrap();
            let secret = crypto::open_totp(&kit.name, &share, &rec.totp_sealed).unwrap();
            totp::hotp(&secret, totp::step_at(self.clock.now_ms()) as u64)
        }

        fn next_step(&self) {
            self.clock.advance(STEP);
        }

        async fn approve(&self, n: usize, req: &ApprovalRecord) -> Result<ApprovalRecord> {
            let code = self.code(n).await;
            self.svc
                .approve(
                    &custodian(n),
                    &req.id,
                    &req.digest,
                    &self.kits[n - 1].share,
                    &code,
                )
                .await
                .map(|o| o.request)
        }

        async fn key(&self, name: &str) -> KeyRecord {
            self.svc.get_key(&admin(), name).await.unwrap()
        }
    }

    fn pending(o: AdminOutcome) -> ApprovalRecord {
        match o {
            AdminOutcome::Pending(r) => *r,
            AdminOutcome::Done(k) => panic!("ran at once: {k:?}"),
        }
    }

    #[tokio::test]
    async fn a_rotation_waits_for_three_custodians_and_runs_once() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        assert_eq!(req.state, RequestState::Pending);
        assert_eq!(req.operation, Operation::RotateKey);
        assert_eq!(req.requester, "dev-admin");
        assert_eq!(req.threshold, 3);
        assert_eq!(req.expires_at, T0 + DAY);
        assert_eq!(
            req.digest,
            approvals::digest(Operation::RotateKey, &req.parameters)
        );
        assert_eq!(w.key("phi").await.versions.len(), 1);
        // A request for a key that does not exist is refused at once.
        assert!(matches!(
            w.svc.rotate_key(&admin(), "nope").await,
            Err(ServiceError::NotFound(_))
        ));

        // The requester is no custodian (the policy gives it no Approve); a wrong
        // digest; bad TOTP (counted).
        w.next_step();
        assert!(matches!(
            w.svc
                .approve(&admin(), &req.id, &req.digest, &w.kits[0].share, "000000")
                .await,
            Err(ServiceError::PermissionDenied)
        ));
        let code = w.code(1).await;
        assert!(matches!(
            w.svc
                .approve(
                    &custodian(1),
                    &req.id,
                    &"0".repeat(64),
                    &w.kits[0].share,
                    &code
                )
                .await,
            Err(ServiceError::InvalidArgument(_))
        ));
        let wrong = if code == "000000" { "111111" } else { "000000" };
        assert!(matches!(
            w.svc
                .approve(&custodian(1), &req.id, &req.digest, &w.kits[0].share, wrong)
                .await,
            Err(ServiceError::Rejected("TOTP code rejected"))
        ));
        // Another custodian's share under c1's identity.
        assert!(matches!(
            w.svc
                .approve(&custodian(1), &req.id, &req.digest, &w.kits[1].share, &code)
                .await,
            Err(ServiceError::Rejected(_))
        ));

        let r = w.approve(1, &req).await.unwrap();
        assert_eq!(r.approvals.len(), 1);
        w.next_step();
        assert!(matches!(
            w.approve(1, &req).await,
            Err(ServiceError::Rejected(m)) if m.contains("already approved")
        ));
        let r = w.approve(2, &req).await.unwrap();
        assert_eq!(r.state, RequestState::Pending);
        assert_eq!(w.key("phi").await.versions.len(), 1);
        let r = w.approve(4, &req).await.unwrap();
        assert_eq!(r.state, RequestState::Executed);
        let Some(RequestResult::Key(after)) = &r.result else {
            panic!("no result")
        };
        assert_eq!(after.primary_version, 2);
        let key = w.key("phi").await;
        assert_eq!(key.versions.len(), 2);
        assert_eq!(key.primary_version, 2);
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());
        assert_eq!(
            r.approvals
                .iter()
                .map(|a| a.custodian.as_str())
                .collect::<Vec<_>>(),
            ["c1", "c2", "c4"]
        );

        // After execution: no more approvals, no rejection, nothing runs twice.
        assert!(matches!(
            w.approve(5, &req).await,
            Err(ServiceError::FailedPrecondition(
                "the request was executed already"
            ))
        ));
        assert!(w.svc.reject(&custodian(5), &req.id, "late").await.is_err());
        assert_eq!(w.key("phi").await.versions.len(), 2);
        let listed = w
            .svc
            .list_requests(&admin(), "executed", 0, "")
            .await
            .unwrap();
        assert_eq!(listed.0.len(), 1);
    }

    #[tokio::test]
    async fn expiry_and_rejection_with_a_fixed_clock() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        w.next_step();
        w.approve(1, &req).await.unwrap();
        // One ms before expiry it still takes approvals; at expiry it does not.
        w.clock.advance(DAY - STEP - 1);
        assert_eq!(
            w.svc.get_request(&admin(), &req.id).await.unwrap().state,
            RequestState::Pending
        );
        w.clock.advance(1);
        assert_eq!(
            w.svc.get_request(&admin(), &req.id).await.unwrap().state,
            RequestState::Expired
        );
        assert!(matches!(
            w.approve(2, &req).await,
            Err(ServiceError::FailedPrecondition("the request has expired"))
        ));
        // Listing sweeps it: stored EXPIRED, its share wiped.
        let (all, _) = w.svc.list_requests(&admin(), "", 0, "").await.unwrap();
        assert_eq!(all[0].state, RequestState::Expired);
        assert_eq!(
            w.store.request(&req.id).await.unwrap().state,
            RequestState::Expired
        );
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());

        // Rejection: by a custodian (or the requester), with a reason; then no approvals.
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        w.next_step();
        w.approve(1, &req).await.unwrap();
        assert!(matches!(
            w.svc
                .reject(&principal("someone", &["admin"]), &req.id, "no")
                .await,
            Err(ServiceError::PermissionDenied)
        ));
        assert!(matches!(
            w.svc.reject(&custodian(9), &req.id, "no").await,
            Err(ServiceError::PermissionDenied)
        ));
        assert!(matches!(
            w.svc.reject(&custodian(2), &req.id, " ").await,
            Err(ServiceError::InvalidArgument(_))
        ));
        let r = w
            .svc
            .reject(&custodian(2), &req.id, "not planned")
            .await
            .unwrap();
        assert_eq!(r.state, RequestState::Rejected);
        assert_eq!(r.decided_by.as_deref(), Some("custodian:c2"));
        assert_eq!(r.reason.as_deref(), Some("not planned"));
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());
        w.next_step();
        assert!(matches!(
            w.approve(3, &req).await,
            Err(ServiceError::FailedPrecondition("the request was rejected"))
        ));
        // The requester withdraws another.
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        let r = w.svc.reject(&admin(), &req.id, "typo").await.unwrap();
        assert_eq!(r.state, RequestState::Rejected);
        assert_eq!(w.key("phi").await.versions.len(), 1);
    }

    #[tokio::test]
    async fn disable_through_quorum_and_at_once_without_gates() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.disable_version(&admin(), "phi", 1).await.unwrap());
        assert_eq!(req.parameters.get("version").map(String::as_str), Some("1"));
        // Enabling is not in the default policy; an enabled version needs nothing.
        assert!(matches!(
            w.svc.enable_version(&admin(), "phi", 1).await.unwrap(),
            AdminOutcome::Done(_)
        ));
        assert!(matches!(
            w.svc.disable_version(&admin(), "phi", 7).await,
            Err(ServiceError::NotFound(_))
        ));
        w.next_step();
        for n in [3, 4, 5] {
            w.approve(n, &req).await.unwrap();
        }
        let key = w.key("phi").await;
        assert_eq!(key.versions[0].state, VersionState::Disabled);
        assert_eq!(
            w.svc.get_request(&admin(), &req.id).await.unwrap().state,
            RequestState::Executed
        );

        let w = world(false).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        assert!(matches!(
            w.svc.rotate_key(&admin(), "phi").await.unwrap(),
            AdminOutcome::Done(k) if k.primary_version == 2
        ));
        assert!(matches!(
            w.svc.disable_version(&admin(), "phi", 1).await.unwrap(),
            AdminOutcome::Done(k) if k.versions[0].state == VersionState::Disabled
        ));
    }

    /// Seals custodian n's share for `req` and stores the approval directly, as if the
    /// process died right after committing it.
    async fn stored_approval(w: &World, n: usize, req: &ApprovalRecord, share: &[u8]) {
        let engine = w.svc.engine().unwrap();
        let name = format!("c{n}");
        let sealed = engine
            .seal_meta(
                approvals::share_aad(&req.id, &name),
                Zeroizing::new(share.to_vec()),
            )
            .await
            .unwrap();
        w.store
            .add_approval(&req.id, &name, &sealed, w.clock.now_ms())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_approved_request_left_unrun_completes_at_the_next_unseal() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        for n in [1, 2, 5] {
            let share = shamir::decode(&w.kits[n - 1].share).unwrap();
            stored_approval(&w, n, &req, share.expose()).await;
        }
        assert_eq!(w.key("phi").await.versions.len(), 1);
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        for n in 1..=3 {
            let code = w.code(n).await;
            w.svc
                .unseal(&custodian(n), &w.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
        let r = w.svc.get_request(&admin(), &req.id).await.unwrap();
        assert_eq!(r.state, RequestState::Executed);
        assert_eq!(w.key("phi").await.versions.len(), 2);
        assert!(w.store.ready_requests().await.unwrap().is_empty());
        // A second unseal finds nothing more to do.
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        for n in 1..=3 {
            let code = w.code(n).await;
            w.svc
                .unseal(&custodian(n), &w.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
        assert_eq!(w.key("phi").await.versions.len(), 2);
    }

    #[tokio::test]
    async fn shares_that_do_not_rebuild_the_secret_fail_the_request() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        for n in [1, 2] {
            let share = shamir::decode(&w.kits[n - 1].share).unwrap();
            stored_approval(&w, n, &req, share.expose()).await;
        }
        // A third share with the right x but wrong y (as a tampered row would be, had it
        // passed the HSM's authentication).
        let mut forged = vec![3u8];
        forged.extend_from_slice(&[0x42; 32]);
        stored_approval(&w, 3, &req, &forged).await;
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        for n in 1..=3 {
            let code = w.code(n).await;
            w.svc
                .unseal(&custodian(n), &w.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
        let r = w.svc.get_request(&admin(), &req.id).await.unwrap();
        assert_eq!(r.state, RequestState::Failed);
        assert_eq!(
            r.reason.as_deref(),
            Some("the approvals' shares do not rebuild the quorum secret")
        );
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());
        assert_eq!(w.key("phi").await.versions.len(), 1);
    }

    #[tokio::test]
    async fn a_token_limited_to_other_keys_sees_no_request_about_this_one() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        let mut billing = principal("dev-admin", &["admin"]);
        billing.principal = Arc::new(Principal {
            key_globs: vec!["billing/*".into()],
            ..(*billing.principal).clone()
        });
        assert!(matches!(
            w.svc.get_request(&billing, &req.id).await,
            Err(ServiceError::PermissionDenied)
        ));
        assert!(w
            .svc
            .list_requests(&billing, "", 0, "")
            .await
            .unwrap()
            .0
            .is_empty());
        assert_eq!(
            w.svc
                .list_requests(&admin(), "", 0, "")
                .await
                .unwrap()
                .0
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn approvals_need_the_service_unsealed() {
        let w = world(true).await;
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        let req = pending(w.svc.rotate_key(&admin(), "phi").await.unwrap());
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        assert!(matches!(
            w.approve(4, &req).await,
            Err(ServiceError::Unavailable("sealed"))
        ));
        assert!(matches!(
            w.svc.get_request(&admin(), &req.id).await,
            Err(ServiceError::Unavailable("sealed"))
        ));
    }

    /// The TOTP code now of a kit of generation `generation`.
    async fn kit_code(w: &World, kit: &CustodianKit, generation: i64) -> String {
        let rec = w.store.custodian(&kit.name, generation).await.unwrap();
        let share = shamir::decode(&kit.share).unwrap();
        let secret = crypto::open_totp(&kit.name, &share, &rec.totp_sealed).unwrap();
        totp::hotp(&secret, totp::step_at(w.clock.now_ms()) as u64)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_rekey_waits_for_the_quorum_and_hands_the_new_kits_to_the_executing_approval() {
        let w = world(true).await;
        let new = names(&["n1", "n2", "n3"]);
        // Bad parameters are refused up front.
        for (k, list, shares) in [
            (1u8, new.clone(), None),
            (4, new.clone(), None),
            (2, names(&["n1", "n1"]), None),
            (2, names(&["n1", "N2"]), None),
            (2, names(&["n1", "a,b"]), None),
            (2, new.clone(), Some(4)),
        ] {
            assert!(matches!(
                w.svc
                    .request_rekey(&admin(), k, &list, shares, 2, &Default::default())
                    .await,
                Err(ServiceError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            w.svc
                .request_rekey(&custodian(1), 2, &new, None, 2, &Default::default())
                .await,
            Err(ServiceError::PermissionDenied)
        ));
        let req = w
            .svc
            .request_rekey(&admin(), 2, &new, Some(3), 2, &Default::default())
            .await
            .unwrap();
        assert_eq!(req.operation, Operation::Rekey);
        assert_eq!(
            req.parameters.get(PARAM_CUSTODIANS).map(String::as_str),
            Some("n1,n2,n3")
        );
        assert_eq!(
            req.digest,
            approvals::digest(Operation::Rekey, &req.parameters)
        );
        w.next_step();
        let o = w
            .svc
            .approve(
                &custodian(1),
                &req.id,
                &req.digest,
                &w.kits[0].share,
                &w.code(1).await,
            )
            .await
            .unwrap();
        assert!(o.new_kits.is_empty());
        w.approve(2, &req).await.unwrap();
        assert_eq!(w.svc.quorum_config().await.unwrap().unwrap().generation, 1);
        let o = w
            .svc
            .approve(
                &custodian(3),
                &req.id,
                &req.digest,
                &w.kits[2].share,
                &w.code(3).await,
            )
            .await
            .unwrap();
        assert_eq!(o.request.state, RequestState::Executed);
        assert_eq!(
            o.request
                .result
                .as_ref()
                .map(RequestResult::summary)
                .as_deref(),
            Some("rekeyed to 2 of 3, generation 2")
        );
        let kits = o.new_kits;
        assert_eq!(
            kits.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["n1", "n2", "n3"]
        );
        let cfg = w.svc.quorum_config().await.unwrap().unwrap();
        assert_eq!((cfg.generation, cfg.threshold, cfg.shares), (2, 2, 3));
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());
        // The stored request holds no secret.
        let stored = format!("{:?}", w.store.request(&req.id).await.unwrap());
        for k in &kits {
            assert!(!stored.contains(k.share.as_str()));
        }
        // Every generation-1 custodian token is revoked; the new ones are live.
        let tokens = w.svc.tokens.list_tokens().await.unwrap();
        for t in tokens
            .iter()
            .filter(|t| t.principal.starts_with(CUSTODIAN_PREFIX))
        {
            let new_gen = ["n1", "n2", "n3"]
                .iter()
                .any(|n| t.principal == format!("{CUSTODIAN_PREFIX}{n}"));
            assert_eq!(t.revoked_at.is_none(), new_gen, "{}", t.principal);
        }
        // No second run.
        w.next_step();
        assert!(matches!(
            w.approve(4, &req).await,
            Err(ServiceError::FailedPrecondition(_))
        ));

        // Old shares no longer unseal; two new kits do, and keys still work.
        w.svc
            .create_key(&admin(), "phi", "", Default::default())
            .await
            .unwrap();
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        let old = w.code(1).await;
        assert!(w
            .svc
            .unseal(&custodian(1), &w.kits[0].share, &old)
            .await
            .is_err());
        let as_new = |n: &str| principal(&format!("{CUSTODIAN_PREFIX}{n}"), &["custodian"]);
        // An old share under a new identity fails the new commitment.
        let c = kit_code(&w, &kits[0], 2).await;
        assert!(w
            .svc
            .unseal(&as_new("n1"), &w.kits[0].share, &c)
            .await
            .is_err());
        w.next_step();
        for k in &kits[1..] {
            let c = kit_code(&w, k, 2).await;
            w.svc.unseal(&as_new(&k.name), &k.share, &c).await.unwrap();
        }
        assert!(w.svc.engine().is_ok());
        assert_eq!(w.key("phi").await.versions.len(), 1);
    }

    #[tokio::test]
    async fn an_approved_rekey_found_at_unseal_fails_rather_than_run_silently() {
        let w = world(true).await;
        let req = w
            .svc
            .request_rekey(
                &admin(),
                2,
                &names(&["n1", "n2", "n3"]),
                None,
                2,
                &Default::default(),
            )
            .await
            .unwrap();
        for n in [1, 2, 5] {
            let share = shamir::decode(&w.kits[n - 1].share).unwrap();
            stored_approval(&w, n, &req, share.expose()).await;
        }
        w.svc.seal(&custodian(1)).await.unwrap();
        w.next_step();
        for n in 1..=3 {
            let code = w.code(n).await;
            w.svc
                .unseal(&custodian(n), &w.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
        let r = w.svc.get_request(&admin(), &req.id).await.unwrap();
        assert_eq!(r.state, RequestState::Failed);
        assert_eq!(r.reason.as_deref(), Some(REKEY_NEEDS_LIVE_APPROVER));
        assert!(w.store.sealed_shares(&req.id).await.unwrap().is_empty());
        assert_eq!(w.svc.quorum_config().await.unwrap().unwrap().generation, 1);
    }

    #[tokio::test]
    async fn rekey_needs_a_real_quorum() {
        let w = world(false).await;
        assert!(matches!(
            w.svc
                .request_rekey(
                    &admin(),
                    2,
                    &names(&["n1", "n2"]),
                    None,
                    2,
                    &Default::default()
                )
                .await,
            Err(ServiceError::FailedPrecondition(_))
        ));
    }
}
