//! The key lifecycle (DESIGN §3): retirement with a waiting period, its cancellation,
//! retention dates, and the background jobs that rotate due keys, act on retention dates
//! and crypto-shred retired versions.
//!
//! Invariants:
//! - A retired version (`SCHEDULED_FOR_DESTRUCTION`) refuses unwrap from the moment the
//!   retirement commits; only the primary may wrap, and a retired primary cannot.
//! - The primary version cannot be retired while another version is enabled: the key is
//!   rotated first, so wrapping never silently moves to an older version.
//! - Destruction is two-step and restartable: the store marks the version as being
//!   destroyed (from then on no cancel can revive it), the HSM object is destroyed
//!   (`C_DestroyObject`; an object already gone counts as destroyed), then the version is
//!   marked `DESTROYED` with its tombstone in one transaction. A crash between the steps
//!   is finished by the next pass, on this node or another.
//! - Each job pass runs on one node at a time (the `lifecycle` row lease); every effect is
//!   also a conditional write, so an overlap after a lease expiry cannot act twice.
//! - While sealed the jobs do nothing; due work is found again by time, so nothing missed
//!   while down or sealed is lost.
//! - Every node drops its handles and session copies of destroyed objects within one job
//!   interval (tombstones are polled), whoever destroyed them.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::approvals::{key_params, Commit};
use super::{AdminOutcome, Caller, KeyService, Result, ServiceError};
use crate::authz::policy::Action;
use crate::keys::{KeyId, KeyName, VersionState};
use crate::quorum::approvals::{Operation, Parameters, PARAM_RETAIN_UNTIL, PARAM_WAITING_MS};
use crate::store::{KeyRecord, LifecycleChange, StoreError};

/// Options of a new key.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyOptions {
    /// Scheduled rotation period (ms).
    pub rotation_period_ms: Option<i64>,
    /// Retention date (Unix ms).
    pub retain_until: Option<i64>,
}

/// Longest rotation period a key may have (10 years).
const MAX_ROTATION_MS: i64 = 3650 * 86_400_000;
/// Destructions handled per job pass.
const DESTRUCTIONS_PER_PASS: u32 = 100;
/// The lease that keeps the lifecycle jobs on one node at a time.
pub const LIFECYCLE_LEASE: &str = "lifecycle";

/// How the background jobs run.
#[derive(Clone, Debug)]
pub struct JobConfig {
    /// Time between passes.
    pub interval: Duration,
    /// How long a node holds the jobs' lease without renewing it (a node that dies
    /// gives the jobs up after this long).
    pub lease_ttl: Duration,
    /// This node's name in leases and logs.
    pub node: String,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(15),
            node: String::from("node"),
        }
    }
}

/// What a lifecycle conflict in the store means for the caller.
fn lifecycle_conflict(e: StoreError) -> ServiceError {
    match e {
        StoreError::Conflict(c) => ServiceError::FailedPrecondition(match c {
            crate::store::Conflict::Destroying => {
                "destruction has already started; it cannot be cancelled"
            }
            crate::store::Conflict::VersionState(VersionState::Destroyed) => {
                "key version destroyed"
            }
            crate::store::Conflict::VersionState(VersionState::ScheduledForDestruction) => {
                "key version is already scheduled for destruction"
            }
            crate::store::Conflict::VersionState(
                VersionState::Enabled | VersionState::Disabled,
            ) => "key version is not scheduled for destruction",
            _ => "illegal key version state transition",
        }),
        StoreError::NotFound => ServiceError::NotFound("key version not found"),
        e => e.into(),
    }
}

/// The versions a retirement would schedule (`version`, or every version not yet
/// retired), checked against the key as it is.
fn plan_retire(key: &KeyRecord, version: Option<u32>) -> Result<Vec<u32>> {
    match version {
        Some(v) => {
            let rec = key
                .version(v)
                .ok_or(ServiceError::NotFound("key version not found"))?;
            match rec.state {
                VersionState::Enabled | VersionState::Disabled => {}
                VersionState::ScheduledForDestruction => {
                    return Err(ServiceError::FailedPrecondition(
                        "key version is already scheduled for destruction",
                    ))
                }
                VersionState::Destroyed => {
                    return Err(ServiceError::FailedPrecondition("key version destroyed"))
                }
            }
            let others_enabled = key
                .versions
                .iter()
                .any(|o| o.version != v && o.state == VersionState::Enabled);
            if v == key.primary_version && others_enabled {
                return Err(ServiceError::FailedPrecondition(
                    "the primary version cannot be retired while other versions are enabled: \
                     rotate the key first, or retire the whole key",
                ));
            }
            Ok(vec![v])
        }
        None => {
            let all: Vec<u32> = key
                .versions
                .iter()
                .filter(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
                .map(|v| v.version)
                .collect();
            if all.is_empty() {
                return Err(ServiceError::FailedPrecondition(
                    "every version of this key is already retired",
                ));
            }
            Ok(all)
        }
    }
}

/// The versions a cancellation would restore.
fn plan_cancel(key: &KeyRecord, version: Option<u32>) -> Result<Vec<u32>> {
    let scheduled = |v: &crate::store::VersionRecord| -> Result<bool> {
        match (v.state, v.destroying_at) {
            (VersionState::ScheduledForDestruction, None) => Ok(true),
            (VersionState::ScheduledForDestruction, Some(_)) => {
                Err(ServiceError::FailedPrecondition(
                    "destruction has already started; it cannot be cancelled",
                ))
            }
            _ => Ok(false),
        }
    };
    match version {
        Some(v) => {
            let rec = key
                .version(v)
                .ok_or(ServiceError::NotFound("key version not found"))?;
            if scheduled(rec)? {
                Ok(vec![v])
            } else if rec.state == VersionState::Destroyed {
                Err(ServiceError::FailedPrecondition("key version destroyed"))
            } else {
                Err(ServiceError::FailedPrecondition(
                    "key version is not scheduled for destruction",
                ))
            }
        }
        None => {
            let mut out = Vec::new();
            for v in &key.versions {
                if scheduled(v)? {
                    out.push(v.version);
                }
            }
            if out.is_empty() {
                return Err(ServiceError::FailedPrecondition(
                    "no version of this key is scheduled for destruction",
                ));
            }
            Ok(out)
        }
    }
}

/// Whether any version is ENABLED or DISABLED (a key whose versions are all retired or
/// destroyed is retired: it is not rotated back to life).
pub(super) fn has_live_version(key: &KeyRecord) -> bool {
    key.versions
        .iter()
        .any(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
}

fn param_i64(p: &Parameters, name: &str) -> Result<i64> {
    p.get(name)
        .and_then(|v| v.parse().ok())
        .ok_or(ServiceError::InvalidArgument("invalid request parameters"))
}

impl KeyService {
    /// Checks a new key's options against the lifecycle policy.
    pub(super) fn check_key_options(&self, opts: &KeyOptions) -> Result<()> {
        if let Some(p) = opts.rotation_period_ms {
            if p < self.cfg.lifecycle.min_rotation_ms || p > MAX_ROTATION_MS {
                return Err(ServiceError::InvalidArgument(
                    "rotation period outside the policy's bounds",
                ));
            }
        }
        Ok(())
    }

    /// The waiting period a retirement asks for, checked against the policy.
    fn waiting_ms(&self, requested_ms: i64) -> Result<i64> {
        self.cfg
            .lifecycle
            .waiting_period(requested_ms)
            .ok_or(ServiceError::InvalidArgument(
                "waiting period outside the policy's bounds",
            ))
    }

    /// Retires one version (`version`) or the whole key (`None`): once approved, the
    /// version(s) are scheduled for destruction after the waiting period.
    pub async fn retire(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
        waiting_ms: i64,
    ) -> Result<AdminOutcome> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        let action = match version {
            Some(_) => Action::RetireKeyVersion,
            None => Action::RetireKey,
        };
        self.authorize(caller, action, Some(name.as_str()), None)
            .await?;
        let waiting = self.waiting_ms(waiting_ms)?;
        let key = self.store.key_by_name(&name).await?;
        // Checked now, so that no request is made for a change that cannot happen.
        plan_retire(&key, version)?;
        let op = match version {
            Some(_) => Operation::RetireKeyVersion,
            None => Operation::RetireKey,
        };
        if self.needs_quorum(op) {
            let mut params = key_params(&name, version);
            params.insert(PARAM_WAITING_MS.to_string(), waiting.to_string());
            let req = self.open_request(caller, op, params).await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(
            self.run_retire(&name, version, waiting, Commit::Direct)
                .await?,
        ))
    }

    /// Schedules the version(s) for destruction at now + `waiting_ms`.
    pub(super) async fn run_retire(
        &self,
        name: &KeyName,
        version: Option<u32>,
        waiting_ms: i64,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.store.key_by_name(name).await?;
        let versions = plan_retire(&key, version)?;
        let now = self.clock.now_ms();
        let request = match commit {
            Commit::Direct => None,
            Commit::Approved(id, _) => Some(id.to_string()),
        };
        let change = LifecycleChange::Schedule {
            versions: versions.clone(),
            destroy_at: now.saturating_add(waiting_ms),
            request,
        };
        let rec = self.commit_lifecycle(&key.id, &change, commit, now).await?;
        tracing::warn!(
            key = %rec.name,
            versions = ?versions,
            destroy_in_s = waiting_ms / 1000,
            "key versions scheduled for destruction"
        );
        Ok(rec)
    }

    /// Cancels the retirement of `version` (or of every scheduled version): they become
    /// `DISABLED` (enable them to unwrap again).
    pub async fn cancel_retirement(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
    ) -> Result<AdminOutcome> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        self.authorize(caller, Action::CancelRetirement, Some(name.as_str()), None)
            .await?;
        let key = self.store.key_by_name(&name).await?;
        plan_cancel(&key, version)?;
        if self.needs_quorum(Operation::CancelRetirement) {
            let req = self
                .open_request(
                    caller,
                    Operation::CancelRetirement,
                    key_params(&name, version),
                )
                .await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(
            self.run_cancel(&name, version, Commit::Direct).await?,
        ))
    }

    pub(super) async fn run_cancel(
        &self,
        name: &KeyName,
        version: Option<u32>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.store.key_by_name(name).await?;
        let versions = plan_cancel(&key, version)?;
        let now = self.clock.now_ms();
        let change = LifecycleChange::Cancel {
            versions: versions.clone(),
        };
        let rec = self.commit_lifecycle(&key.id, &change, commit, now).await?;
        tracing::warn!(key = %rec.name, versions = ?versions, "retirement cancelled; versions disabled");
        Ok(rec)
    }

    /// Sets (or clears) a key's retention date.
    pub async fn set_retention(
        &self,
        caller: &Caller,
        name: &str,
        retain_until: Option<i64>,
    ) -> Result<AdminOutcome> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        self.authorize(caller, Action::SetRetention, Some(name.as_str()), None)
            .await?;
        self.store.key_by_name(&name).await?;
        if self.needs_quorum(Operation::SetRetention) {
            let mut params = key_params(&name, None);
            params.insert(
                PARAM_RETAIN_UNTIL.to_string(),
                retain_until.map(|t| t.to_string()).unwrap_or_default(),
            );
            let req = self
                .open_request(caller, Operation::SetRetention, params)
                .await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(
            self.run_set_retention(&name, retain_until, Commit::Direct)
                .await?,
        ))
    }

    pub(super) async fn run_set_retention(
        &self,
        name: &KeyName,
        retain_until: Option<i64>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.store.key_by_name(name).await?;
        let now = self.clock.now_ms();
        let change = LifecycleChange::Retention { retain_until };
        let rec = self.commit_lifecycle(&key.id, &change, commit, now).await?;
        tracing::info!(key = %rec.name, retain_until = ?retain_until, "retention date set");
        Ok(rec)
    }

    /// Runs an approved lifecycle request (retire, cancel, retention).
    pub(super) async fn run_approved_lifecycle(
        &self,
        op: Operation,
        params: &Parameters,
        name: &KeyName,
        version: Option<u32>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        match op {
            Operation::RetireKeyVersion | Operation::RetireKey => {
                let waiting = param_i64(params, PARAM_WAITING_MS)?;
                let version = if op == Operation::RetireKey {
                    None
                } else {
                    Some(
                        version
                            .ok_or(ServiceError::InvalidArgument("invalid request parameters"))?,
                    )
                };
                self.run_retire(name, version, waiting, commit).await
            }
            Operation::CancelRetirement => self.run_cancel(name, version, commit).await,
            Operation::SetRetention => {
                let until = match params.get(PARAM_RETAIN_UNTIL).map(String::as_str) {
                    None => {
                        return Err(ServiceError::InvalidArgument("invalid request parameters"))
                    }
                    Some("") => None,
                    Some(_) => Some(param_i64(params, PARAM_RETAIN_UNTIL)?),
                };
                self.run_set_retention(name, until, commit).await
            }
            _ => Err(ServiceError::Internal("not a lifecycle operation".into())),
        }
    }

    async fn commit_lifecycle(
        &self,
        key: &KeyId,
        change: &LifecycleChange,
        commit: Commit<'_>,
        now: i64,
    ) -> Result<KeyRecord> {
        let rec = match commit {
            Commit::Direct => self.store.apply_lifecycle(key, change, now).await,
            Commit::Approved(id, approved) => {
                self.quorum
                    .complete_lifecycle(id, approved, key, change, now)
                    .await
            }
        }
        .map_err(lifecycle_conflict)?;
        Ok(self.cache.put(rec))
    }

    /// Rotates the key if `expected` is still its primary version: a conditional
    /// rotation for the jobs and the usage limit, so that several nodes noticing the
    /// same due rotation make one new version between them. Returns the key after, or
    /// `None` if someone else rotated first.
    pub(super) async fn rotate_if_primary(
        &self,
        key: &KeyId,
        expected: u32,
        why: &'static str,
    ) -> Result<Option<KeyRecord>> {
        let _serial = self.rotations.lock().await;
        let rec = self.store.key_by_id(key).await?;
        if rec.primary_version != expected || !has_live_version(&rec) {
            self.cache.put(rec);
            return Ok(None);
        }
        let next = rec
            .versions
            .last()
            .map(|v| v.version)
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(ServiceError::FailedPrecondition(
                "key has too many versions",
            ))?;
        let engine = self.engine()?;
        let object = engine.create_version_object(rec.id, next).await?;
        match self
            .store
            .add_version(&rec.id, next, &object, self.clock.now_ms())
            .await
        {
            Ok(after) => {
                tracing::info!(key = %after.name, version = next, reason = why, "key rotated");
                self.audit_job(
                    "job.rotate",
                    true,
                    Some((after.name.as_str(), Some(next))),
                    &format!("reason={why}"),
                );
                Ok(Some(self.cache.put(after)))
            }
            Err(e) => {
                self.discard_unstored_object(object, &e).await;
                match e {
                    StoreError::AlreadyExists => Ok(None),
                    e => Err(e.into()),
                }
            }
        }
    }

    /// Runs the lifecycle jobs every `cfg.interval` until the task is dropped.
    pub async fn run_jobs(self: Arc<Self>, cfg: JobConfig) {
        // A process cannot hold handles to objects destroyed before it started: only
        // tombstones from about now on matter.
        let mut forgotten = Forgotten {
            done: HashSet::new(),
            seen_until: self.clock.now_ms(),
        };
        loop {
            if let Err(e) = self.jobs_pass(&cfg, &mut forgotten).await {
                match e {
                    ServiceError::Unavailable(what) => {
                        tracing::debug!(what, "lifecycle jobs waiting for a dependency")
                    }
                    e => {
                        tracing::warn!(error = %e, "lifecycle job pass failed");
                        // The pass is retried at the next interval; the trail shows the
                        // failure (the error itself is in the log).
                        self.audit_job("job.failed", false, None, "lifecycle job pass failed");
                    }
                }
            }
            tokio::time::sleep(cfg.interval).await;
        }
    }

    /// One pass: drop handles of objects destroyed elsewhere; then, holding the lease,
    /// act on retention dates, rotate due keys and destroy due versions.
    async fn jobs_pass(&self, cfg: &JobConfig, forgotten: &mut Forgotten) -> Result<()> {
        // Sealed: nothing to do; due work is found again after the unseal.
        let engine = self.engine()?;
        forgotten.sweep(self, &engine).await?;
        let ttl = i64::try_from(cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let lease = || async {
            self.store
                .acquire_lease(LIFECYCLE_LEASE, &cfg.node, ttl, self.clock.now_ms())
                .await
        };
        if !lease().await? {
            return Ok(());
        }
        self.apply_retention().await?;
        self.rotate_due().await?;
        for due in self
            .store
            .due_destructions(self.clock.now_ms(), DESTRUCTIONS_PER_PASS)
            .await?
        {
            // Renewed before each destruction: a node that lost the lease stops.
            if !lease().await? {
                return Ok(());
            }
            self.destroy_version(&due).await?;
        }
        Ok(())
    }

    async fn apply_retention(&self) -> Result<()> {
        let now = self.clock.now_ms();
        for id in self.store.keys_due_retention(now).await? {
            let destroy_at = now.saturating_add(self.cfg.lifecycle.default_waiting_ms);
            match self
                .store
                .apply_lifecycle(&id, &LifecycleChange::ApplyRetention { destroy_at }, now)
                .await
            {
                Ok(rec) => {
                    tracing::warn!(
                        key = %rec.name,
                        destroy_in_s = self.cfg.lifecycle.default_waiting_ms / 1000,
                        "retention date reached: key scheduled for destruction"
                    );
                    self.audit_job(
                        "job.retention",
                        true,
                        Some((rec.name.as_str(), None)),
                        &format!("destroy_at_ms={destroy_at}"),
                    );
                    self.cache.put(rec);
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn rotate_due(&self) -> Result<()> {
        for id in self.store.keys_due_rotation(self.clock.now_ms()).await? {
            let key = self.store.key_by_id(&id).await?;
            self.rotate_if_primary(&id, key.primary_version, "rotation period")
                .await?;
        }
        Ok(())
    }

    /// Crypto-shreds one due version (see the module invariants).
    async fn destroy_version(&self, due: &crate::store::DueDestruction) -> Result<()> {
        let now = self.clock.now_ms();
        match self
            .store
            .begin_destruction(&due.key, due.version, now)
            .await
        {
            Ok(()) => {}
            // Cancelled or finished meanwhile.
            Err(StoreError::Conflict(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let existed = self.engine()?.destroy_object(due.hsm_id).await?;
        crate::fault::point("after-hsm-destroy");
        let rec = self
            .store
            .finish_destruction(&due.key, due.version, self.clock.now_ms())
            .await?;
        tracing::warn!(
            key = %rec.name,
            version = due.version,
            hsm_object = %due.hsm_id,
            object_existed = existed,
            "key version destroyed"
        );
        self.audit_job(
            "job.destroy",
            true,
            Some((rec.name.as_str(), Some(due.version))),
            &format!("hsm_object={} object_existed={existed}", due.hsm_id),
        );
        self.cache.put(rec);
        Ok(())
    }
}

/// Objects this node has already dropped its handles to.
struct Forgotten {
    done: HashSet<crate::keys::ObjectId>,
    /// Destruction time up to which tombstones were read (minus a margin for clock
    /// differences between nodes).
    seen_until: i64,
}

impl Forgotten {
    /// How far back each poll looks again (clock skew between nodes, late commits, a
    /// destruction that began before this process started).
    const MARGIN_MS: i64 = 5 * 60 * 1000;

    async fn sweep(&mut self, svc: &KeyService, engine: &crate::keys::KeyEngine) -> Result<()> {
        let since = self.seen_until.saturating_sub(Self::MARGIN_MS);
        for (object, at) in svc.store.destroyed_since(since).await? {
            self.seen_until = self.seen_until.max(at);
            if self.done.insert(object) {
                engine.forget_object(object).await?;
            }
        }
        Ok(())
    }
}
