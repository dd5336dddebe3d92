//! The key lifecycle (DESIGN §3) as callers drive it: disable and enable a version,
//! retire a version or a whole key with a waiting period, cancel a retirement, set a
//! retention date. Each is gated by the quorum policy ([`Gate`]); the approved form runs
//! from `quorum::approvals` through [`Lifecycle::run_approved`]. The background side
//! (retention, scheduled rotation, destruction) is `service::jobs`.
//!
//! Invariants:
//! - A retired version (`SCHEDULED_FOR_DESTRUCTION`) refuses unwrap from the moment the
//!   retirement commits; only the primary may wrap, and a retired primary cannot.
//! - The primary version cannot be retired while another version is enabled.
//! - A change is checked against the key when asked (no request is made for a change that
//!   cannot happen) and again when it runs; the store's conditional write decides races.
//! - The waiting period of a retirement is within the lifecycle policy's bounds, when asked
//!   and again when an approved retirement runs.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod plan;

use crate::authz::stamp::{enabled_row, retention_row, scheduled_row};
use crate::store::{EnabledStamp, VersionStamp};
use std::sync::Arc;

use super::access::{act, Act, Guard, Scope};
use super::context::{Context, Permit};
use super::error::{Conflict, Result, ServiceError};
use super::facts::{Facts, Outcome};
use super::gate::{key_params, AdminOutcome, Commit, Gate};
use super::Caller;
use crate::keys::{KeyId, KeyName, VersionState};
use crate::quorum::approvals::{Operation, Parameters, PARAM_RETAIN_UNTIL, PARAM_WAITING_MS};
use crate::store::{Conflict as Found, KeyRecord, LifecycleChange, StoreError};
use plan::{plan_cancel, plan_retire, transition_sources};

/// What a lifecycle conflict found in the store means for the caller.
fn lifecycle_conflict(e: StoreError) -> ServiceError {
    match e {
        StoreError::Conflict(found) => ServiceError::Conflict(match found {
            Found::Destroying => Conflict::DestructionStarted,
            Found::VersionState(VersionState::Destroyed) => Conflict::VersionDestroyed,
            Found::VersionState(VersionState::ScheduledForDestruction) => {
                Conflict::VersionScheduled
            }
            Found::VersionState(VersionState::Enabled | VersionState::Disabled) => {
                Conflict::VersionNotScheduled
            }
            _ => Conflict::IllegalTransition,
        }),
        StoreError::NotFound => ServiceError::NotFound("key version not found"),
        e => e.into(),
    }
}

fn param_i64(p: &Parameters, name: &str) -> Result<i64> {
    p.get(name)
        .and_then(|v| v.parse().ok())
        .ok_or(ServiceError::InvalidArgument("invalid request parameters"))
}

/// The lifecycle use cases.
pub struct Lifecycle {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
}

impl Lifecycle {
    /// The lifecycle service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, gate: Arc<Gate>) -> Self {
        Lifecycle { ctx, guard, gate }
    }

    /// Authorizes `A` on the key `name` (unsealed only).
    async fn authorize<A: Act>(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<(KeyName, super::access::Authorized<A>)> {
        self.ctx.engine()?;
        let name = KeyName::parse(name)?;
        let proof = self
            .guard
            .authorize::<A>(caller, Scope::key(name.clone()))
            .await?;
        Ok((name, proof))
    }

    /// `DisableKeyVersion`: the version stops unwrapping at once (reversible).
    pub async fn disable_version(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Outcome<AdminOutcome> {
        let result = async {
            let (name, proof) = self
                .authorize::<act::DisableKeyVersion>(caller, name)
                .await?;
            let op = Operation::DisableKeyVersion;
            self.set_state(&proof, op, &name, version, VersionState::Disabled)
                .await
        }
        .await;
        Outcome::new(result, Facts::key(name, Some(version)))
    }

    /// `EnableKeyVersion`: a disabled version unwraps again.
    pub async fn enable_version(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Outcome<AdminOutcome> {
        let result = async {
            let (name, proof) = self
                .authorize::<act::EnableKeyVersion>(caller, name)
                .await?;
            let op = Operation::EnableKeyVersion;
            self.set_state(&proof, op, &name, version, VersionState::Enabled)
                .await
        }
        .await;
        Outcome::new(result, Facts::key(name, Some(version)))
    }

    async fn set_state<A: Act>(
        &self,
        proof: &super::access::Authorized<A>,
        op: Operation,
        name: &KeyName,
        version: u32,
        to: VersionState,
    ) -> Result<AdminOutcome> {
        if self.gate.needs_quorum(op) {
            // Checked now, so that no request is made for a change that cannot happen.
            let key = self.ctx.db(proof).key_by_name(name).await?;
            let current = key
                .version(version)
                .ok_or(ServiceError::NotFound("key version not found"))?;
            if current.state == to {
                return Ok(AdminOutcome::Done(key));
            }
            transition_sources(current.state, to)?;
            let req = self
                .gate
                .open(proof, op, key_params(name, Some(version)))
                .await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        let rec = self
            .change_state(proof, name, version, to, Commit::Direct)
            .await?;
        Ok(AdminOutcome::Done(rec))
    }

    /// Moves a version to `to`, committed as `commit` says. Already in `to`: nothing
    /// changes (an approved request still completes).
    async fn change_state(
        &self,
        permit: &impl Permit,
        name: &KeyName,
        version: u32,
        to: VersionState,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let db = self.ctx.db(permit);
        let key = db.key_by_name(name).await?;
        let current = key
            .version(version)
            .ok_or(ServiceError::NotFound("key version not found"))?;
        let from = if current.state == to {
            &[][..]
        } else {
            transition_sources(current.state, to)?
        };
        let now = self.ctx.clock.now_ms();
        // Made ENABLED: the HSM's MAC for the version's next state sequence (ADR 12).
        let enabled = match to {
            VersionState::Enabled if current.state != to => {
                let seq = current.state_seq + 1;
                let row = enabled_row(&key.id, version, &current.hsm_id, seq);
                Some(EnabledStamp {
                    seq,
                    mac: self.ctx.stamp(row).await?,
                })
            }
            _ => None,
        };
        let enabled = enabled.as_ref();
        let rec = match commit {
            Commit::Direct if current.state == to => return Ok(key),
            Commit::Direct => {
                db.set_version_state(&key.id, version, from, to, enabled, now)
                    .await?
            }
            Commit::Approved(id, approved) => {
                db.complete_set_version_state(
                    id, approved, &key.id, version, from, to, enabled, now,
                )
                .await?
            }
        };
        tracing::info!(key = %rec.name, version, state = to.as_str(), "key version state changed");
        Ok(self.ctx.cache.put(rec))
    }

    /// `RetireKeyVersion` (`version`) or `RetireKey` (`None`): once approved, the
    /// version(s) are scheduled for destruction after the waiting period.
    pub async fn retire(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
        waiting_ms: i64,
    ) -> Outcome<AdminOutcome> {
        let result = match version {
            Some(_) => {
                self.retire_as::<act::RetireKeyVersion>(caller, name, version, waiting_ms)
                    .await
            }
            None => {
                self.retire_as::<act::RetireKey>(caller, name, None, waiting_ms)
                    .await
            }
        };
        Outcome::new(result, Facts::key(name, version))
    }

    async fn retire_as<A: Act>(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
        waiting_ms: i64,
    ) -> Result<AdminOutcome> {
        let (name, proof) = self.authorize::<A>(caller, name).await?;
        let waiting = self.waiting_ms(waiting_ms)?;
        let key = self.ctx.db(&proof).key_by_name(&name).await?;
        // Checked now, so that no request is made for a change that cannot happen.
        plan_retire(&key, version)?;
        let op = match version {
            Some(_) => Operation::RetireKeyVersion,
            None => Operation::RetireKey,
        };
        let mut params = key_params(&name, version);
        params.insert(PARAM_WAITING_MS.to_string(), waiting.to_string());
        let run = self.run_retire(&proof, &name, version, waiting, Commit::Direct);
        self.gate.open_or_run(&proof, op, params, run).await
    }

    /// The waiting period a retirement asks for, checked against the policy.
    fn waiting_ms(&self, requested_ms: i64) -> Result<i64> {
        self.ctx
            .cfg
            .lifecycle
            .waiting_period(requested_ms)
            .ok_or(ServiceError::InvalidArgument(
                "waiting period outside the policy's bounds",
            ))
    }

    /// Schedules the version(s) for destruction at now + `waiting_ms`.
    async fn run_retire(
        &self,
        permit: &impl Permit,
        name: &KeyName,
        version: Option<u32>,
        waiting_ms: i64,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.ctx.db(permit).key_by_name(name).await?;
        let versions = plan_retire(&key, version)?;
        let now = self.ctx.clock.now_ms();
        let destroy_at = now.saturating_add(waiting_ms);
        let change = LifecycleChange::Schedule {
            versions: schedule_stamps(&self.ctx, &key, &versions, destroy_at).await?,
            destroy_at,
            request: commit.request().map(str::to_string),
        };
        let rec = self.commit(permit, &key.id, &change, commit, now).await?;
        tracing::warn!(
            key = %rec.name,
            versions = ?versions,
            destroy_in_s = waiting_ms / 1000,
            "key versions scheduled for destruction"
        );
        Ok(rec)
    }

    /// `CancelRetirement` of `version` (or of every scheduled version): they become
    /// `DISABLED` (enable them to unwrap again).
    pub async fn cancel_retirement(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<u32>,
    ) -> Outcome<AdminOutcome> {
        let result = async {
            let (name, proof) = self
                .authorize::<act::CancelRetirement>(caller, name)
                .await?;
            let key = self.ctx.db(&proof).key_by_name(&name).await?;
            plan_cancel(&key, version)?;
            let op = Operation::CancelRetirement;
            let run = self.run_cancel(&proof, &name, version, Commit::Direct);
            self.gate
                .open_or_run(&proof, op, key_params(&name, version), run)
                .await
        }
        .await;
        Outcome::new(result, Facts::key(name, version))
    }

    async fn run_cancel(
        &self,
        permit: &impl Permit,
        name: &KeyName,
        version: Option<u32>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.ctx.db(permit).key_by_name(name).await?;
        let versions = plan_cancel(&key, version)?;
        let now = self.ctx.clock.now_ms();
        let change = LifecycleChange::Cancel {
            versions: versions.clone(),
        };
        let rec = self.commit(permit, &key.id, &change, commit, now).await?;
        tracing::warn!(key = %rec.name, versions = ?versions, "retirement cancelled; versions disabled");
        Ok(rec)
    }

    /// `SetRetention`: sets (or clears) a key's retention date.
    pub async fn set_retention(
        &self,
        caller: &Caller,
        name: &str,
        retain_until: Option<i64>,
    ) -> Outcome<AdminOutcome> {
        let result = async {
            let (name, proof) = self.authorize::<act::SetRetention>(caller, name).await?;
            self.ctx.db(&proof).key_by_name(&name).await?;
            let mut params = key_params(&name, None);
            params.insert(
                PARAM_RETAIN_UNTIL.to_string(),
                retain_until.map(|t| t.to_string()).unwrap_or_default(),
            );
            let op = Operation::SetRetention;
            let run = self.run_set_retention(&proof, &name, retain_until, Commit::Direct);
            self.gate.open_or_run(&proof, op, params, run).await
        }
        .await;
        Outcome::new(result, Facts::key(name, None))
    }

    async fn run_set_retention(
        &self,
        permit: &impl Permit,
        name: &KeyName,
        retain_until: Option<i64>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.ctx.db(permit).key_by_name(name).await?;
        let now = self.ctx.clock.now_ms();
        let mac = match retain_until {
            Some(t) => Some(self.ctx.stamp(retention_row(&key.id, t)).await?),
            None => None,
        };
        let change = LifecycleChange::Retention { retain_until, mac };
        let rec = self.commit(permit, &key.id, &change, commit, now).await?;
        tracing::info!(key = %rec.name, retain_until = ?retain_until, "retention date set");
        Ok(rec)
    }

    /// Runs an approved lifecycle request (disable, enable, retire, cancel, retention)
    /// in one transaction with the request's completion.
    pub async fn run_approved(
        &self,
        op: Operation,
        params: &Parameters,
        name: &KeyName,
        version: Option<u32>,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let Commit::Approved(_, approved) = commit else {
            return Err(ServiceError::internal(
                "an approved run without its approval",
            ));
        };
        let bad = ServiceError::InvalidArgument("invalid request parameters");
        match op {
            Operation::DisableKeyVersion | Operation::EnableKeyVersion => {
                let to = match op {
                    Operation::EnableKeyVersion => VersionState::Enabled,
                    _ => VersionState::Disabled,
                };
                let version = version.ok_or(bad)?;
                self.change_state(approved, name, version, to, commit).await
            }
            Operation::RetireKeyVersion | Operation::RetireKey => {
                // The waiting period must still be one the policy in force allows.
                let waiting = self.waiting_ms(param_i64(params, PARAM_WAITING_MS)?)?;
                let version = match op {
                    Operation::RetireKey => None,
                    _ => Some(version.ok_or(bad)?),
                };
                self.run_retire(approved, name, version, waiting, commit)
                    .await
            }
            Operation::CancelRetirement => self.run_cancel(approved, name, version, commit).await,
            Operation::SetRetention => {
                let until = match params.get(PARAM_RETAIN_UNTIL).map(String::as_str) {
                    None => return Err(bad),
                    Some("") => None,
                    Some(_) => Some(param_i64(params, PARAM_RETAIN_UNTIL)?),
                };
                self.run_set_retention(approved, name, until, commit).await
            }
            _ => Err(ServiceError::internal("not a lifecycle operation")),
        }
    }

    async fn commit(
        &self,
        permit: &impl Permit,
        key: &KeyId,
        change: &LifecycleChange,
        commit: Commit<'_>,
        now: i64,
    ) -> Result<KeyRecord> {
        let db = self.ctx.db(permit);
        let rec = match commit {
            Commit::Direct => db.apply_lifecycle(key, change, now).await,
            Commit::Approved(id, approved) => {
                db.complete_lifecycle(id, approved, key, change, now).await
            }
        }
        .map_err(lifecycle_conflict)?;
        Ok(self.ctx.cache.put(rec))
    }
}

/// The HSM's MAC of each of `versions` of `key` as it becomes SCHEDULED_FOR_DESTRUCTION
/// at `destroy_at`, for its next state sequence (ADR 12): the destroyer acts only on a
/// row that carries one.
pub(crate) async fn schedule_stamps(
    ctx: &Context,
    key: &KeyRecord,
    versions: &[u32],
    destroy_at: i64,
) -> Result<Vec<VersionStamp>> {
    let mut out = Vec::with_capacity(versions.len());
    for &v in versions {
        let r = key
            .version(v)
            .ok_or(ServiceError::NotFound("key version not found"))?;
        let seq = r.state_seq + 1;
        let row = scheduled_row(&key.id, v, &r.hsm_id, destroy_at, seq);
        out.push(VersionStamp {
            version: v,
            seq,
            mac: ctx.stamp(row).await?,
        });
    }
    Ok(out)
}
