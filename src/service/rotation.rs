//! Rotation: a new version generated in the HSM becomes primary (DESIGN §3). One
//! implementation, [`Rotation::rotate`], serves the `RotateKey` call (direct or approved),
//! the scheduled rotation job and the usage limit.
//!
//! Invariants:
//! - Version numbers increase by one; the primary key on (key, version) decides a race
//!   between nodes, and the loser retries with the next number after a random pause
//!   ([`When::Always`]) or stands down ([`When::IfPrimary`]: someone else rotated).
//! - A conditional rotation acts only if the version it expects is still primary, so
//!   several nodes noticing one due rotation make one new version between them.
//! - A key whose every version is retired is not rotated back to life.
//! - The HSM object of a version whose row was provably not stored is destroyed; after an
//!   ambiguous failure it is kept (an orphan at worst, never a version without its key).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::enabled_row;
use std::sync::Arc;
use std::time::Duration;

use super::access::{act, Guard, Scope};
use super::context::{Context, Permit};
use super::error::{Conflict, Result, ServiceError};
use super::facts::{Facts, Outcome};
use super::gate::{key_params, AdminOutcome, Commit, Gate};
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};
use crate::quorum::approvals::Operation;
use crate::store::{KeyRecord, StoreError};

/// Tries of a rotation that keeps losing the version-number race to other nodes.
const ROTATION_ATTEMPTS: u32 = 32;

/// Which key to rotate.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// By name.
    Name(&'a KeyName),
    /// By id.
    Id(&'a KeyId),
}

/// When to rotate.
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// Now (a `RotateKey` call): a lost race is retried with the next number.
    Always,
    /// Only if `version` is still primary (jobs, the usage limit), for the given reason:
    /// a lost race means someone else rotated, and nothing more is done.
    IfPrimary {
        /// The primary version that was found due.
        version: u32,
        /// Why (recorded in the log and the audit trail).
        why: &'static str,
    },
}

/// Whether any version is ENABLED or DISABLED (a key whose versions are all retired or
/// destroyed is retired).
pub fn has_live_version(key: &KeyRecord) -> bool {
    key.versions
        .iter()
        .any(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
}

/// A random pause before retry `attempt` (≥ 1) of a lost rotation race: up to 1, 2, 4, 8,
/// then 16 ms.
fn backoff(attempt: u32) -> Duration {
    let cap_us = 1000u64 << attempt.saturating_sub(1).min(4);
    let r = crate::secret::random::<8>().map_or(cap_us / 2, |b| u64::from_le_bytes(*b));
    Duration::from_micros(r % cap_us + 1)
}

/// The rotation service.
pub struct Rotation {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
    /// Local rotations queue here; other nodes' lose the version-number race instead.
    serial: tokio::sync::Mutex<()>,
}

impl Rotation {
    /// The rotation service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, gate: Arc<Gate>) -> Self {
        Rotation {
            ctx,
            guard,
            gate,
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// `RotateKey`: adds a new version in the HSM and makes it primary, or (gated) opens
    /// the approval request for it.
    pub async fn rotate_key(&self, caller: &super::Caller, name: &str) -> Outcome<AdminOutcome> {
        let mut facts = Facts::key(name, None);
        let result = async {
            self.ctx.engine()?;
            let name = KeyName::parse(name)?;
            let proof = self
                .guard
                .authorize::<act::RotateKey>(caller, Scope::key(name.clone()))
                .await?;
            if self.gate.needs_quorum(Operation::RotateKey) {
                // Refused now rather than after K approvals: the key must exist and live.
                let key = self.ctx.db(&proof).key_by_name(&name).await?;
                if !has_live_version(&key) {
                    return Err(ServiceError::Conflict(Conflict::KeyRetired));
                }
                let req = self
                    .gate
                    .open(&proof, Operation::RotateKey, key_params(&name, None))
                    .await?;
                return Ok(AdminOutcome::Pending(Box::new(req)));
            }
            let rec = self
                .rotate(&proof, Target::Name(&name), When::Always, Commit::Direct)
                .await?
                .ok_or(ServiceError::Aborted("concurrent rotation; retry"))?;
            Ok(AdminOutcome::Done(rec))
        }
        .await;
        // A rotation that ran names the version it made.
        if let Ok(AdminOutcome::Done(rec)) = &result {
            facts.version = Some(rec.primary_version);
        }
        Outcome::new(result, facts)
    }

    /// Adds the next version in the HSM and makes it primary, `when` says so, committed
    /// as `commit` says. `None`: a conditional rotation found another primary (someone
    /// else rotated).
    pub async fn rotate(
        &self,
        permit: &impl Permit,
        target: Target<'_>,
        when: When,
        commit: Commit<'_>,
    ) -> Result<Option<KeyRecord>> {
        let _serial = self.serial.lock().await;
        let db = self.ctx.db(permit);
        for attempt in 0..ROTATION_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let key = match target {
                Target::Name(n) => db.key_by_name(n).await?,
                Target::Id(id) => db.key_by_id(id).await?,
            };
            if let When::IfPrimary { version, .. } = when {
                if key.primary_version != version || !has_live_version(&key) {
                    self.ctx.cache.put(key);
                    return Ok(None);
                }
            } else if !has_live_version(&key) {
                return Err(ServiceError::Conflict(Conflict::KeyRetired));
            }
            let next = key
                .versions
                .last()
                .map_or(0, |v| v.version)
                .checked_add(1)
                .ok_or(ServiceError::Conflict(Conflict::TooManyVersions))?;
            let object = self
                .ctx
                .engine()?
                .create_version_object(key.id, next)
                .await?;
            let now = self.ctx.clock.now_ms();
            let mac = self
                .ctx
                .stamp(enabled_row(&key.id, next, &object, 1))
                .await?;
            let stored = match commit {
                Commit::Direct => db.add_version(&key.id, next, &object, &mac, now).await,
                Commit::Approved(id, approved) => {
                    db.complete_add_version(id, approved, &key.id, next, &object, &mac, now)
                        .await
                }
            };
            match stored {
                Ok(rec) => {
                    match when {
                        When::Always => {
                            tracing::info!(key = %rec.name, version = next, "key rotated")
                        }
                        When::IfPrimary { why, .. } => {
                            tracing::info!(key = %rec.name, version = next, reason = why, "key rotated");
                            self.ctx.record_job(
                                "job.rotate",
                                true,
                                Some((rec.name.as_str(), Some(next))),
                                &format!("reason={why}"),
                            );
                        }
                    }
                    return Ok(Some(self.ctx.cache.put(rec)));
                }
                Err(e) => {
                    self.discard_unstored_object(object, &e).await;
                    match (e, when) {
                        (StoreError::AlreadyExists, When::Always) => continue,
                        (StoreError::AlreadyExists, When::IfPrimary { .. }) => return Ok(None),
                        (e, _) => return Err(e.into()),
                    }
                }
            }
        }
        Err(ServiceError::Aborted("concurrent rotation; retry"))
    }

    /// Destroys the HSM object of a new version whose store write failed, but only when
    /// the failure proves the version was not stored (a lost race, a refused state).
    async fn discard_unstored_object(&self, object: ObjectId, e: &StoreError) {
        let not_stored = matches!(
            e,
            StoreError::AlreadyExists | StoreError::Conflict(_) | StoreError::NotFound
        );
        if !not_stored {
            tracing::warn!(object = %object, "kept the HSM object of a rotation whose commit may have happened");
            return;
        }
        match self.ctx.engine() {
            Ok(engine) => {
                if let Err(de) = engine.destroy_object(object).await {
                    tracing::warn!(error = %de, "could not remove the HSM object of a failed rotation");
                }
            }
            Err(_) => {
                tracing::warn!(object = %object, "sealed: the HSM object of a failed rotation stays")
            }
        }
    }
}
