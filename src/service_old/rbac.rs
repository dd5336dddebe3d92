//! Access control in the service (DESIGN §5): the policy in force, time-bound role grants
//! (elevation, break-glass), MFA and per-role limits around the one decision
//! [`Policy::authorize`]; and the use cases that change them (`UpdatePolicy`, `Elevate`,
//! `BreakGlass`, `EnrollTotp`, reviews).
//!
//! Invariants:
//! - Every use case calls [`KeyService::authorize`] before it reads anything that depends
//!   on a key's existence, so a refusal looks and takes the same whether or not the key
//!   exists.
//! - The policy in force is the newest approved one stored in the database if there is
//!   any (every node adopts it within [`REFRESH`]); otherwise the one read from the policy
//!   files at start or SIGHUP. A bad policy, from a file or a request, is refused and the
//!   policy in force stays.
//! - A grant counts only until its `expires_at`, judged on every request with the clock.
//! - A TOTP secret exists in clear only while a code is checked or shown once at
//!   enrolment; it rests sealed under `arca:meta` with AAD binding the principal. Every
//!   failed MFA attempt (missing, wrong or replayed code) is counted; 5 in 15 minutes lock
//!   the principal out for 15 minutes and log an ERROR.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::seal::{FAILURE_LIMIT, FAILURE_WINDOW_MS, LOCKOUT_MS};
use super::{ApprovalRecord, Caller, KeyService, Result, ServiceError};
use crate::authz::policy::{
    Action, Allowed, Decision, Policy, PolicyError, Request, Subject, DEFAULT_ELEVATION_MS,
};
use crate::authz::ratelimit::RoleLimiter;
use crate::keys::EncryptionContext;
use crate::quorum::approvals::{Operation, Parameters, QuorumApproved};
use crate::quorum::{crypto, totp};
use crate::store::{GrantRecord, MfaFailure, ReviewRecord, StoreError};

/// Parameter of `UpdatePolicy`: the new policy document (so the digest covers it).
pub const PARAM_POLICY: &str = "policy";
/// Parameter of `Elevate`: who gets the role.
pub const PARAM_PRINCIPAL: &str = "principal";
/// Parameter of `Elevate`: the role.
pub const PARAM_ROLE: &str = "role";
/// Parameter of `Elevate`: seconds the grant lasts from its approval.
pub const PARAM_DURATION: &str = "duration_seconds";
/// Parameter of `Elevate`: why.
pub const PARAM_REASON: &str = "reason";

/// How often a node looks for a newly approved policy and for grants made elsewhere.
pub const REFRESH: Duration = Duration::from_millis(500);
/// Longest reason of an elevation or break-glass, in bytes.
pub const MAX_REASON: usize = 1024;

/// The access-control state of one node.
pub(super) struct AccessControl {
    policy: RwLock<Arc<Policy>>,
    /// The stored policy version in force (0: the files').
    seq: AtomicI64,
    grants: RwLock<(Option<Instant>, Arc<Vec<GrantRecord>>)>,
    refreshing: tokio::sync::Mutex<()>,
    limiter: RoleLimiter,
}

impl AccessControl {
    pub(super) fn new(policy: Policy) -> Self {
        AccessControl {
            policy: RwLock::new(Arc::new(policy)),
            seq: AtomicI64::new(0),
            grants: RwLock::new((None, Arc::new(Vec::new()))),
            refreshing: tokio::sync::Mutex::new(()),
            limiter: RoleLimiter::default(),
        }
    }
}

/// What `UpdatePolicy` and `Elevate` answer: done at once (no quorum here), or the
/// approval request made for it.
pub enum AccessOutcome {
    /// Applied: a one-line description.
    Done(String),
    /// Waiting for K-of-N approval.
    Pending(Box<ApprovalRecord>),
}

/// A TOTP enrolment, shown once. No `Debug`: it holds the secret.
pub struct TotpEnrolled {
    /// `otpauth://totp/…` with the secret, for an authenticator app.
    pub uri: Zeroizing<String>,
}

fn totp_aad(principal: &str) -> Vec<u8> {
    let mut aad = b"arca:totp:".to_vec();
    aad.extend_from_slice(principal.as_bytes());
    aad
}

fn random_id(prefix: &str) -> Result<String> {
    let raw = crypto::random::<16>().map_err(|e| ServiceError::Internal(Box::new(e)))?;
    Ok(format!("{prefix}{}", hex::encode(raw.as_ref())))
}

fn check_reason(reason: &str) -> Result<&str> {
    let r = reason.trim();
    if r.is_empty() || r.len() > MAX_REASON || r.chars().any(char::is_control) {
        return Err(ServiceError::InvalidArgument(
            "a reason of 1 to 1024 bytes (one line) is required",
        ));
    }
    Ok(r)
}

impl KeyService {
    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.access
            .policy
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    fn set_policy(&self, policy: Policy, seq: i64) {
        let digest = policy.digest().to_string();
        if let Ok(mut p) = self.access.policy.write() {
            *p = Arc::new(policy);
        }
        self.access.seq.store(seq, Ordering::SeqCst);
        tracing::info!(digest, seq, "access policy in force");
    }

    /// SIGHUP: reads the policy files of `dir` again. A bad file is refused (the error
    /// says why) and the policy in force stays; so does an approved policy stored in the
    /// database, which only `UpdatePolicy` replaces.
    pub async fn reload_policy(&self, dir: &Path) -> std::result::Result<String, PolicyError> {
        let policy = Policy::load_dir(dir)?;
        if self.access.seq.load(Ordering::SeqCst) > 0 {
            return Err(PolicyError::Invalid(
                "an approved policy (UpdatePolicy) is in force; the files stay unused".into(),
            ));
        }
        let digest = policy.digest().to_string();
        self.set_policy(policy, 0);
        Ok(digest)
    }

    /// Adopts a newer approved policy and reloads grants, at most once per [`REFRESH`]
    /// (or at once with `force`). A store outage keeps what is in force.
    async fn refresh_access(&self, force: bool) {
        let (never, stale) = self
            .access
            .grants
            .read()
            .map(|g| (g.0.is_none(), g.0.is_none_or(|at| at.elapsed() >= REFRESH)))
            .unwrap_or((true, true));
        if !(stale || force) {
            return;
        }
        // Until the first load, every request waits for it: an approved policy in the
        // database must apply from the first request on.
        let force = force || never;
        let _one = match self.access.refreshing.try_lock() {
            Ok(g) => g,
            // Another request refreshes; this one uses what is in force.
            Err(_) if !force => return,
            Err(_) => self.access.refreshing.lock().await,
        };
        match self.quorum.latest_policy().await {
            Ok(Some(v)) if v.seq > self.access.seq.load(Ordering::SeqCst) => {
                match Policy::parse(&v.text) {
                    Ok(p) => self.set_policy(p, v.seq),
                    Err(e) => {
                        tracing::error!(seq = v.seq, error = %e, "stored access policy refused; the policy in force stays")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the stored access policy"),
        }
        match self.quorum.active_grants(self.clock.now_ms()).await {
            Ok(g) => {
                if let Ok(mut slot) = self.access.grants.write() {
                    *slot = (Some(Instant::now()), Arc::new(g));
                }
            }
            Err(e) => {
                // Try again after REFRESH, not on every request; the grants known stay.
                if let Ok(mut slot) = self.access.grants.write() {
                    slot.0 = Some(Instant::now());
                }
                tracing::warn!(error = %e, "cannot read role grants")
            }
        }
    }

    /// Loads the approved policy (if any) and the grants from the store before the
    /// server answers its first request.
    pub async fn load_access(&self) {
        self.refresh_access(true).await;
    }

    /// The roles `caller` holds now: bound by the policy (narrowed by its token), plus
    /// its unexpired grants of roles the policy still defines.
    fn roles_held(&self, policy: &Policy, caller: &Caller) -> Vec<String> {
        let p = &caller.principal;
        let mut roles = policy.roles_of(&p.name, &p.roles);
        let now = self.clock.now_ms();
        if let Ok(g) = self.access.grants.read() {
            for grant in g.1.iter() {
                if grant.principal == p.name
                    && grant.expires_at > now
                    && policy.role(&grant.role).is_some()
                    && !roles.contains(&grant.role)
                {
                    roles.push(grant.role.clone());
                }
            }
        }
        roles
    }

    /// The decision alone (no MFA, no rate limit): whether `caller` may do `action`
    /// (on `key`, with `context`). Also applies the token's key globs.
    pub(super) fn decide(
        &self,
        caller: &Caller,
        action: Action,
        key: Option<&str>,
        context: Option<&EncryptionContext>,
    ) -> Option<Allowed> {
        if action.is_key_scoped() && key.is_some_and(|k| !caller.principal.may_use_key(k)) {
            return None;
        }
        let policy = self.policy();
        let roles = self.roles_held(&policy, caller);
        match policy.authorize(
            Subject {
                name: &caller.principal.name,
                roles: &roles,
            },
            Request {
                action,
                key,
                context,
            },
        ) {
            Decision::Allow(a) => Some(a),
            Decision::Deny => None,
        }
    }

    /// Authorizes `caller` for `action` (on `key`, with `context`): the policy decision,
    /// then MFA if the allowing role needs it, then the role's rate limit.
    /// `PERMISSION_DENIED` before anything else is read.
    pub async fn authorize(
        &self,
        caller: &Caller,
        action: Action,
        key: Option<&str>,
        context: Option<&EncryptionContext>,
    ) -> Result<()> {
        self.authorize_with(caller, action, key, context, true)
            .await
    }

    async fn authorize_with(
        &self,
        caller: &Caller,
        action: Action,
        key: Option<&str>,
        context: Option<&EncryptionContext>,
        mfa: bool,
    ) -> Result<()> {
        self.refresh_access(false).await;
        let Some(allowed) = self.decide(caller, action, key, context) else {
            tracing::info!(
                request_id = %caller.request_id,
                principal = %caller.principal.name,
                action = action.as_str(),
                "permission denied"
            );
            return Err(ServiceError::PermissionDenied);
        };
        if let Some(limit) = allowed.limit {
            self.access
                .limiter
                .check(&allowed.role, &caller.principal.name, limit, Instant::now())
                .map_err(ServiceError::RateLimited)?;
        }
        if mfa && allowed.mfa {
            self.check_mfa(caller).await?;
        }
        Ok(())
    }

    /// Checks the caller's `x-arca-totp` code against its enrolment (one use per step),
    /// counting every failure towards lock-out.
    async fn check_mfa(&self, caller: &Caller) -> Result<()> {
        let name = &caller.principal.name;
        let now = self.clock.now_ms();
        let Some(enrolment) = self.quorum.totp_enrolment(name).await? else {
            return Err(ServiceError::MfaRequired(
                "this role needs MFA: enrol with EnrollTotp first",
            ));
        };
        if enrolment.locked_until.is_some_and(|t| t > now) {
            return Err(ServiceError::MfaRequired(
                "locked out after repeated MFA failures; try later",
            ));
        }
        let Some(code) = caller.mfa.as_ref() else {
            self.count_mfa_failure(name, "missing").await?;
            return Err(ServiceError::MfaRequired(
                "this role needs a TOTP code in x-arca-totp",
            ));
        };
        let engine = self.engine()?;
        let secret = match engine.open_meta(totp_aad(name), enrolment.sealed).await {
            Ok(s) => s,
            Err(e) => return Err(ServiceError::Internal(Box::new(e))),
        };
        match totp::verify(&secret, code.expose(), now, enrolment.last_step) {
            Ok(step) => match self.quorum.use_principal_totp_step(name, step).await {
                Ok(()) => Ok(()),
                Err(StoreError::Conflict(_)) => {
                    self.count_mfa_failure(name, "replay").await?;
                    Err(ServiceError::MfaRequired("TOTP code rejected"))
                }
                Err(e) => Err(e.into()),
            },
            Err(_) => {
                self.count_mfa_failure(name, "totp").await?;
                Err(ServiceError::MfaRequired("TOTP code rejected"))
            }
        }
    }

    async fn count_mfa_failure(&self, principal: &str, reason: &str) -> Result<()> {
        let now = self.clock.now_ms();
        let n = self
            .quorum
            .record_mfa_failure(&MfaFailure {
                principal,
                at: now,
                reason,
                since: now - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
                lock_until: now + LOCKOUT_MS,
            })
            .await?;
        tracing::warn!(principal, reason, failures = n, "MFA check failed");
        if n >= FAILURE_LIMIT {
            tracing::error!(
                alert = "mfa-lockout",
                principal,
                failures = n,
                "principal locked out after repeated MFA failures"
            );
        }
        Ok(())
    }

    /// Enrols the caller for TOTP (a new secret, shown once as an `otpauth://` URI). A
    /// principal already enrolled must present a valid current code to re-enrol.
    pub async fn enroll_totp(&self, caller: &Caller) -> Result<TotpEnrolled> {
        let engine = self.engine()?;
        self.authorize_with(caller, Action::EnrollTotp, None, None, false)
            .await?;
        let name = &caller.principal.name;
        if self.quorum.totp_enrolment(name).await?.is_some() {
            self.check_mfa(caller).await?;
        }
        let secret = crypto::random::<20>().map_err(|e| ServiceError::Internal(Box::new(e)))?;
        engine.ensure_meta_key().await?;
        let sealed = engine
            .seal_meta(totp_aad(name), Zeroizing::new(secret.to_vec()))
            .await?;
        self.quorum
            .enroll_totp(name, &sealed, self.clock.now_ms())
            .await?;
        tracing::warn!(principal = %name, "TOTP enrolled");
        Ok(TotpEnrolled {
            uri: Zeroizing::new(totp::otpauth_uri(name, secret.as_ref())),
        })
    }

    /// Replaces the access policy with `text` (one policy document): refused at once if
    /// it does not load; a quorum operation where the policy says so.
    pub async fn update_policy(&self, caller: &Caller, text: &str) -> Result<AccessOutcome> {
        self.engine()?;
        self.authorize(caller, Action::UpdatePolicy, None, None)
            .await?;
        let policy = Policy::parse(text).map_err(ServiceError::InvalidPolicy)?;
        if self.needs_quorum(Operation::UpdatePolicy) {
            let mut params = Parameters::new();
            params.insert(PARAM_POLICY.to_string(), text.to_string());
            let req = self
                .open_request(caller, Operation::UpdatePolicy, params)
                .await?;
            return Ok(AccessOutcome::Pending(Box::new(req)));
        }
        let seq = self.quorum.insert_policy(text, self.clock.now_ms()).await?;
        self.set_policy(policy, seq);
        Ok(AccessOutcome::Done(format!(
            "access policy version {seq} in force"
        )))
    }

    /// Runs an approved `UpdatePolicy`.
    pub(super) async fn run_update_policy(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
    ) -> Result<String> {
        let text = req
            .parameters
            .get(PARAM_POLICY)
            .ok_or(ServiceError::InvalidArgument("invalid request parameters"))?;
        let policy = Policy::parse(text).map_err(ServiceError::InvalidPolicy)?;
        let seq = self
            .quorum
            .complete_update_policy(&req.id, ok, text, self.clock.now_ms())
            .await
            .map_err(super::approvals::request_conflict)?;
        self.set_policy(policy, seq);
        Ok(format!("access policy version {seq} in force"))
    }

    /// Asks for `role` for `duration_ms` (0: the role's maximum, at most 1 h): a quorum
    /// operation; once approved, a grant that expires by itself.
    pub async fn elevate(
        &self,
        caller: &Caller,
        role: &str,
        duration_ms: i64,
        reason: &str,
    ) -> Result<AccessOutcome> {
        self.engine()?;
        self.authorize(caller, Action::Elevate, None, None).await?;
        let reason = check_reason(reason)?;
        let policy = self.policy();
        let max = policy.role(role).and_then(|r| r.max_elevation_ms()).ok_or(
            ServiceError::InvalidArgument("the policy allows no elevation to this role"),
        )?;
        let duration = match duration_ms {
            0 => max.min(DEFAULT_ELEVATION_MS),
            d if (1000..=max).contains(&d) => d,
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "duration must be from 1s to the role's max_elevation",
                ))
            }
        };
        let mut params = Parameters::new();
        params.insert(PARAM_PRINCIPAL.to_string(), caller.principal.name.clone());
        params.insert(PARAM_ROLE.to_string(), role.to_string());
        params.insert(PARAM_DURATION.to_string(), (duration / 1000).to_string());
        params.insert(PARAM_REASON.to_string(), reason.to_string());
        if self.needs_quorum(Operation::Elevate) {
            let req = self
                .open_request(caller, Operation::Elevate, params)
                .await?;
            return Ok(AccessOutcome::Pending(Box::new(req)));
        }
        let grant = self.elevation_grant(&params, None)?;
        self.quorum.insert_grant(&grant).await?;
        self.refresh_access(true).await;
        tracing::warn!(principal = %grant.principal, role = %grant.role, grant = %grant.id, "role elevated (no quorum in this mode)");
        Ok(AccessOutcome::Done(format!(
            "{} holds role {} until {}",
            grant.principal,
            grant.role,
            crate::clock::rfc3339(grant.expires_at)
        )))
    }

    /// The grant an elevation with `params` makes now (checked against the policy in
    /// force: it may have changed since the request).
    fn elevation_grant(&self, params: &Parameters, request: Option<&str>) -> Result<GrantRecord> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let principal = params.get(PARAM_PRINCIPAL).ok_or(BAD)?;
        let role = params.get(PARAM_ROLE).ok_or(BAD)?;
        let secs: i64 = params
            .get(PARAM_DURATION)
            .and_then(|d| d.parse().ok())
            .ok_or(BAD)?;
        let reason = params.get(PARAM_REASON).ok_or(BAD)?;
        let max = self
            .policy()
            .role(role)
            .and_then(|r| r.max_elevation_ms())
            .ok_or(ServiceError::FailedPrecondition(
                "the policy in force allows no elevation to this role",
            ))?;
        let duration = secs.saturating_mul(1000);
        if !(1000..=max).contains(&duration) {
            return Err(ServiceError::FailedPrecondition(
                "the duration exceeds the role's max_elevation in force",
            ));
        }
        let now = self.clock.now_ms();
        Ok(GrantRecord {
            id: random_id("grant_")?,
            principal: principal.clone(),
            role: role.clone(),
            kind: "elevation".into(),
            reason: reason.clone(),
            request_id: request.map(str::to_string),
            created_at: now,
            expires_at: now + duration,
        })
    }

    /// Runs an approved `Elevate`: the grant starts now.
    pub(super) async fn run_elevation(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
    ) -> Result<String> {
        let grant = self.elevation_grant(&req.parameters, Some(&req.id))?;
        self.quorum
            .complete_elevation(&req.id, ok, &grant, self.clock.now_ms())
            .await
            .map_err(super::approvals::request_conflict)?;
        self.refresh_access(true).await;
        tracing::warn!(
            request = %req.id,
            principal = %grant.principal,
            role = %grant.role,
            grant = %grant.id,
            expires_at = %crate::clock::rfc3339(grant.expires_at),
            "role elevation granted"
        );
        Ok(format!(
            "{} holds role {} until {}",
            grant.principal,
            grant.role,
            crate::clock::rfc3339(grant.expires_at)
        ))
    }

    /// A principal listed in `[break_glass]` takes the break-glass role for
    /// `duration_ms` (0: the maximum, at most 1 h), with no approval: an alert at once and
    /// a review that stays open until an auditor closes it.
    pub async fn break_glass(
        &self,
        caller: &Caller,
        reason: &str,
        duration_ms: i64,
    ) -> Result<(GrantRecord, ReviewRecord)> {
        self.engine()?;
        self.authorize(caller, Action::BreakGlass, None, None)
            .await?;
        let reason = check_reason(reason)?;
        let policy = self.policy();
        let bg = policy.break_glass().ok_or(ServiceError::PermissionDenied)?;
        let duration = match duration_ms {
            0 => bg.max_ms,
            d if (1000..=bg.max_ms).contains(&d) => d,
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "duration must be from 1s to the break-glass maximum",
                ))
            }
        };
        let now = self.clock.now_ms();
        let grant = GrantRecord {
            id: random_id("grant_")?,
            principal: caller.principal.name.clone(),
            role: bg.role.clone(),
            kind: "break-glass".into(),
            reason: reason.to_string(),
            request_id: None,
            created_at: now,
            expires_at: now + duration,
        };
        let review = self.quorum.break_glass(&grant, &random_id("rev_")?).await?;
        self.refresh_access(true).await;
        tracing::error!(
            alert = "break-glass",
            principal = %grant.principal,
            role = %grant.role,
            grant = %grant.id,
            review = %review.id,
            reason = %grant.reason,
            expires_at = %crate::clock::rfc3339(grant.expires_at),
            "BREAK-GLASS: emergency role taken; review open until an auditor closes it"
        );
        Ok((grant, review))
    }

    /// Break-glass reviews, newest first.
    pub async fn list_reviews(
        &self,
        caller: &Caller,
        open_only: bool,
    ) -> Result<Vec<ReviewRecord>> {
        self.authorize(caller, Action::ListReviews, None, None)
            .await?;
        Ok(self.quorum.list_reviews(open_only).await?)
    }

    /// An auditor closes a review with a note. Nobody closes the review of their own
    /// break-glass.
    pub async fn close_review(
        &self,
        caller: &Caller,
        id: &str,
        note: &str,
    ) -> Result<ReviewRecord> {
        self.authorize(caller, Action::CloseReview, None, None)
            .await?;
        let note = check_reason(note)?;
        let open = self.quorum.list_reviews(false).await?;
        let review = open
            .iter()
            .find(|r| r.id == id)
            .ok_or(ServiceError::NotFound("review not found"))?;
        if review.principal == caller.principal.name {
            return Err(ServiceError::PermissionDenied);
        }
        let rec = match self
            .quorum
            .close_review(id, &caller.principal.name, note, self.clock.now_ms())
            .await
        {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(ServiceError::NotFound("review not found")),
            Err(StoreError::Conflict(_)) => {
                return Err(ServiceError::FailedPrecondition("review already closed"))
            }
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(review = id, by = %caller.principal.name, "break-glass review closed");
        Ok(rec)
    }

    /// Whether `caller` may list `key` (ListKeys filters by it).
    pub(super) fn may_list(&self, caller: &Caller, key: &str) -> bool {
        self.decide(caller, Action::ListKeys, Some(key), None)
            .is_some()
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
    use crate::service::{HsmOpener, PinSetter, SealControl, ServiceConfig};
    use crate::store::{AccessStore, SqlStore};

    const T0: i64 = 1_800_000_000_000;

    const POLICY: &str = r#"
version = 1
[roles.elevator]
[[roles.elevator.allow]]
operations = ["Elevate", "EnrollTotp"]
[roles.reader]
max_elevation = "10m"
[[roles.reader.allow]]
operations = ["GetKey"]
keys = ["*"]
[roles.ops]
mfa = true
[[roles.ops.allow]]
operations = ["RotateKey"]
keys = ["*"]
[[bindings]]
principals = ["p", "m"]
roles = ["elevator"]
[[bindings]]
principals = ["m"]
roles = ["ops"]
"#;

    struct World {
        _dir: tempfile::TempDir,
        store: Arc<SqlStore>,
        svc: KeyService,
        clock: Arc<ManualClock>,
    }

    async fn world() -> World {
        let clock = Arc::new(ManualClock::at(T0));
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("a.db"))
                .await
                .unwrap(),
        );
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
                access_policy: Policy::parse(POLICY).unwrap(),
                ..ServiceConfig::default()
            },
        );
        svc.open_with_pin(AuthPin::from("pin".to_string()))
            .await
            .unwrap();
        World {
            _dir: dir,
            store,
            svc,
            clock,
        }
    }

    fn base32_decode(s: &str) -> Vec<u8> {
        const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let (mut buf, mut bits, mut out) = (0u32, 0, Vec::new());
        for c in s.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
            buf = (buf << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
            }
        }
        out
    }

    fn caller(name: &str, code: Option<String>) -> Caller {
        Caller {
            principal: Arc::new(Principal {
                name: name.to_string(),
                method: AuthMethod::Token {
                    token_id: "t".into(),
                },
                roles: Vec::new(),
                key_globs: Vec::new(),
            }),
            request_id: "r".into(),
            peer: crate::authz::Peer::default(),
            mfa: code.map(crate::authz::TotpCode::new),
        }
    }

    #[tokio::test]
    async fn an_elevation_expires_with_the_clock() {
        let w = world().await;
        let p = caller("p", None);
        assert!(w.svc.decide(&p, Action::GetKey, Some("k"), None).is_none());
        // Over the role's maximum, and to a role that may not be elevated to.
        for (role, ms) in [("reader", 11 * 60_000), ("ops", 60_000)] {
            assert!(matches!(
                w.svc.elevate(&p, role, ms, "why").await,
                Err(ServiceError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            w.svc.elevate(&p, "reader", 60_000, " ").await,
            Err(ServiceError::InvalidArgument(_))
        ));
        // No quorum gates here (dev mode): granted at once.
        let AccessOutcome::Done(what) = w
            .svc
            .elevate(&p, "reader", 60_000, "ticket 1")
            .await
            .unwrap()
        else {
            panic!("no quorum here");
        };
        assert!(what.contains("holds role reader"), "{what}");
        assert!(w.svc.decide(&p, Action::GetKey, Some("k"), None).is_some());
        // Someone else does not hold it.
        assert!(w
            .svc
            .decide(&caller("m", None), Action::GetKey, Some("k"), None)
            .is_none());
        w.clock.advance(60_000);
        assert!(w.svc.decide(&p, Action::GetKey, Some("k"), None).is_none());
    }

    #[tokio::test]
    async fn mfa_lockout_lasts_fifteen_minutes() {
        let w = world().await;
        let uri = w.svc.enroll_totp(&caller("m", None)).await.unwrap().uri;
        let secret = base32_decode(
            uri.split("secret=")
                .nth(1)
                .and_then(|s| s.split('&').next())
                .unwrap(),
        );
        let code =
            |clock: &ManualClock| Some(totp::hotp(&secret, totp::step_at(clock.now_ms()) as u64));
        for _ in 0..5 {
            assert!(matches!(
                w.svc
                    .authorize(&caller("m", None), Action::RotateKey, Some("k"), None)
                    .await,
                Err(ServiceError::MfaRequired(_))
            ));
        }
        let e = w
            .svc
            .authorize(
                &caller("m", code(&w.clock)),
                Action::RotateKey,
                Some("k"),
                None,
            )
            .await;
        assert!(matches!(e, Err(ServiceError::MfaRequired(m)) if m.contains("locked out")));
        w.clock.advance(LOCKOUT_MS + 1);
        w.svc
            .authorize(
                &caller("m", code(&w.clock)),
                Action::RotateKey,
                Some("k"),
                None,
            )
            .await
            .unwrap();
        // The same step again is a replay.
        assert!(w
            .svc
            .authorize(
                &caller("m", code(&w.clock)),
                Action::RotateKey,
                Some("k"),
                None
            )
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_approved_policy_wins_over_the_files() {
        let w = world().await;
        let p = caller("p", None);
        assert!(w.svc.decide(&p, Action::Elevate, None, None).is_some());
        // Another node approved a policy in which p holds nothing.
        w.store
            .insert_policy("version = 1\n[roles.none]\n", w.clock.now_ms())
            .await
            .unwrap();
        w.svc.refresh_access(true).await;
        assert!(w.svc.decide(&p, Action::Elevate, None, None).is_none());
        // SIGHUP's files no longer replace it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), POLICY).unwrap();
        let e = w.svc.reload_policy(dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("approved policy"), "{e}");
        assert!(w.svc.decide(&p, Action::Elevate, None, None).is_none());
        // A bad stored policy is refused; the one in force stays.
        w.store
            .insert_policy("version = 1\n[roles.r]\n[[roles.r.allow]]\noperations = [\"UnwrapKey\", \"Approve\"]\nkeys = [\"*\"]\n", w.clock.now_ms())
            .await
            .unwrap();
        w.svc.refresh_access(true).await;
        assert!(w.svc.policy().role("none").is_some());
    }
}
