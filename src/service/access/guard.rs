//! The [`Guard`]: authentication with the per-principal rate limit, and the one
//! authorization decision of each call (DESIGN §5): the policy in force, time-bound role
//! grants (elevation, break-glass), the token's narrowing, the role's rate limit and MFA,
//! around [`Policy::authorize`].
//!
//! Invariants:
//! - Every use case authorizes once, before it reads anything that depends on a key's
//!   existence; the answer is a proof ([`Authorized`]) the store access requires.
//! - The policy in force is the newest approved one stored in the database if there is
//!   any (every node adopts it within [`REFRESH`]); otherwise the one read from the policy
//!   files at start or SIGHUP. A bad stored policy is refused and the policy in force stays.
//! - A grant counts only until its `expires_at`, judged on every request with the clock.
//! - A refusal is the same `PermissionDenied` whatever the reason.
//! - A stored policy or grant counts only if its state MAC verifies under the HSM (ADR
//!   12); one that does not is refused (alerted once) and everything else keeps serving.
//!   Sealed, no stored policy or grant counts.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::proof::{Act, Attempt, Authorized, Scope, Snapshot};
use crate::authz::policy::Action;
use crate::authz::policy::{Allowed, Decision, Policy, Request, Subject};
use crate::authz::ratelimit::{RateLimiter, RoleLimiter};
use crate::authz::stamp::{grant_row, policy_row, Checked};
use crate::authz::{AuthError, AuthMethod, Peer, Principal};
use crate::secret::BearerToken;
use crate::service::context::Context;
use crate::service::error::{Result, ServiceError};
use crate::service::serial::KeyedLock;
use crate::service::Caller;
use crate::store::GrantRecord;

/// How often a node looks for a newly approved policy and for grants made elsewhere.
pub const REFRESH: Duration = Duration::from_millis(500);

/// The access state of one node and the decision over it.
pub struct Guard {
    pub(super) ctx: Arc<Context>,
    policy: RwLock<Arc<Policy>>,
    /// The stored policy version in force (0: the files').
    seq: AtomicI64,
    grants: RwLock<(Option<Instant>, Arc<Vec<GrantRecord>>)>,
    refreshing: tokio::sync::Mutex<()>,
    limiter: RateLimiter,
    role_limiter: RoleLimiter,
    /// MFA attempt reservations, one at a time per principal on this node (the
    /// lock-out read and the reservation; the check itself runs outside: `mfa.rs`).
    pub(super) reserving: KeyedLock,
}

impl Guard {
    /// A guard over `ctx`, with the policy of `ctx.cfg` in force until a stored one is read.
    pub fn new(ctx: Arc<Context>) -> Self {
        Guard {
            policy: RwLock::new(Arc::new(ctx.cfg.access_policy.clone())),
            seq: AtomicI64::new(0),
            grants: RwLock::new((None, Arc::new(Vec::new()))),
            refreshing: tokio::sync::Mutex::new(()),
            limiter: RateLimiter::new(ctx.cfg.rate_limit),
            role_limiter: RoleLimiter::default(),
            reserving: KeyedLock::default(),
            ctx,
        }
    }

    /// Authenticates a request (a bearer token, else the client certificate) and applies
    /// the per-principal rate limit.
    pub async fn authenticate(
        &self,
        token: Option<BearerToken>,
        peer: &Peer,
    ) -> Result<Arc<Principal>> {
        let engine = self.ctx.engine.get().ok();
        let principal = match self
            .ctx
            .auth
            .authenticate(token, peer, engine.as_deref())
            .await
        {
            Ok(p) => p,
            Err(AuthError::Forged {
                why,
                first,
                token_id,
            }) => {
                self.ctx.refuse_state("tokens", &token_id, why, first);
                return Err(ServiceError::StateForged(why));
            }
            Err(e) => return Err(e.into()),
        };
        self.limiter
            .check(&principal.name, Instant::now())
            .map_err(ServiceError::RateLimited)?;
        Ok(principal)
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// The stored policy version in force (0: the files').
    pub fn policy_seq(&self) -> i64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Puts `policy` (stored as version `seq`, 0 for the files') in force.
    pub(crate) fn set_policy(&self, policy: Policy, seq: i64) {
        let digest = policy.digest().to_string();
        if let Ok(mut p) = self.policy.write() {
            *p = Arc::new(policy);
        }
        self.seq.store(seq, Ordering::SeqCst);
        tracing::info!(digest, seq, "access policy in force");
    }

    /// Adopts a newer approved policy and reloads grants, at most once per [`REFRESH`]
    /// (or at once with `force`). A store outage keeps what is in force.
    pub async fn refresh(&self, force: bool) {
        let (never, stale) = self
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
        let _one = match self.refreshing.try_lock() {
            Ok(g) => g,
            // Another request refreshes; this one uses what is in force.
            Err(_) if !force => return,
            Err(_) => self.refreshing.lock().await,
        };
        let system = self.ctx.system();
        let db = self.ctx.db(&system);
        // Stored policies and grants count only with a state MAC the HSM verifies (ADR
        // 12). Sealed, nothing can be verified: the files' policy and no grants, and the
        // next call looks again (so the stored policy applies from the unseal on).
        let Ok(engine) = self.ctx.engine.get() else {
            if let Ok(mut slot) = self.grants.write() {
                *slot = (None, Arc::new(Vec::new()));
            }
            return;
        };
        match db.latest_policy().await {
            Ok(Some(v)) if v.seq > self.policy_seq() => {
                match self
                    .ctx
                    .stamps
                    .check(&engine, policy_row(&v), v.mac.as_deref())
                    .await
                {
                    Ok(Checked::Good) => match Policy::parse(&v.text) {
                        Ok(p) => self.set_policy(p, v.seq),
                        Err(e) => {
                            tracing::error!(seq = v.seq, error = %e, "stored access policy refused; the policy in force stays")
                        }
                    },
                    Ok(Checked::Refused { why, first }) => {
                        self.ctx
                            .refuse_state("access_policies", &v.seq.to_string(), why, first)
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot check the stored access policy"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the stored access policy"),
        }
        match db.active_grants(self.ctx.clock.now_ms()).await {
            Ok(all) => {
                let mut good = Vec::with_capacity(all.len());
                for g in all {
                    match self
                        .ctx
                        .stamps
                        .check(&engine, grant_row(&g), g.mac.as_deref())
                        .await
                    {
                        Ok(Checked::Good) => good.push(g),
                        Ok(Checked::Refused { why, first }) => {
                            self.ctx.refuse_state("role_grants", &g.id, why, first)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, grant = %g.id, "cannot check a role grant; it does not count")
                        }
                    }
                }
                if let Ok(mut slot) = self.grants.write() {
                    *slot = (Some(Instant::now()), Arc::new(good));
                }
            }
            Err(e) => {
                // Try again after REFRESH, not on every request; the grants known stay.
                if let Ok(mut slot) = self.grants.write() {
                    slot.0 = Some(Instant::now());
                }
                tracing::warn!(error = %e, "cannot read role grants")
            }
        }
    }

    /// The policy in force and the roles `caller` holds now: bound by the policy (narrowed
    /// by its token), plus its unexpired grants of roles the policy still defines — also
    /// narrowed by the token: a token limited to some roles never carries a grant of
    /// another (an elevation does not reach a service's narrowed token).
    fn snapshot(&self, caller: &Caller) -> Snapshot {
        let policy = self.policy();
        let p = &caller.principal;
        let mut roles = policy.roles_of(&p.name, &p.roles);
        let now = self.ctx.clock.now_ms();
        if let Ok(g) = self.grants.read() {
            for grant in g.1.iter() {
                if grant.principal == p.name
                    && (p.roles.is_empty() || p.roles.contains(&grant.role))
                    && grant.expires_at > now
                    && policy.role(&grant.role).is_some()
                    && !roles.contains(&grant.role)
                {
                    roles.push(grant.role.clone());
                }
            }
        }
        Snapshot { policy, roles }
    }

    /// The policy's answer for `A` on `scope` (no MFA, no rate limit). Also applies the
    /// token's key globs.
    fn decide<A: Act>(snapshot: &Snapshot, who: &Principal, scope: &Scope) -> Option<Allowed> {
        let key = scope.key.as_ref().map(|k| k.as_str());
        if A::ACTION.is_key_scoped() && key.is_some_and(|k| !who.may_use_key(k)) {
            return None;
        }
        match snapshot.policy.authorize(
            Subject {
                name: &who.name,
                roles: &snapshot.roles,
            },
            Request {
                action: A::ACTION,
                key,
                context: scope.context.as_ref().map(|c| c.map()),
            },
        ) {
            Decision::Allow(a) => Some(a),
            Decision::Deny => None,
        }
    }

    fn denied<A: Act>(caller: &Caller) -> ServiceError {
        tracing::info!(
            request_id = %caller.request_id,
            principal = %caller.principal.name,
            action = A::ACTION.as_str(),
            "permission denied"
        );
        ServiceError::PermissionDenied
    }

    /// Authorizes `caller` for `A` on `scope`: the policy decision, then the role's rate
    /// limit, then MFA if the allowing role needs it. `PERMISSION_DENIED` before anything
    /// else is read.
    pub async fn authorize<A: Act>(&self, caller: &Caller, scope: Scope) -> Result<Authorized<A>> {
        self.refresh(false).await;
        let snapshot = self.snapshot(caller);
        self.finish(caller, snapshot, scope, true).await
    }

    /// As [`Guard::authorize`] without the MFA step: for enrolling in MFA itself, and
    /// for the seal status (read while sealed, when no TOTP secret can be opened).
    pub(crate) async fn authorize_without_mfa<A: Act>(
        &self,
        caller: &Caller,
    ) -> Result<Authorized<A>> {
        self.refresh(false).await;
        let snapshot = self.snapshot(caller);
        self.finish(caller, snapshot, Scope::none(), false).await
    }

    /// The first half of a decision on a wrapped key: may `caller` do `A` on some key? A
    /// caller that may not learns nothing, not even whether the blob names a known key.
    pub async fn attempt<A: Act>(&self, caller: &Caller) -> Result<Attempt<A>> {
        self.refresh(false).await;
        let snapshot = self.snapshot(caller);
        if Self::decide::<A>(&snapshot, &caller.principal, &Scope::none()).is_none() {
            return Err(Self::denied::<A>(caller));
        }
        Ok(Attempt {
            principal: Arc::clone(&caller.principal),
            snapshot,
            _act: PhantomData,
        })
    }

    /// The second half: `A` on the resolved key (with its context), for the caller the
    /// attempt was made for, with the snapshot it took.
    pub async fn confirm<A: Act>(
        &self,
        caller: &Caller,
        attempt: Attempt<A>,
        scope: Scope,
    ) -> Result<Authorized<A>> {
        if !Arc::ptr_eq(&attempt.principal, &caller.principal) {
            return Err(ServiceError::internal(
                "an attempt confirmed for another caller",
            ));
        }
        self.finish(caller, attempt.snapshot, scope, true).await
    }

    async fn finish<A: Act>(
        &self,
        caller: &Caller,
        snapshot: Snapshot,
        scope: Scope,
        mfa: bool,
    ) -> Result<Authorized<A>> {
        // Sealed, a token's row could not be checked against its MAC (ADR 12): such a
        // caller may only do what a sealed node is for.
        if matches!(caller.principal.method, AuthMethod::Token { .. })
            && !self.ctx.engine.is_open()
            && !matches!(
                A::ACTION,
                Action::SealStatus | Action::Unseal | Action::Init
            )
        {
            return Err(ServiceError::Sealed);
        }
        let Some(allowed) = Self::decide::<A>(&snapshot, &caller.principal, &scope) else {
            return Err(Self::denied::<A>(caller));
        };
        if let Some(limit) = allowed.limit {
            self.role_limiter
                .check(&allowed.role, &caller.principal.name, limit, Instant::now())
                .map_err(ServiceError::RateLimited)?;
        }
        if mfa && allowed.mfa {
            self.check_mfa(caller).await?;
        }
        Ok(Authorized {
            principal: Arc::clone(&caller.principal),
            key: scope.key,
            context: scope.context,
            snapshot,
            _act: PhantomData,
        })
    }

    /// Whether the holder of a decision for `A` (`ListKeys`, `ListRequests`,
    /// `GetRequest`) may see what concerns `key` (lists show only those), judged with the
    /// same snapshot and the credential's key globs.
    pub fn may_see<A: Act>(proof: &Authorized<A>, key: &str) -> bool {
        let Ok(name) = crate::keys::KeyName::parse(key) else {
            return false;
        };
        if !proof.principal.may_use_key(name.as_str()) {
            return false;
        }
        let scope = Scope::key(name);
        Self::decide::<A>(&proof.snapshot, &proof.principal, &scope).is_some()
    }
}
