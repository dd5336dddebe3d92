//! The one [`Context`] every service shares: the stores, the engine slot (the HSM while
//! unsealed), the clock, the key metadata cache, the audit log and the configuration.
//!
//! Invariants:
//! - The stores are reached only through [`Context::db`], which takes a [`Permit`]: the
//!   proof of an authorization decision ([`Authorized`](super::Authorized),
//!   [`Attempt`](super::Attempt)), of a quorum approval (`QuorumApproved`), or the
//!   [`System`] permit of background work and start-up. Nothing reads the database on a
//!   caller's behalf before deciding.
//! - While sealed the engine slot is empty and [`Context::engine`] answers
//!   `Sealed`.
//!
//! Must not import: tonic, prost, sqlx, cryptoki; nor any service (this is their base).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};

use super::cache::{KeyCache, Seen};
use super::error::{Result, ServiceError};
use crate::audit::AuditLog;
use crate::authz::stamp::{enabled_row, key_row, Checked, Stamps};
use crate::authz::Authenticator;
use crate::clock::Clock;
use crate::keys::state::{RowEncoding, Unverified};
use crate::keys::KeyEngine;
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};
use crate::quorum::approvals::QuorumApproved;
use crate::store::KeyRecord;
use crate::store::{Counter, Store};

/// Tuning and policies of the services.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Wraps reserved in the store at a time.
    pub wrap_reservation: u64,
    /// Per-principal request rate limit (`None`: unlimited).
    pub rate_limit: Option<crate::authz::ratelimit::Limit>,
    /// Whether operations the quorum policy lists wait for K-of-N approval: true with a
    /// real quorum (`--custodians`, production), false in dev mode's 1-of-1, where they
    /// run at once.
    pub quorum_gates: bool,
    /// Which operations need approval, and how long requests live.
    pub quorum_policy: crate::quorum::policy::QuorumPolicy,
    /// Waiting periods, rotation bounds and the usage limit.
    pub lifecycle: crate::keys::policy::LifecyclePolicy,
    /// The access policy read at start (an approved one in the database replaces it).
    pub access_policy: crate::authz::policy::Policy,
    /// At unseal, stamp live rows that carry no state MAC (the upgrade step; dev mode).
    pub restamp_unstamped: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            wrap_reservation: super::DEFAULT_WRAP_RESERVATION,
            rate_limit: None,
            quorum_gates: false,
            quorum_policy: crate::quorum::policy::QuorumPolicy::default(),
            lifecycle: crate::keys::policy::LifecyclePolicy::default(),
            access_policy: crate::authz::policy::Policy::default(),
            restamp_unstamped: false,
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A value that proves the holder may touch the stores: only the access guard, the
/// quorum and [`Context::system`] mint one.
pub trait Permit: sealed::Sealed {}

impl<A: super::Act> sealed::Sealed for super::Authorized<A> {}
impl<A: super::Act> Permit for super::Authorized<A> {}
impl<A: super::Act> sealed::Sealed for super::Attempt<A> {}
impl<A: super::Act> Permit for super::Attempt<A> {}
impl sealed::Sealed for QuorumApproved {}
impl Permit for QuorumApproved {}
impl sealed::Sealed for System {}
impl Permit for System {}

/// The permit of work no caller asked for: background jobs, recovery after an unseal,
/// start-up wiring, and reading the state an authorization decision depends on (the
/// policy in force, grants, TOTP enrolments). Made only by [`Context::system`].
pub struct System {
    _private: (),
}

/// The stores, as a permit holder sees them (every table family's trait).
pub type Db<'a> = &'a dyn Store;

/// The HSM engine while unsealed.
#[derive(Default)]
pub struct EngineSlot(RwLock<Option<Arc<KeyEngine>>>);

impl EngineSlot {
    /// The engine, or `Sealed`.
    pub fn get(&self) -> Result<Arc<KeyEngine>> {
        self.0
            .read()
            .ok()
            .and_then(|e| e.clone())
            .ok_or(ServiceError::Sealed)
    }

    /// Whether the service is unsealed.
    pub fn is_open(&self) -> bool {
        self.0.read().is_ok_and(|e| e.is_some())
    }

    pub(super) fn put(&self, engine: Arc<KeyEngine>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(engine);
        }
    }

    pub(super) fn take(&self) -> Option<Arc<KeyEngine>> {
        self.0.write().ok().and_then(|mut e| e.take())
    }

    /// Takes the engine out if it is still `engine` (not one a new unseal put in since).
    fn take_if(&self, engine: &Arc<KeyEngine>) -> Option<Arc<KeyEngine>> {
        let mut slot = self.0.write().ok()?;
        match slot.as_ref() {
            Some(e) if Arc::ptr_eq(e, engine) => slot.take(),
            _ => None,
        }
    }
}

/// The HSM objects of destroyed versions whose forget is pending on this node (see
/// [`super::jobs::Forgotten`]). A version whose object is listed here is refused as
/// DESTROYED, whatever the database says of it.
#[derive(Default)]
pub struct Forgetting(RwLock<HashSet<ObjectId>>);

impl Forgetting {
    /// Whether `object`'s forget is pending.
    pub fn is_pending(&self, object: &ObjectId) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(object)
    }

    pub(super) fn add(&self, object: ObjectId) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(object);
    }

    pub(super) fn remove(&self, object: &ObjectId) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(object);
    }

    /// How many forgets are pending.
    pub fn len(&self) -> usize {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no forget is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What every service shares.
pub struct Context {
    store: Arc<dyn Store>,
    /// The HSM engine while unsealed.
    pub engine: EngineSlot,
    /// The one clock.
    pub clock: Arc<dyn Clock>,
    /// Short-lived key metadata for the hot paths.
    pub(super) cache: KeyCache,
    /// Bearer-token verification, with its cache (revocations drop entries here).
    pub auth: Authenticator,
    /// State MACs verified (and refused) on this node (ADR 12).
    pub stamps: Arc<Stamps>,
    /// HSM objects of destroyed versions whose tombstone this node has read but not yet
    /// applied (the HSM has not confirmed the forget): nothing unwraps under them here.
    pub forgetting: Forgetting,
    audit: OnceLock<Arc<AuditLog>>,
    /// Tuning and policies.
    pub cfg: ServiceConfig,
}

impl Context {
    /// A context over the stores, sealed.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, cfg: ServiceConfig) -> Self {
        let stamps = Arc::new(Stamps::default());
        Context {
            auth: Authenticator::new(Arc::clone(&store), Arc::clone(&clock), Arc::clone(&stamps)),
            stamps,
            forgetting: Forgetting::default(),
            store,
            engine: EngineSlot::default(),
            clock,
            cache: KeyCache::default(),
            audit: OnceLock::new(),
            cfg,
        }
    }

    /// The stores, for the holder of a permit.
    pub fn db(&self, _permit: &impl Permit) -> Db<'_> {
        self.store.as_ref()
    }

    /// The permit of background work and start-up (see [`System`]).
    pub fn system(&self) -> System {
        System { _private: () }
    }

    /// The engine, or `Sealed`. An engine whose HSM refused the login (on a reconnect:
    /// the PIN changed behind Arca's back, or the token locked it) is useless and never
    /// retried: the node seals itself here, once, with an alert and an audit record, and
    /// custodians must unseal it again.
    pub fn engine(&self) -> Result<Arc<KeyEngine>> {
        let engine = self.engine.get()?;
        if !engine.login_refused() {
            return Ok(engine);
        }
        if let Some(gone) = self.engine.take_if(&engine) {
            tracing::error!(
                alert = "hsm-login-refused",
                "ALERT: the HSM refused the login; the node sealed itself (custodians unseal \
                 it once the HSM's PIN is sorted out)"
            );
            crate::metrics::global()
                .hsm_logins_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.record_job("hsm.login_refused", false, None, "the node sealed itself");
            self.count_refused_login();
            // Joining the HSM workers blocks: off the async threads when there are some.
            drop(engine);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(gone));
                }
                Err(_) => drop(gone),
            }
        }
        Err(ServiceError::Sealed)
    }

    /// Adds the refused login to the persistent count (`counters`), off the caller's
    /// path: an operator reads it in `SealStatus` across restarts and nodes.
    fn count_refused_login(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("a refused HSM login not counted in the database (no runtime)");
            return;
        };
        let store = Arc::clone(&self.store);
        let now = self.clock.now_ms();
        rt.spawn(async move {
            match store.bump_counter(Counter::HsmLoginsRefused, now).await {
                Ok(total) => {
                    crate::metrics::global()
                        .hsm_logins_refused_recorded
                        .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        alert = "hsm-login-refused",
                        total,
                        "the HSM has refused {total} login(s) over the life of this database"
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "a refused HSM login could not be counted in the database")
                }
            }
        });
    }

    /// Reads the persistent count of refused HSM logins into the metrics at start, and
    /// warns when there were any: an operator sees them before anyone unseals again.
    pub async fn load_refused_logins(&self) -> Result<u64> {
        let total = self.store.counter(Counter::HsmLoginsRefused).await?;
        crate::metrics::global()
            .hsm_logins_refused_recorded
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        if total > 0 {
            tracing::warn!(
                total,
                "the HSM has refused {total} login(s) over the life of this database \
                 (SealStatus hsm_logins_refused; docs/operations.md)"
            );
        }
        Ok(total)
    }

    /// A cheap round trip to the database, for health checks.
    pub async fn ping(&self) -> Result<()> {
        Ok(self.store.ping().await?)
    }

    /// Attaches the audit log (once, at start-up).
    pub fn set_audit(&self, log: Arc<AuditLog>) {
        if self.audit.set(log).is_err() {
            tracing::warn!("the audit log was attached twice; keeping the first");
        }
    }

    /// The audit log, unless the server runs without one (benchmarks only).
    pub fn audit(&self) -> Option<&Arc<AuditLog>> {
        self.audit.get()
    }

    /// The keyed digest of a canonical encryption context for the audit record (`None`
    /// without an audit log, or while its digest key is not derived).
    pub fn context_digest(&self, canonical: &[u8]) -> Option<String> {
        self.audit()?.context_digest(canonical)
    }

    /// Records a background action (no caller waits for it).
    pub fn record_job(
        &self,
        operation: &str,
        ok: bool,
        key: Option<(&str, Option<u32>)>,
        detail: &str,
    ) {
        if let Some(log) = self.audit() {
            let code = if ok { 0 } else { 13 };
            log.job(operation, code, key, detail);
        }
    }

    /// The key with id `id` through the key cache, its ENABLED versions checked
    /// against their MACs (ADR 12).
    pub(super) async fn key_by_id(&self, db: Db<'_>, id: &KeyId) -> Result<Arc<KeyRecord>> {
        let seen = self.cache.by_id(db, id).await?;
        self.checked_key(seen).await
    }

    /// The key named `name`, as [`Context::key_by_id`].
    pub(super) async fn key_by_name(&self, db: Db<'_>, name: &KeyName) -> Result<Arc<KeyRecord>> {
        let seen = self.cache.by_name(db, name).await?;
        self.checked_key(seen).await
    }

    /// Checks every ENABLED version of a cached record (memoised: an unchanged row costs
    /// no HSM call); a refused one is served as DISABLED, remembered as forged and
    /// alerted once.
    async fn checked_key(&self, seen: Seen) -> Result<Arc<KeyRecord>> {
        if seen.checked {
            return Ok(seen.rec);
        }
        let engine = self.engine()?;
        self.verify_key(&seen.rec).await?;
        let mut served = KeyRecord::clone(&seen.rec);
        let mut verdicts = Vec::new();
        for v in served.versions.iter_mut() {
            if v.state != VersionState::Enabled {
                continue;
            }
            let row = enabled_row(&seen.rec.id, v.version, &v.hsm_id, v.state_seq);
            match self.stamps.check(&engine, row, v.mac.as_deref()).await? {
                Checked::Good => verdicts.push((v.version, None)),
                Checked::Refused { why, first } => {
                    let id = format!("{}/{}", seen.rec.id, v.version);
                    self.refuse_state("key_versions", &id, why, first);
                    verdicts.push((v.version, Some(why)));
                    v.state = VersionState::Disabled;
                }
            }
        }
        Ok(self.cache.checked(&seen.rec, served, &verdicts))
    }

    /// Checks that `key`'s name is the one the HSM bound to its id (ADR 12): every
    /// right and every approval names a key, so a renamed row must not move them onto
    /// another key. Refused (alerted once) otherwise.
    pub(crate) async fn verify_key(&self, key: &KeyRecord) -> Result<()> {
        let engine = self.engine()?;
        let row = key_row(&key.id, key.name.as_str());
        match self
            .stamps
            .check(&engine, row, key.key_mac.as_deref())
            .await?
        {
            Checked::Good => Ok(()),
            Checked::Refused { why, first } => {
                self.refuse_state("keys", &key.id.to_string(), why, first);
                Err(ServiceError::StateForged(why))
            }
        }
    }

    /// Checks that `object` is the HSM object made for `version` of `key` before a MAC
    /// makes it usable or destroyable (a row's object id is not authenticated while the
    /// version is DISABLED). `Ok(false)`: the object is gone.
    pub(crate) async fn verify_object(
        &self,
        key: &KeyId,
        version: u32,
        object: ObjectId,
    ) -> Result<bool> {
        match self
            .engine()?
            .object_is_version(object, *key, version)
            .await?
        {
            Some(true) => Ok(true),
            None => Ok(false),
            Some(false) => {
                let what = format!("{key}/{version}/hsm_id");
                let first = self
                    .stamps
                    .first_refusal(&format!("key_versions/{what}/{object}"));
                self.refuse_state("key_versions", &what, Unverified::Forged, first);
                Err(ServiceError::StateForged(Unverified::Forged))
            }
        }
    }

    /// The state MAC of `row` (ADR 12), to store with it; `Sealed` without the HSM.
    pub(crate) async fn stamp(&self, row: RowEncoding) -> Result<String> {
        let engine = self.engine()?;
        Ok(crate::authz::stamp::stamp(&engine, row).await?)
    }

    /// A stored row failed its state-MAC check: it is refused (by the caller). The
    /// first time on this node: an ERROR line with `alert = "state-forged"`, the metric,
    /// and a `state.forged` audit record (which the `state_forged` alert rule raises).
    pub(crate) fn refuse_state(&self, table: &str, id: &str, why: Unverified, first: bool) {
        if !first {
            return;
        }
        tracing::error!(
            alert = "state-forged",
            table,
            row = id,
            reason = why.reason(),
            "ALERT: a stored row is not authenticated by the HSM; it is refused"
        );
        crate::metrics::global()
            .state_forged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record_job(
            "state.forged",
            false,
            None,
            &format!("table={table} row={id} reason={}", why.reason()),
        );
    }

    /// Records that a person was locked out, as a job record naming them (`operation` is
    /// `mfa.locked` or `custodian.locked`, `result` the code their refusals carry): the
    /// alert rules of `policies/alerts.toml` fire on it. No caller waits for it.
    pub(super) fn record_lockout(
        &self,
        operation: &str,
        result: u32,
        principal: &str,
        detail: &str,
    ) {
        if let Some(log) = self.audit() {
            log.record_nowait(crate::audit::PendingRecord {
                time_ms: self.clock.now_ms(),
                kind: crate::audit::Kind::Job,
                operation: operation.to_string(),
                result,
                details: crate::audit::Details {
                    principal: principal.to_string(),
                    auth_method: "system".into(),
                    detail: Some(detail.to_string()),
                    ..crate::audit::Details::default()
                },
            });
        }
    }

    /// A fresh random id `prefix` + 32 hex digits.
    pub(super) fn random_id(&self, prefix: &str) -> Result<String> {
        let raw = crate::secret::random::<16>().map_err(ServiceError::internal)?;
        Ok(format!("{prefix}{}", hex::encode(raw.as_ref())))
    }
}
