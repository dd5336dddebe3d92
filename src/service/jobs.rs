//! The background jobs of the key lifecycle: retention dates, scheduled rotation and
//! crypto-shredding of retired versions (DESIGN §3).
//!
//! Invariants:
//! - Destruction is two-step and restartable: the store marks the version as being
//!   destroyed (from then on no cancel can revive it), the HSM object is destroyed
//!   (`C_DestroyObject`; an object already gone counts as destroyed), then the version is
//!   marked `DESTROYED` with its tombstone in one transaction. A crash between the steps
//!   is finished by the next pass, on this node or another.
//! - Each pass runs on one node at a time (the [`LIFECYCLE_LEASE`] row lease, renewed
//!   before each destruction); every effect is also a conditional write, so an overlap
//!   after a lease expiry cannot act twice.
//! - While sealed the jobs do nothing; due work is found again by time, so nothing missed
//!   while down or sealed is lost.
//! - Every node drops its handles and session copies of destroyed objects within one job
//!   interval (tombstones are polled), whoever destroyed them.
//! - Every action is recorded in the audit trail as a `job.*` record.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::{retention_row, scheduled_row, Checked};
use crate::keys::state::Unverified;
use crate::keys::VersionState;
use crate::service::lifecycle::schedule_stamps;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::context::{Context, System};
use super::error::{Result, ServiceError};
use super::gate::Commit;
use super::rotation::{Rotation, Target, When};
use crate::keys::{KeyEngine, ObjectId};
use crate::store::{DueDestruction, LifecycleChange, StoreError};

/// Destructions handled per pass.
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

/// The lifecycle jobs.
pub struct Jobs {
    ctx: Arc<Context>,
    rotation: Arc<Rotation>,
}

impl Jobs {
    /// The jobs over `ctx`.
    pub fn new(ctx: Arc<Context>, rotation: Arc<Rotation>) -> Self {
        Jobs { ctx, rotation }
    }

    /// Runs a pass every `cfg.interval` until the task is dropped.
    pub async fn run(self: Arc<Self>, cfg: JobConfig) {
        // A process cannot hold handles to objects destroyed before it started: only
        // tombstones from about now on matter.
        let mut forgotten = Forgotten {
            done: HashSet::new(),
            seen_until: self.ctx.clock.now_ms(),
        };
        loop {
            if let Err(e) = self.pass(&cfg, &mut forgotten).await {
                match e {
                    ServiceError::Sealed => {}
                    ServiceError::Unavailable(what) => {
                        tracing::debug!(what, "lifecycle jobs waiting for a dependency")
                    }
                    e => {
                        tracing::warn!(error = %e, "lifecycle job pass failed");
                        // The pass is retried at the next interval; the trail shows the
                        // failure (the error itself is in the log).
                        self.ctx
                            .record_job("job.failed", false, None, "lifecycle job pass failed");
                    }
                }
            }
            tokio::time::sleep(cfg.interval).await;
        }
    }

    /// One pass: drop handles of objects destroyed elsewhere; then, holding the lease,
    /// act on retention dates, rotate due keys and destroy due versions.
    pub async fn pass(&self, cfg: &JobConfig, forgotten: &mut Forgotten) -> Result<()> {
        // Sealed: nothing to do; due work is found again after the unseal.
        let engine = self.ctx.engine()?;
        let system = self.ctx.system();
        forgotten.sweep(&self.ctx, &system, &engine).await?;
        let ttl = i64::try_from(cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        let db = self.ctx.db(&system);
        let lease = || async {
            db.acquire_lease(LIFECYCLE_LEASE, &cfg.node, ttl, self.ctx.clock.now_ms())
                .await
        };
        if !lease().await? {
            return Ok(());
        }
        self.apply_retention(&system).await?;
        self.rotate_due(&system).await?;
        for due in db
            .due_destructions(self.ctx.clock.now_ms(), DESTRUCTIONS_PER_PASS)
            .await?
        {
            // Renewed before each destruction: a node that lost the lease stops.
            if !lease().await? {
                return Ok(());
            }
            self.destroy_version(&system, &due).await?;
        }
        Ok(())
    }

    async fn apply_retention(&self, system: &System) -> Result<()> {
        let db = self.ctx.db(system);
        let now = self.ctx.clock.now_ms();
        let waiting = self.ctx.cfg.lifecycle.default_waiting_ms;
        for id in db.keys_due_retention(now).await? {
            let destroy_at = now.saturating_add(waiting);
            let key = db.key_by_id(&id).await?;
            // Only a date this service set (ADR 12) schedules a key's destruction.
            let Some(retain_until) = key.retain_until else {
                continue;
            };
            let row = retention_row(&key.id, retain_until, false);
            let engine = self.ctx.engine()?;
            if let Checked::Refused { why, first } = self
                .ctx
                .stamps
                .check(&engine, row, key.retention_mac.as_deref())
                .await?
            {
                let what = format!("{}/retain_until", key.id);
                self.ctx.refuse_state("keys", &what, why, first);
                continue;
            }
            let live: Vec<u32> = key
                .versions
                .iter()
                .filter(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
                .map(|v| v.version)
                .collect();
            let versions = schedule_stamps(&self.ctx, &key, &live, destroy_at).await?;
            let applied_mac = self
                .ctx
                .stamp(retention_row(&key.id, retain_until, true))
                .await?;
            let change = LifecycleChange::ApplyRetention {
                destroy_at,
                versions,
                applied_mac,
            };
            match db.apply_lifecycle(&id, &change, now).await {
                Ok(rec) => {
                    tracing::warn!(
                        key = %rec.name,
                        destroy_in_s = waiting / 1000,
                        "retention date reached: key scheduled for destruction"
                    );
                    self.ctx.record_job(
                        "job.retention",
                        true,
                        Some((rec.name.as_str(), None)),
                        &format!("destroy_at_ms={destroy_at}"),
                    );
                    self.ctx.cache.put(rec);
                }
                // Acted on meanwhile (another node, or the date moved).
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn rotate_due(&self, system: &System) -> Result<()> {
        let db = self.ctx.db(system);
        for id in db.keys_due_rotation(self.ctx.clock.now_ms()).await? {
            let key = db.key_by_id(&id).await?;
            let when = When::IfPrimary {
                version: key.primary_version,
                why: "rotation period",
            };
            self.rotation
                .rotate(system, Target::Id(&id), when, Commit::Direct)
                .await?;
        }
        Ok(())
    }

    /// Crypto-shreds one due version (see the module invariants).
    async fn destroy_version(&self, system: &System, due: &DueDestruction) -> Result<()> {
        let db = self.ctx.db(system);
        let now = self.ctx.clock.now_ms();
        // Only a retirement this service made (or the quorum approved) destroys anything:
        // a row scheduled, or moved earlier, by a database writer is refused (ADR 12).
        let engine = self.ctx.engine()?;
        let row = scheduled_row(
            &due.key,
            due.version,
            &due.hsm_id,
            due.destroy_at,
            due.state_seq,
        );
        match self
            .ctx
            .stamps
            .check(&engine, row, due.mac.as_deref())
            .await?
        {
            Checked::Good => {}
            Checked::Refused { why, first } => {
                let id = format!("{}/{}", due.key, due.version);
                self.ctx.refuse_state("key_versions", &id, why, first);
                return Ok(());
            }
        }
        // Due by its authenticated date only: a `destroying_at` set by hand is no
        // shortcut past the waiting period.
        if due.destroy_at > now {
            let id = format!("{}/{}/destroying_at", due.key, due.version);
            let first = self.ctx.stamps.first_refusal(&format!("key_versions/{id}"));
            self.ctx
                .refuse_state("key_versions", &id, Unverified::Forged, first);
            return Ok(());
        }
        // Only the object made for this version is destroyed (never a system key or
        // another key's object named by a changed row); one already gone is finished.
        match self
            .ctx
            .verify_object(&due.key, due.version, due.hsm_id)
            .await
        {
            Ok(_) => {}
            Err(ServiceError::StateForged(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        match db.begin_destruction(&due.key, due.version, now).await {
            Ok(()) => {}
            // Cancelled or finished meanwhile.
            Err(StoreError::Conflict(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let existed = self.ctx.engine()?.destroy_object(due.hsm_id).await?;
        crate::fault::point("after-hsm-destroy");
        let rec = db
            .finish_destruction(&due.key, due.version, self.ctx.clock.now_ms())
            .await?;
        tracing::warn!(
            key = %rec.name,
            version = due.version,
            hsm_object = %due.hsm_id,
            object_existed = existed,
            "key version destroyed"
        );
        self.ctx.record_job(
            "job.destroy",
            true,
            Some((rec.name.as_str(), Some(due.version))),
            &format!("hsm_object={} object_existed={existed}", due.hsm_id),
        );
        self.ctx.cache.put(rec);
        Ok(())
    }
}

/// Objects this node has already dropped its handles to.
pub struct Forgotten {
    done: HashSet<ObjectId>,
    /// Destruction time up to which tombstones were read (minus a margin for clock
    /// differences between nodes).
    seen_until: i64,
}

impl Forgotten {
    /// How far back each poll looks again (clock skew between nodes, late commits, a
    /// destruction that began before this process started).
    const MARGIN_MS: i64 = 5 * 60 * 1000;

    async fn sweep(&mut self, ctx: &Context, system: &System, engine: &KeyEngine) -> Result<()> {
        let since = self.seen_until.saturating_sub(Self::MARGIN_MS);
        for (object, at) in ctx.db(system).destroyed_since(since).await? {
            self.seen_until = self.seen_until.max(at);
            if self.done.insert(object) {
                engine.forget_object(object).await?;
            }
        }
        Ok(())
    }
}
