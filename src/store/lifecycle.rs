//! The key lifecycle (DESIGN §3, [`LifecycleStore`]): retirement and its cancellation,
//! retention, the scheduled rotations and destructions that are due, the destroyer's two
//! steps, and the tombstones of destroyed versions — on the `keys`, `key_versions` and
//! `key_tombstones` rows. [`apply_in`] makes a [`LifecycleChange`] inside a transaction,
//! for an approval's completion too.
//!
//! Invariants:
//! - Every change is one conditional statement (or several in one transaction), so two
//!   nodes racing for the same row cannot both win: a lost race is a `Conflict` naming
//!   what won.
//! - A version whose destruction has started (`destroying_at` set) can only become
//!   DESTROYED; a trigger refuses anything else, so a cancel can never revive a version
//!   whose HSM object may already be gone.
//! - A tombstone is written by the database itself, in the transaction that marks the
//!   version DESTROYED, and is never updated or deleted. It carries `seq`, MAX + 1 taken
//!   in that transaction (serialized: SQLite's single writer, PostgreSQL's advisory lock
//!   in the trigger; UNIQUE), so sequence numbers come in commit order without gaps and
//!   nodes read tombstones by sequence, never by time (migration 0013).
//!
//! - Every state change here leaves ENABLED (or stays out of it) and advances the row's
//!   `state_seq` (ADR 12). A scheduled row carries the HSM's MAC of (key, version,
//!   object, SCHEDULED_FOR_DESTRUCTION, destroy_at, sequence), handed in by the service,
//!   and is written only from the sequence that MAC was made for; a cancelled one has
//!   no MAC. Only `keys.rs` makes a version ENABLED.
//!
//! Must not import: table-family files of `store/` other than `keys.rs` (which must not
//! import this one); tonic, prost, cryptoki.

use sqlx::Row;

use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::keys::{load_key, KeyLookup, KeyRecord};
use super::pool::SqlStore;
use super::rows::{get, object_id_from_hex, u32_of};
use crate::keys::{KeyId, ObjectId, VersionState};

/// A lifecycle change to one key, made in one transaction (directly, or with the
/// completion of the approval request that ordered it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleChange {
    /// ENABLED/DISABLED → SCHEDULED_FOR_DESTRUCTION for each listed version, due at
    /// `destroy_at`; a `Conflict` (nothing changed) if any is in another state.
    Schedule {
        /// Versions to retire, each with the HSM's MAC of its scheduled row (ADR 12).
        versions: Vec<VersionStamp>,
        /// When the destroyer may act (Unix ms).
        destroy_at: i64,
        /// The approval request that ordered it.
        request: Option<String>,
    },
    /// SCHEDULED_FOR_DESTRUCTION → DISABLED for each listed version, unless the
    /// destroyer has started on it (`Conflict::Destroying`).
    Cancel {
        /// Versions to restore.
        versions: Vec<u32>,
    },
    /// Sets or clears the retention date (and forgets an earlier application of it).
    Retention {
        /// The new date (Unix ms).
        retain_until: Option<i64>,
        /// The HSM's MAC of (key, date) when a date is set (ADR 12).
        mac: Option<String>,
    },
    /// The retention job: schedules every version not yet retired, like `Schedule`,
    /// and records that the retention date was acted on — only if the date has passed
    /// and was not acted on already (`Conflict::RetentionNotDue`).
    ApplyRetention {
        /// When the destroyer may act (Unix ms).
        destroy_at: i64,
        /// Every version not yet retired, with the MAC of its scheduled row; a version
        /// not listed (made meanwhile) makes the change `Conflict::ChangedConcurrently`.
        versions: Vec<VersionStamp>,
        /// The MAC of the retention date as applied, stored in the same transaction.
        applied_mac: String,
    },
}

/// A version's new state sequence (its current one plus one: the change applies only
/// from that) and the HSM's MAC of the row it becomes (ADR 12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionStamp {
    /// The version.
    pub version: u32,
    /// Its new `state_seq`.
    pub seq: i64,
    /// The MAC (hex).
    pub mac: String,
}

/// A version whose destruction is due.
#[derive(Clone, Debug)]
pub struct DueDestruction {
    /// Key id.
    pub key: KeyId,
    /// Version.
    pub version: u32,
    /// Its HSM object.
    pub hsm_id: ObjectId,
    /// When it is due (Unix ms).
    pub destroy_at: i64,
    /// Its state sequence.
    pub state_seq: i64,
    /// The HSM's MAC of its scheduled row, if any (the destroyer acts only on a valid one).
    pub mac: Option<String>,
}

/// The permanent record of a destroyed version.
#[derive(Clone, Debug)]
pub struct Tombstone {
    /// Key id.
    pub key: KeyId,
    /// Version.
    pub version: u32,
    /// The destroyed HSM object's `CKA_ID`.
    pub hsm_id: ObjectId,
    /// Unix ms.
    pub destroyed_at: i64,
    /// The approval request that retired it, if any.
    pub retire_request: Option<String>,
}

/// Storage of the key lifecycle.
#[async_trait::async_trait]
pub trait LifecycleStore: Send + Sync + 'static {
    /// Applies a lifecycle change in one transaction.
    async fn apply_lifecycle(
        &self,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord>;

    /// Ids of keys whose primary version is ENABLED and older than the key's rotation
    /// period. (The usage limit is enforced where wraps are reserved.)
    async fn keys_due_rotation(&self, now: i64) -> Result<Vec<KeyId>>;

    /// Ids of keys whose retention date has passed and was not acted on yet.
    async fn keys_due_retention(&self, now: i64) -> Result<Vec<KeyId>>;

    /// Versions SCHEDULED_FOR_DESTRUCTION whose `destroy_at` has passed (or whose
    /// destruction was started), oldest first.
    async fn due_destructions(&self, now: i64, limit: u32) -> Result<Vec<DueDestruction>>;

    /// Marks the destruction of a due version as started (no cancelling from now on).
    /// `Conflict::NotDue` if it is not due yet, `Conflict::VersionState` if it is no
    /// longer scheduled.
    async fn begin_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<()>;

    /// SCHEDULED_FOR_DESTRUCTION (started) → DESTROYED, writing the tombstone, in one
    /// transaction. A version already DESTROYED is left as it is.
    async fn finish_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<KeyRecord>;

    /// The tombstones numbered after `seq` (their database sequence, see
    /// [`Self::last_tombstone_seq`]), lowest first, at most `limit`: `(seq, HSM object)`,
    /// so every node can drop what it still holds of them. Read by sequence, never by
    /// time: no node's clock decides what it sees.
    async fn tombstones_after(&self, seq: i64, limit: u32) -> Result<Vec<(i64, ObjectId)>>;

    /// The highest tombstone sequence number so far (0 when none).
    async fn last_tombstone_seq(&self) -> Result<i64>;

    /// The tombstones of a key.
    async fn tombstones(&self, key: &KeyId) -> Result<Vec<Tombstone>>;
}

const SCHEDULED: &str = "SCHEDULED_FOR_DESTRUCTION";

/// The state of a version as a conflict (or `NotFound`), after a conditional update
/// matched nothing.
async fn conflict(tx: &mut sqlx::AnyConnection, key: &KeyId, version: u32) -> StoreError {
    let row = sqlx::query(
        "SELECT state, destroying_at FROM key_versions WHERE key_id = $1 AND version = $2",
    )
    .bind(key.to_string())
    .bind(i64::from(version))
    .fetch_optional(&mut *tx)
    .await;
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) => return StoreError::NotFound,
        Err(e) => return classify(e),
    };
    let state: String = match get(&row, "state") {
        Ok(s) => s,
        Err(e) => return e,
    };
    let destroying: Option<i64> = get(&row, "destroying_at").unwrap_or(None);
    match VersionState::parse(&state) {
        Some(VersionState::ScheduledForDestruction) if destroying.is_some() => {
            StoreError::Conflict(Conflict::Destroying)
        }
        Some(s) => StoreError::Conflict(Conflict::VersionState(s)),
        None => StoreError::Corrupt("version state"),
    }
}

/// Inside a transaction: applies `change` to `key`.
pub(super) async fn apply_in(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    change: &LifecycleChange,
    now: i64,
) -> Result<()> {
    match change {
        LifecycleChange::Schedule {
            versions,
            destroy_at,
            request,
        } => {
            for v in versions {
                schedule_in(tx, key, v, *destroy_at, request.as_deref(), now).await?;
            }
        }
        LifecycleChange::Cancel { versions } => {
            for &v in versions {
                let done = sqlx::query(
                    "UPDATE key_versions SET state = 'DISABLED', destroy_at = NULL, \
                     retire_request = NULL, updated_at = $1, state_seq = state_seq + 1, mac = NULL \
                     WHERE key_id = $2 AND version = $3 AND state = $4 \
                     AND destroying_at IS NULL",
                )
                .bind(now)
                .bind(key.to_string())
                .bind(i64::from(v))
                .bind(SCHEDULED)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                if done.rows_affected() != 1 {
                    return Err(conflict(tx, key, v).await);
                }
            }
        }
        LifecycleChange::Retention { retain_until, mac } => {
            let done = sqlx::query(
                "UPDATE keys SET retain_until = $1, retention_applied_at = NULL, \
                 retention_mac = $2 WHERE id = $3",
            )
            .bind(*retain_until)
            .bind(mac.clone())
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound);
            }
        }
        LifecycleChange::ApplyRetention {
            destroy_at,
            versions,
            applied_mac,
        } => {
            let done = sqlx::query(
                "UPDATE keys SET retention_applied_at = $1, retention_mac = $2 WHERE id = $3 \
                 AND retention_applied_at IS NULL AND retain_until IS NOT NULL \
                 AND retain_until <= $1",
            )
            .bind(now)
            .bind(applied_mac.clone())
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict(Conflict::RetentionNotDue));
            }
            for v in versions {
                schedule_in(tx, key, v, *destroy_at, None, now).await?;
            }
            let left: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM key_versions WHERE key_id = $1 \
                 AND state IN ('ENABLED', 'DISABLED')",
            )
            .bind(key.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            if left != 0 {
                return Err(StoreError::Conflict(Conflict::ChangedConcurrently));
            }
        }
    }
    Ok(())
}

/// ENABLED/DISABLED → SCHEDULED_FOR_DESTRUCTION for one version at the sequence its MAC
/// was made for.
async fn schedule_in(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    v: &VersionStamp,
    destroy_at: i64,
    request: Option<&str>,
    now: i64,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE key_versions SET state = $1, destroy_at = $2, retire_request = $3, \
         updated_at = $4, state_seq = $5, mac = $6 \
         WHERE key_id = $7 AND version = $8 AND state IN ('ENABLED', 'DISABLED') \
         AND state_seq = $9",
    )
    .bind(SCHEDULED)
    .bind(destroy_at)
    .bind(request.map(str::to_string))
    .bind(now)
    .bind(v.seq)
    .bind(v.mac.clone())
    .bind(key.to_string())
    .bind(i64::from(v.version))
    .bind(v.seq - 1)
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    if done.rows_affected() != 1 {
        return Err(match conflict(tx, key, v.version).await {
            // Still retirable: its sequence moved (another change came first).
            StoreError::Conflict(Conflict::VersionState(
                VersionState::Enabled | VersionState::Disabled,
            )) => StoreError::Conflict(Conflict::ChangedConcurrently),
            e => e,
        });
    }
    Ok(())
}

fn key_ids(rows: Vec<String>) -> Result<Vec<KeyId>> {
    rows.iter()
        .map(|s| KeyId::parse(s).ok_or(StoreError::Corrupt("key id")))
        .collect()
}

#[async_trait::async_trait]
impl LifecycleStore for SqlStore {
    async fn apply_lifecycle(
        &self,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        apply_in(&mut tx, key, change, now).await?;
        let rec = load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn keys_due_rotation(&self, now: i64) -> Result<Vec<KeyId>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT k.id FROM keys k JOIN key_versions v \
             ON v.key_id = k.id AND v.version = k.primary_version \
             WHERE v.state = 'ENABLED' AND k.rotation_period_ms IS NOT NULL \
             AND v.created_at + k.rotation_period_ms <= $1 ORDER BY k.name",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        key_ids(rows)
    }

    async fn keys_due_retention(&self, now: i64) -> Result<Vec<KeyId>> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM keys WHERE retain_until IS NOT NULL AND retain_until <= $1 \
             AND retention_applied_at IS NULL ORDER BY name",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        key_ids(rows)
    }

    async fn due_destructions(&self, now: i64, limit: u32) -> Result<Vec<DueDestruction>> {
        let rows = sqlx::query(
            "SELECT key_id, version, hsm_id, destroy_at, state_seq, mac FROM key_versions \
             WHERE state = $1 \
             AND (destroy_at <= $2 OR destroying_at IS NOT NULL) \
             ORDER BY destroy_at, key_id, version LIMIT $3",
        )
        .bind(SCHEDULED)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| {
                Ok(DueDestruction {
                    key: KeyId::parse(&get::<String>(r, "key_id")?)
                        .ok_or(StoreError::Corrupt("key id"))?,
                    version: u32_of(get::<i64>(r, "version")?)?,
                    hsm_id: object_id_from_hex(&get::<String>(r, "hsm_id")?)?,
                    destroy_at: get::<Option<i64>>(r, "destroy_at")?.unwrap_or(0),
                    state_seq: get(r, "state_seq")?,
                    mac: get(r, "mac")?,
                })
            })
            .collect()
    }

    async fn begin_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE key_versions SET destroying_at = COALESCE(destroying_at, $1) \
             WHERE key_id = $2 AND version = $3 AND state = $4 \
             AND (destroy_at <= $1 OR destroying_at IS NOT NULL)",
        )
        .bind(now)
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(SCHEDULED)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            // Still scheduled and not started: the update's only other condition, the
            // due date, is ahead.
            return Err(match conflict(&mut tx, key, version).await {
                StoreError::Conflict(Conflict::VersionState(
                    VersionState::ScheduledForDestruction,
                )) => StoreError::Conflict(Conflict::NotDue),
                e => e,
            });
        }
        tx.commit().await.map_err(classify)
    }

    async fn finish_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE key_versions SET state = 'DESTROYED', destroyed_at = $1, updated_at = $1, \
             state_seq = state_seq + 1, mac = NULL \
             WHERE key_id = $2 AND version = $3 AND state = $4 AND destroying_at IS NOT NULL",
        )
        .bind(now)
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(SCHEDULED)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            match conflict(&mut tx, key, version).await {
                StoreError::Conflict(Conflict::VersionState(VersionState::Destroyed)) => {}
                e => return Err(e),
            }
        }
        let rec = load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn tombstones_after(&self, seq: i64, limit: u32) -> Result<Vec<(i64, ObjectId)>> {
        let rows = sqlx::query(
            "SELECT seq, hsm_id FROM key_tombstones WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| {
                Ok((
                    get::<i64>(r, "seq")?,
                    object_id_from_hex(&get::<String>(r, "hsm_id")?)?,
                ))
            })
            .collect()
    }

    async fn last_tombstone_seq(&self) -> Result<i64> {
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM key_tombstones")
            .fetch_one(&self.reader)
            .await
            .map_err(classify)?;
        Ok(last.unwrap_or(0))
    }

    async fn tombstones(&self, key: &KeyId) -> Result<Vec<Tombstone>> {
        let rows = sqlx::query(
            "SELECT version, hsm_id, destroyed_at, retire_request FROM key_tombstones \
             WHERE key_id = $1 ORDER BY version",
        )
        .bind(key.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|r| {
                Ok(Tombstone {
                    key: *key,
                    version: u32_of(get::<i64>(r, "version")?)?,
                    hsm_id: object_id_from_hex(&get::<String>(r, "hsm_id")?)?,
                    destroyed_at: get(r, "destroyed_at")?,
                    retire_request: r
                        .try_get::<Option<String>, _>("retire_request")
                        .map_err(|_| StoreError::Corrupt("column type"))?,
                })
            })
            .collect()
    }
}
