//! Keys and their versions ([`KeyStore`]): the `keys` and `key_versions` rows — creating a
//! key, looking keys up, rotation (a new version), state changes and wrap reservations —
//! and the in-transaction steps other families reuse to make the same changes (an
//! approval's completion: [`insert_next_version`], [`change_version_state`]; reading a key
//! back: [`load_key`]).
//!
//! Invariants:
//! - Keys are never deleted (a trigger refuses DELETE), so a name is never reused;
//!   uniqueness (names forever, version numbers per key, HSM object ids) and the legal
//!   version-state edges are enforced by the database, not only here.
//! - Versions are numbered consecutively: a new version takes the next number or fails
//!   `AlreadyExists` (a rotation race is decided by the primary key).
//! - A state change is conditional on the state it starts from; what it finds instead is
//!   `Conflict::VersionState` (nothing changed).
//! - `wrap_count` is an upper bound of the wraps made under a version: nodes reserve
//!   blocks of wraps before using them, and a usage-limited reservation never passes the
//!   limit.
//! - No key material is stored: only the HSM object's id.
//!
//! Must not import: the other table-family files of `store/` (they import this one);
//! tonic, prost, cryptoki.

use sqlx::any::AnyRow;

use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::pool::SqlStore;
use super::rows::{get, object_id_from_hex, u32_of};
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};

/// A key and all its versions, ordered by version.
#[derive(Clone, Debug)]
pub struct KeyRecord {
    /// Key id (in every wrapped key).
    pub id: KeyId,
    /// Unique name.
    pub name: KeyName,
    /// Free text.
    pub description: String,
    /// The version that wraps.
    pub primary_version: u32,
    /// Unix ms.
    pub created_at: i64,
    /// Scheduled rotation: a new version when the primary is this old (ms).
    pub rotation_period_ms: Option<i64>,
    /// Retention date (Unix ms): then the whole key is scheduled for destruction.
    pub retain_until: Option<i64>,
    /// When the retention date was acted on (Unix ms).
    pub retention_applied_at: Option<i64>,
    /// The HSM's MAC of (key, `retain_until`) (ADR 12): the retention job acts only on a
    /// date that carries a valid one.
    pub retention_mac: Option<String>,
    /// Versions, ascending.
    pub versions: Vec<VersionRecord>,
}

impl KeyRecord {
    /// The version record numbered `v`.
    pub fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }
}

/// One key version.
#[derive(Clone, Debug)]
pub struct VersionRecord {
    /// 1, 2, ...
    pub version: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// `CKA_ID` of the HSM object.
    pub hsm_id: ObjectId,
    /// Upper bound of wraps made (reserved).
    pub wrap_count: u64,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of the last state change.
    pub updated_at: i64,
    /// When a scheduled destruction is due (Unix ms).
    pub destroy_at: Option<i64>,
    /// When it was destroyed (Unix ms).
    pub destroyed_at: Option<i64>,
    /// The approval request that retired it (`None`: retention, or no quorum gate).
    pub retire_request: Option<String>,
    /// When the destroyer started on it (Unix ms): no cancelling from then on.
    pub destroying_at: Option<i64>,
    /// +1 with every state change (ADR 12).
    pub state_seq: i64,
    /// The HSM's MAC that this version is ENABLED at `state_seq` (hex; ADR 12); `None`
    /// in every other state, which grants nothing.
    pub mac: Option<String>,
}

/// A new key with its first version.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// Key id.
    pub id: KeyId,
    /// Name.
    pub name: KeyName,
    /// Free text.
    pub description: String,
    /// HSM object id of version 1.
    pub first_hsm_id: ObjectId,
    /// The state MAC of version 1 (ENABLED at sequence 1).
    pub first_mac: String,
    /// Scheduled rotation period (ms).
    pub rotation_period_ms: Option<i64>,
    /// Retention date (Unix ms).
    pub retain_until: Option<i64>,
    /// The MAC of the retention date, if one is set.
    pub retention_mac: Option<String>,
    /// Unix ms.
    pub now: i64,
}

/// Storage of keys and their versions.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Inserts a key and its version 1 (ENABLED, primary) in one transaction.
    /// `AlreadyExists` if the name (or id) was ever used.
    async fn create_key(&self, key: &NewKey) -> Result<KeyRecord>;

    /// The key named `name`, with its versions.
    async fn key_by_name(&self, name: &KeyName) -> Result<KeyRecord>;

    /// The key with id `id`, with its versions.
    async fn key_by_id(&self, id: &KeyId) -> Result<KeyRecord>;

    /// Keys ordered by name, starting after `after`, at most `limit`.
    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>>;

    /// Adds version `version` (which must be the next number) with the given HSM object,
    /// ENABLED, and makes it primary, in one transaction. `AlreadyExists` if another
    /// rotation took that number first.
    async fn add_version(
        &self,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        mac: &str,
        now: i64,
    ) -> Result<KeyRecord>;

    /// Moves a version to `to` if it is in one of `from`; `Conflict::VersionState` naming
    /// the state found otherwise (`Conflict::ChangedConcurrently` if it kept changing).
    /// Its `state_seq` grows by one; `to` = ENABLED needs `enabled`, the MAC for the new
    /// sequence, and the sequence must still be the one it was computed from.
    async fn set_version_state(
        &self,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        enabled: Option<&EnabledStamp>,
        now: i64,
    ) -> Result<KeyRecord>;

    /// Sets the MAC of version `version` in `state` at sequence `seq` whose MAC is still
    /// `was` (the upgrade step); false if the row changed.
    async fn stamp_version(
        &self,
        key: &KeyId,
        version: u32,
        state: VersionState,
        seq: i64,
        was: Option<&str>,
        mac: &str,
    ) -> Result<bool>;

    /// Sets the MAC of key `key`'s retention date if it is still `retain_until` and has
    /// none (the upgrade step); false otherwise.
    async fn stamp_retention(&self, key: &KeyId, retain_until: i64, mac: &str) -> Result<bool>;

    /// Reserves `n` wraps under a version: adds `n` to its `wrap_count` and returns the
    /// new count. The caller may make `n` wraps.
    async fn reserve_wraps(&self, key: &KeyId, version: u32, n: u64) -> Result<u64>;

    /// Reserves up to `n` wraps under a version without passing `limit` wraps in all;
    /// returns how many were granted (0: the version has reached its usage limit).
    async fn reserve_wraps_within(
        &self,
        key: &KeyId,
        version: u32,
        n: u64,
        limit: u64,
    ) -> Result<u64>;
}

/// The HSM's MAC that a version is ENABLED at sequence `seq` (ADR 12), for a change to
/// ENABLED.
#[derive(Clone, Debug)]
pub struct EnabledStamp {
    /// The version's new `state_seq` (its current one plus one).
    pub seq: i64,
    /// The MAC (hex).
    pub mac: String,
}

/// How to find a key.
pub(super) enum KeyLookup<'a> {
    Name(&'a KeyName),
    Id(&'a KeyId),
}

/// The joined key/version select, with a WHERE clause appended.
macro_rules! key_select {
    ($tail:literal) => {
        concat!(
            "SELECT k.id, k.name, k.description, k.primary_version, k.created_at, ",
            "k.rotation_period_ms, k.retain_until, k.retention_applied_at, k.retention_mac, ",
            "v.version, v.state, v.hsm_id, v.wrap_count, v.created_at AS v_created_at, ",
            "v.updated_at, v.destroy_at, v.destroyed_at, v.retire_request, v.destroying_at, ",
            "v.state_seq, v.mac ",
            "FROM keys k JOIN key_versions v ON v.key_id = k.id ",
            $tail
        )
    };
}

const KEY_SELECT_BY_NAME: &str = key_select!("WHERE k.name = $1 ORDER BY v.version");
const KEY_SELECT_BY_ID: &str = key_select!("WHERE k.id = $1 ORDER BY v.version");
const KEY_SELECT_PAGE: &str = key_select!(
    "WHERE k.id IN (SELECT id FROM keys WHERE name > $1 ORDER BY name LIMIT $2) \
     ORDER BY k.name, v.version"
);

/// Groups joined key/version rows (ordered by key, then version) into records.
fn keys_from_rows(rows: &[AnyRow]) -> Result<Vec<KeyRecord>> {
    let mut out: Vec<KeyRecord> = Vec::new();
    for row in rows {
        let id_text: String = get(row, "id")?;
        let id = KeyId::parse(&id_text).ok_or(StoreError::Corrupt("key id"))?;
        let version = VersionRecord {
            version: u32_of(get::<i64>(row, "version")?)?,
            state: VersionState::parse(&get::<String>(row, "state")?)
                .ok_or(StoreError::Corrupt("version state"))?,
            hsm_id: object_id_from_hex(&get::<String>(row, "hsm_id")?)?,
            wrap_count: u64::try_from(get::<i64>(row, "wrap_count")?)
                .map_err(|_| StoreError::Corrupt("wrap count"))?,
            created_at: get(row, "v_created_at")?,
            updated_at: get(row, "updated_at")?,
            destroy_at: get(row, "destroy_at")?,
            destroyed_at: get(row, "destroyed_at")?,
            retire_request: get(row, "retire_request")?,
            destroying_at: get(row, "destroying_at")?,
            state_seq: get(row, "state_seq")?,
            mac: get(row, "mac")?,
        };
        match out.last_mut() {
            Some(k) if k.id == id => k.versions.push(version),
            _ => out.push(KeyRecord {
                id,
                name: KeyName::parse(&get::<String>(row, "name")?)
                    .map_err(|_| StoreError::Corrupt("key name"))?,
                description: get(row, "description")?,
                primary_version: u32_of(get::<i64>(row, "primary_version")?)?,
                created_at: get(row, "created_at")?,
                rotation_period_ms: get(row, "rotation_period_ms")?,
                retain_until: get(row, "retain_until")?,
                retention_applied_at: get(row, "retention_applied_at")?,
                retention_mac: get(row, "retention_mac")?,
                versions: vec![version],
            }),
        }
    }
    Ok(out)
}

/// The key found by `by`, with its versions, read through `exec` (a pool, or an open
/// transaction to see its own writes).
pub(super) async fn load_key<'e, E>(exec: E, by: KeyLookup<'_>) -> Result<KeyRecord>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = match by {
        KeyLookup::Name(name) => {
            sqlx::query(KEY_SELECT_BY_NAME)
                .bind(name.to_string())
                .fetch_all(exec)
                .await
        }
        KeyLookup::Id(id) => {
            sqlx::query(KEY_SELECT_BY_ID)
                .bind(id.to_string())
                .fetch_all(exec)
                .await
        }
    }
    .map_err(classify)?;
    let mut keys = keys_from_rows(&rows)?;
    keys.pop().ok_or(StoreError::NotFound)
}

/// Inside a transaction: adds version `version` (which must be the next number) as
/// ENABLED and makes it primary. `AlreadyExists` if another rotation took the number.
pub(super) async fn insert_next_version(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    version: u32,
    hsm_id: &ObjectId,
    mac: &str,
    now: i64,
) -> Result<()> {
    let max: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM key_versions WHERE key_id = $1")
            .bind(key.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
    match max {
        None => return Err(StoreError::NotFound),
        Some(m) if m + 1 != i64::from(version) => return Err(StoreError::AlreadyExists),
        Some(_) => {}
    }
    sqlx::query(
        "INSERT INTO key_versions (key_id, version, state, hsm_id, wrap_count, created_at, \
         updated_at, state_seq, mac) VALUES ($1, $2, 'ENABLED', $3, 0, $4, $4, 1, $5)",
    )
    .bind(key.to_string())
    .bind(i64::from(version))
    .bind(hsm_id.to_string())
    .bind(now)
    .bind(mac.to_string())
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    sqlx::query("UPDATE keys SET primary_version = $1 WHERE id = $2")
        .bind(i64::from(version))
        .bind(key.to_string())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
    Ok(())
}

/// Inside a transaction: moves a version to `to` if it is in one of `from`
/// (`Conflict::VersionState` naming the state found otherwise; with `already_ok`, a
/// version already in `to` is left as it is).
///
/// On SQLite the transaction holds the write lock, so the first pass decides. On
/// PostgreSQL a concurrent writer may change the row between the read and the
/// conditional update; the update then matches nothing, and the state is read again (a
/// new statement sees the other commit) so that the answer names the state that won, or
/// the change is made from it if it is still allowed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn change_version_state(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    version: u32,
    from: &[VersionState],
    to: VersionState,
    enabled: Option<&EnabledStamp>,
    now: i64,
    already_ok: bool,
) -> Result<()> {
    let destroyed_at = (to == VersionState::Destroyed).then_some(now);
    // Only an ENABLED row carries a MAC; one without it never becomes ENABLED.
    let mac = match (to, enabled) {
        (VersionState::Enabled, Some(s)) => Some(s.mac.clone()),
        (VersionState::Enabled, None) => return Err(StoreError::Corrupt("unstamped enable")),
        _ => None,
    };
    for _attempt in 0..3 {
        let row = sqlx::query(
            "SELECT state, state_seq FROM key_versions WHERE key_id = $1 AND version = $2",
        )
        .bind(key.to_string())
        .bind(i64::from(version))
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
        let current = VersionState::parse(&get::<String>(&row, "state")?)
            .ok_or(StoreError::Corrupt("version state"))?;
        let seq: i64 = get(&row, "state_seq")?;
        if already_ok && current == to {
            return Ok(());
        }
        if !from.contains(&current) {
            return Err(StoreError::Conflict(Conflict::VersionState(current)));
        }
        if enabled.is_some_and(|s| s.seq != seq + 1) {
            return Err(StoreError::Conflict(Conflict::ChangedConcurrently));
        }
        let done = sqlx::query(
            "UPDATE key_versions SET state = $1, updated_at = $2, \
             destroyed_at = COALESCE($3, destroyed_at), state_seq = $4, mac = $5 \
             WHERE key_id = $6 AND version = $7 AND state = $8 AND state_seq = $9",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(destroyed_at)
        .bind(seq + 1)
        .bind(mac.clone())
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(current.as_str())
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
    }
    Err(StoreError::Conflict(Conflict::ChangedConcurrently))
}

#[async_trait::async_trait]
impl KeyStore for SqlStore {
    async fn create_key(&self, key: &NewKey) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO keys (id, name, description, primary_version, created_at, \
             rotation_period_ms, retain_until, retention_mac) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7)",
        )
        .bind(key.id.to_string())
        .bind(key.name.to_string())
        .bind(key.description.clone())
        .bind(key.now)
        .bind(key.rotation_period_ms)
        .bind(key.retain_until)
        .bind(key.retention_mac.clone())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "INSERT INTO key_versions (key_id, version, state, hsm_id, wrap_count, created_at, \
             updated_at, state_seq, mac) VALUES ($1, 1, 'ENABLED', $2, 0, $3, $3, 1, $4)",
        )
        .bind(key.id.to_string())
        .bind(key.first_hsm_id.to_string())
        .bind(key.now)
        .bind(key.first_mac.clone())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let rec = load_key(&mut *tx, KeyLookup::Id(&key.id)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn key_by_name(&self, name: &KeyName) -> Result<KeyRecord> {
        load_key(&self.reader, KeyLookup::Name(name)).await
    }

    async fn key_by_id(&self, id: &KeyId) -> Result<KeyRecord> {
        load_key(&self.reader, KeyLookup::Id(id)).await
    }

    async fn list_keys(&self, after: Option<&str>, limit: u32) -> Result<Vec<KeyRecord>> {
        let rows = sqlx::query(KEY_SELECT_PAGE)
            .bind(after.unwrap_or("").to_string())
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        keys_from_rows(&rows)
    }

    async fn add_version(
        &self,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        mac: &str,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        insert_next_version(&mut tx, key, version, hsm_id, mac, now).await?;
        let rec = load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn set_version_state(
        &self,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        enabled: Option<&EnabledStamp>,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        change_version_state(&mut tx, key, version, from, to, enabled, now, false).await?;
        let rec = load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn stamp_version(
        &self,
        key: &KeyId,
        version: u32,
        state: VersionState,
        seq: i64,
        was: Option<&str>,
        mac: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE key_versions SET mac = $1 WHERE key_id = $2 AND version = $3 \
             AND state = $4 AND state_seq = $5 AND COALESCE(mac, '') = $6",
        )
        .bind(mac.to_string())
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(state.as_str())
        .bind(seq)
        .bind(was.unwrap_or("").to_string())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn stamp_retention(&self, key: &KeyId, retain_until: i64, mac: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE keys SET retention_mac = $1 WHERE id = $2 AND retain_until = $3 \
             AND retention_mac IS NULL",
        )
        .bind(mac.to_string())
        .bind(key.to_string())
        .bind(retain_until)
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn reserve_wraps(&self, key: &KeyId, version: u32, n: u64) -> Result<u64> {
        let n = i64::try_from(n).map_err(|_| StoreError::Corrupt("reservation size"))?;
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE key_versions SET wrap_count = wrap_count + $1 \
             WHERE key_id = $2 AND version = $3",
        )
        .bind(n)
        .bind(key.to_string())
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotFound);
        }
        let count: i64 = sqlx::query_scalar(
            "SELECT wrap_count FROM key_versions WHERE key_id = $1 AND version = $2",
        )
        .bind(key.to_string())
        .bind(i64::from(version))
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        u64::try_from(count).map_err(|_| StoreError::Corrupt("wrap count"))
    }

    async fn reserve_wraps_within(
        &self,
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
            .execute(&self.writer)
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
            .fetch_optional(&self.writer)
            .await
            .map_err(classify)?;
            let count = count.ok_or(StoreError::NotFound)?;
            want = want.min(limit.saturating_sub(count));
        }
        Ok(0)
    }
}
