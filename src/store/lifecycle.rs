//! Storage of the key lifecycle (DESIGN §3): usage-bounded wrap reservations, retirement
//! and its cancellation, retention, the destroyer's two steps, tombstones and the leases
//! that keep each background job on one node at a time.
//!
//! Invariants:
//! - Every change is one conditional statement (or several in one transaction), so two
//!   nodes racing for the same row cannot both win: a lost race is `StateConflict`.
//! - A version whose destruction has started (`destroying_at` set) can only become
//!   DESTROYED; a trigger refuses anything else, so a cancel can never revive a version
//!   whose HSM object may already be gone.
//! - A tombstone is written by the database itself, in the transaction that marks the
//!   version DESTROYED, and is never updated or deleted.
//! - `wrap_count` never passes the usage limit given to [`reserve_wraps_within`].
//!
//! Must not import: tonic, prost, cryptoki.

use arca_hsm::ObjectId;
use sqlx::Row;

use super::sql::{classify, get, object_id_from_hex, u32_of, SqlStore};
use super::{DueDestruction, LifecycleChange, Result, StoreError, Tombstone};
use crate::keys::{KeyId, VersionState};

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
            StoreError::StateConflict {
                current: "DESTROYING",
            }
        }
        Some(s) => StoreError::StateConflict {
            current: s.as_str(),
        },
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
            for &v in versions {
                let done = sqlx::query(
                    "UPDATE key_versions SET state = $1, destroy_at = $2, retire_request = $3, \
                     updated_at = $4 \
                     WHERE key_id = $5 AND version = $6 AND state IN ('ENABLED', 'DISABLED')",
                )
                .bind(SCHEDULED)
                .bind(*destroy_at)
                .bind(request.clone())
                .bind(now)
                .bind(key.to_string())
                .bind(i64::from(v))
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                if done.rows_affected() != 1 {
                    return Err(conflict(tx, key, v).await);
                }
            }
        }
        LifecycleChange::Cancel { versions } => {
            for &v in versions {
                let done = sqlx::query(
                    "UPDATE key_versions SET state = 'DISABLED', destroy_at = NULL, \
                     retire_request = NULL, updated_at = $1 \
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
        LifecycleChange::Retention { retain_until } => {
            let done = sqlx::query(
                "UPDATE keys SET retain_until = $1, retention_applied_at = NULL WHERE id = $2",
            )
            .bind(*retain_until)
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound);
            }
        }
        LifecycleChange::ApplyRetention { destroy_at } => {
            let done = sqlx::query(
                "UPDATE keys SET retention_applied_at = $1 WHERE id = $2 \
                 AND retention_applied_at IS NULL AND retain_until IS NOT NULL \
                 AND retain_until <= $1",
            )
            .bind(now)
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            if done.rows_affected() != 1 {
                return Err(StoreError::StateConflict {
                    current: "RETENTION_APPLIED",
                });
            }
            sqlx::query(
                "UPDATE key_versions SET state = $1, destroy_at = $2, retire_request = NULL, \
                 updated_at = $3 WHERE key_id = $4 AND state IN ('ENABLED', 'DISABLED')",
            )
            .bind(SCHEDULED)
            .bind(*destroy_at)
            .bind(now)
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
    }
    Ok(())
}

/// Reserves up to `n` wraps without passing `limit`; returns the number granted.
pub(super) async fn reserve_wraps_within(
    s: &SqlStore,
    key: &KeyId,
    version: u32,
    n: u64,
    limit: u64,
) -> Result<u64> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut want = i64::try_from(n).map_err(|_| StoreError::Corrupt("reservation size"))?;
    // A conditional add cannot overshoot the limit; when it does not fit, ask for what
    // is left (another node may take it first: try again a few times).
    for _attempt in 0..4 {
        if want <= 0 {
            return Ok(0);
        }
        let done = sqlx::query(
            "UPDATE key_versions SET wrap_count = wrap_count + $1 \
             WHERE key_id = $2 AND version = $3 AND wrap_count + $1 <= $4",
        )
        .bind(want)
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(limit)
        .execute(&s.writer)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 1 {
            return u64::try_from(want).map_err(|_| StoreError::Corrupt("reservation size"));
        }
        let count: Option<i64> = sqlx::query_scalar(
            "SELECT wrap_count FROM key_versions WHERE key_id = $1 AND version = $2",
        )
        .bind(key.to_string())
        .bind(i64::from(version))
        .fetch_optional(&s.writer)
        .await
        .map_err(classify)?;
        let count = count.ok_or(StoreError::NotFound)?;
        want = want.min(limit.saturating_sub(count));
    }
    Ok(0)
}

fn key_ids(rows: Vec<String>) -> Result<Vec<KeyId>> {
    rows.iter()
        .map(|s| KeyId::parse(s).ok_or(StoreError::Corrupt("key id")))
        .collect()
}

pub(super) async fn keys_due_rotation(s: &SqlStore, now: i64) -> Result<Vec<KeyId>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT k.id FROM keys k JOIN key_versions v \
         ON v.key_id = k.id AND v.version = k.primary_version \
         WHERE v.state = 'ENABLED' AND k.rotation_period_ms IS NOT NULL \
         AND v.created_at + k.rotation_period_ms <= $1 ORDER BY k.name",
    )
    .bind(now)
    .fetch_all(&s.reader)
    .await
    .map_err(classify)?;
    key_ids(rows)
}

pub(super) async fn keys_due_retention(s: &SqlStore, now: i64) -> Result<Vec<KeyId>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM keys WHERE retain_until IS NOT NULL AND retain_until <= $1 \
         AND retention_applied_at IS NULL ORDER BY name",
    )
    .bind(now)
    .fetch_all(&s.reader)
    .await
    .map_err(classify)?;
    key_ids(rows)
}

pub(super) async fn due_destructions(
    s: &SqlStore,
    now: i64,
    limit: u32,
) -> Result<Vec<DueDestruction>> {
    let rows = sqlx::query(
        "SELECT key_id, version, hsm_id FROM key_versions WHERE state = $1 \
         AND (destroy_at <= $2 OR destroying_at IS NOT NULL) \
         ORDER BY destroy_at, key_id, version LIMIT $3",
    )
    .bind(SCHEDULED)
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&s.reader)
    .await
    .map_err(classify)?;
    rows.iter()
        .map(|r| {
            Ok(DueDestruction {
                key: KeyId::parse(&get::<String>(r, "key_id")?)
                    .ok_or(StoreError::Corrupt("key id"))?,
                version: u32_of(get::<i64>(r, "version")?)?,
                hsm_id: object_id_from_hex(&get::<String>(r, "hsm_id")?)?,
            })
        })
        .collect()
}

pub(super) async fn begin_destruction(
    s: &SqlStore,
    key: &KeyId,
    version: u32,
    now: i64,
) -> Result<()> {
    let mut tx = s.writer.begin_with(s.begin).await.map_err(classify)?;
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
        return Err(conflict(&mut tx, key, version).await);
    }
    tx.commit().await.map_err(classify)
}

pub(super) async fn finish_destruction(
    s: &SqlStore,
    key: &KeyId,
    version: u32,
    now: i64,
) -> Result<super::KeyRecord> {
    let mut tx = s.writer.begin_with(s.begin).await.map_err(classify)?;
    let done = sqlx::query(
        "UPDATE key_versions SET state = 'DESTROYED', destroyed_at = $1, updated_at = $1 \
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
            StoreError::StateConflict {
                current: "DESTROYED",
            } => {}
            e => return Err(e),
        }
    }
    let rec = s.load_key(&mut *tx, super::sql::KeyLookup::Id(key)).await?;
    tx.commit().await.map_err(classify)?;
    Ok(rec)
}

pub(super) async fn destroyed_since(s: &SqlStore, since: i64) -> Result<Vec<(ObjectId, i64)>> {
    let rows = sqlx::query(
        "SELECT hsm_id, destroyed_at FROM key_tombstones WHERE destroyed_at >= $1 \
         ORDER BY destroyed_at",
    )
    .bind(since)
    .fetch_all(&s.reader)
    .await
    .map_err(classify)?;
    rows.iter()
        .map(|r| {
            Ok((
                object_id_from_hex(&get::<String>(r, "hsm_id")?)?,
                get::<i64>(r, "destroyed_at")?,
            ))
        })
        .collect()
}

pub(super) async fn tombstones(s: &SqlStore, key: &KeyId) -> Result<Vec<Tombstone>> {
    let rows = sqlx::query(
        "SELECT version, hsm_id, destroyed_at, retire_request FROM key_tombstones \
         WHERE key_id = $1 ORDER BY version",
    )
    .bind(key.to_string())
    .fetch_all(&s.reader)
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

pub(super) async fn acquire_lease(
    s: &SqlStore,
    name: &str,
    holder: &str,
    ttl_ms: i64,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO job_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
         expires_at = excluded.expires_at \
         WHERE job_leases.holder = excluded.holder OR job_leases.expires_at <= $4",
    )
    .bind(name.to_string())
    .bind(holder.to_string())
    .bind(now.saturating_add(ttl_ms))
    .bind(now)
    .execute(&s.writer)
    .await
    .map_err(classify)?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn release_lease(s: &SqlStore, name: &str, holder: &str) -> Result<()> {
    sqlx::query("UPDATE job_leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
        .bind(name.to_string())
        .bind(holder.to_string())
        .execute(&s.writer)
        .await
        .map_err(classify)?;
    Ok(())
}
