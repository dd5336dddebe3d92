//! [`SqlStore`]: the [`Store`] on sqlx's `Any` driver, so one body of portable SQL
//! (`$n` placeholders, BIGINT/TEXT columns) serves SQLite and PostgreSQL. DDL differs per
//! back end and lives in `migrations/<backend>/`.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`, through one writer connection (write
//! transactions start with `BEGIN IMMEDIATE`, so several processes on one file queue on
//! the lock instead of failing on upgrade) and a small pool of readers.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use arca_hsm::ObjectId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{KeyRecord, NewKey, Result, Store, StoreError, TokenRecord, VersionRecord};
use crate::keys::{KeyId, KeyName, VersionState};
use crate::secret::TokenHash;

/// Which database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file (the default).
    Sqlite,
}

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("migrations/sqlite/0001_keys.sql"))];

/// SQL store over SQLite (and, with the same SQL, PostgreSQL).
pub struct SqlStore {
    writer: AnyPool,
    reader: AnyPool,
    begin: &'static str,
}

impl SqlStore {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let writer = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(sqlite_pragmas)
            .connect(&url)
            .await
            .map_err(classify)?;
        let reader = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(sqlite_pragmas)
            .connect(&url)
            .await
            .map_err(classify)?;
        let store = SqlStore {
            writer,
            reader,
            begin: "BEGIN IMMEDIATE",
        };
        store.migrate(SQLITE_MIGRATIONS).await?;
        Ok(store)
    }

    /// The back end in use.
    pub fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self, migrations: &[(i64, &'static str)]) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        for (version, sql) in migrations {
            let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(classify)?;
            if applied.is_none() {
                sqlx::raw_sql(*sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(*version)
                    .bind(crate::clock::Clock::now_ms(&crate::clock::SystemClock))
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                tracing::info!(version, "applied database migration");
            }
            tx.commit().await.map_err(classify)?;
        }
        Ok(())
    }

    async fn load_key<'e, E>(&self, exec: E, by: KeyLookup<'_>) -> Result<KeyRecord>
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
}

type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// Per-connection SQLite settings: WAL, full fsync, a busy timeout, foreign keys.
fn sqlite_pragmas(
    conn: &mut sqlx::AnyConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::raw_sql(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
        )
        .execute(conn)
        .await?;
        Ok(())
    })
}

enum KeyLookup<'a> {
    Name(&'a KeyName),
    Id(&'a KeyId),
}

/// The joined key/version select, with a WHERE clause appended.
macro_rules! key_select {
    ($tail:literal) => {
        concat!(
            "SELECT k.id, k.name, k.description, k.primary_version, k.created_at, ",
            "v.version, v.state, v.hsm_id, v.wrap_count, v.created_at AS v_created_at, ",
            "v.updated_at, v.destroy_at, v.destroyed_at ",
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
                versions: vec![version],
            }),
        }
    }
    Ok(out)
}

fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col)
        .map_err(|_| StoreError::Corrupt("column type"))
}

fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("version number"))
}

fn object_id_from_hex(s: &str) -> Result<ObjectId> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).map_err(|_| StoreError::Corrupt("hsm id"))?;
    Ok(ObjectId(id))
}

fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(get::<String>(row, "token_hash")?, &mut hash)
        .map_err(|_| StoreError::Corrupt("token hash"))?;
    let roles: String = get(row, "roles")?;
    Ok(TokenRecord {
        id: get(row, "id")?,
        hash: TokenHash(hash),
        principal: get(row, "principal")?,
        roles: roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect(),
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        revoked_at: get(row, "revoked_at")?,
    })
}

/// Classifies a sqlx error once, by type (never by message text).
fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists,
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
        _ => StoreError::Database(e),
    }
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn create_key(&self, key: &NewKey) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO keys (id, name, description, primary_version, created_at) \
             VALUES ($1, $2, $3, 1, $4)",
        )
        .bind(key.id.to_string())
        .bind(key.name.to_string())
        .bind(key.description.clone())
        .bind(key.now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "INSERT INTO key_versions (key_id, version, state, hsm_id, wrap_count, created_at, updated_at) \
             VALUES ($1, 1, 'ENABLED', $2, 0, $3, $3)",
        )
        .bind(key.id.to_string())
        .bind(key.first_hsm_id.to_string())
        .bind(key.now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let rec = self.load_key(&mut *tx, KeyLookup::Id(&key.id)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn key_by_name(&self, name: &KeyName) -> Result<KeyRecord> {
        self.load_key(&self.reader, KeyLookup::Name(name)).await
    }

    async fn key_by_id(&self, id: &KeyId) -> Result<KeyRecord> {
        self.load_key(&self.reader, KeyLookup::Id(id)).await
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
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
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
            "INSERT INTO key_versions (key_id, version, state, hsm_id, wrap_count, created_at, updated_at) \
             VALUES ($1, $2, 'ENABLED', $3, 0, $4, $4)",
        )
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(hsm_id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query("UPDATE keys SET primary_version = $1 WHERE id = $2")
            .bind(i64::from(version))
            .bind(key.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let rec = self.load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn set_version_state(
        &self,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT state FROM key_versions WHERE key_id = $1 AND version = $2")
                .bind(key.to_string())
                .bind(i64::from(version))
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
        let current = current.ok_or(StoreError::NotFound)?;
        let current = VersionState::parse(&current).ok_or(StoreError::Corrupt("version state"))?;
        if !from.contains(&current) {
            return Err(StoreError::StateConflict {
                current: current.as_str(),
            });
        }
        let destroyed_at = (to == VersionState::Destroyed).then_some(now);
        let done = sqlx::query(
            "UPDATE key_versions SET state = $1, updated_at = $2, \
             destroyed_at = COALESCE($3, destroyed_at) \
             WHERE key_id = $4 AND version = $5 AND state = $6",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(destroyed_at)
        .bind(key.to_string())
        .bind(i64::from(version))
        .bind(current.as_str())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::StateConflict {
                current: current.as_str(),
            });
        }
        let rec = self.load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn reserve_wraps(&self, key: &KeyId, version: u32, n: u64) -> Result<u64> {
        let n = i64::try_from(n).map_err(|_| StoreError::Corrupt("reservation size"))?;
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
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

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, token_hash, principal, roles, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(token.id.clone())
        .bind(token.hash.to_hex())
        .bind(token.principal.clone())
        .bind(token.roles.join(","))
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.revoked_at)
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &TokenHash) -> Result<TokenRecord> {
        let row = sqlx::query(
            "SELECT id, token_hash, principal, roles, created_at, expires_at, revoked_at \
             FROM tokens WHERE token_hash = $1",
        )
        .bind(hash.to_hex())
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
        token_from_row(&row)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    //! The store contract, on SQLite. (The PostgreSQL back end will run the same cases.)
    use super::*;

    async fn store() -> (tempfile::TempDir, SqlStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlStore::open_sqlite(&dir.path().join("t.db"))
            .await
            .unwrap();
        (dir, s)
    }

    fn new_key(name: &str, n: u8) -> NewKey {
        NewKey {
            id: KeyId::from_random([n; 16]),
            name: KeyName::parse(name).unwrap(),
            description: "d".into(),
            first_hsm_id: ObjectId([n; 16]),
            now: 1000,
        }
    }

    #[tokio::test]
    async fn create_get_list() {
        let (_d, s) = store().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        assert_eq!(k.primary_version, 1);
        assert_eq!(k.versions.len(), 1);
        assert_eq!(k.versions[0].state, VersionState::Enabled);
        assert_eq!(s.key_by_name(&k.name).await.unwrap().id, k.id);
        assert_eq!(s.key_by_id(&k.id).await.unwrap().name, k.name);
        s.create_key(&new_key("b", 2)).await.unwrap();
        s.create_key(&new_key("c", 3)).await.unwrap();
        let page = s.list_keys(None, 2).await.unwrap();
        assert_eq!(
            page.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let page = s.list_keys(Some("b"), 2).await.unwrap();
        assert_eq!(
            page.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(matches!(
            s.key_by_name(&KeyName::parse("zz").unwrap()).await,
            Err(StoreError::NotFound)
        ));
        // Reopening applies no migration twice and keeps the data.
        drop(s);
        let s = SqlStore::open_sqlite(&_d.path().join("t.db"))
            .await
            .unwrap();
        assert_eq!(s.list_keys(None, 10).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn names_and_objects_are_unique() {
        let (_d, s) = store().await;
        s.create_key(&new_key("a", 1)).await.unwrap();
        let mut dup = new_key("a", 2);
        assert!(matches!(
            s.create_key(&dup).await,
            Err(StoreError::AlreadyExists)
        ));
        dup.name = KeyName::parse("b").unwrap();
        dup.first_hsm_id = ObjectId([1; 16]);
        assert!(matches!(
            s.create_key(&dup).await,
            Err(StoreError::AlreadyExists)
        ));
        // Nothing of the failed create remains.
        assert!(s.key_by_name(&dup.name).await.is_err());
    }

    #[tokio::test]
    async fn versions_are_consecutive() {
        let (_d, s) = store().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        let k2 = s
            .add_version(&k.id, 2, &ObjectId([9; 16]), 2000)
            .await
            .unwrap();
        assert_eq!(k2.primary_version, 2);
        assert_eq!(k2.versions.len(), 2);
        // A lost race (same number) and a gap are refused.
        assert!(matches!(
            s.add_version(&k.id, 2, &ObjectId([8; 16]), 2000).await,
            Err(StoreError::AlreadyExists)
        ));
        assert!(matches!(
            s.add_version(&k.id, 4, &ObjectId([8; 16]), 2000).await,
            Err(StoreError::AlreadyExists)
        ));
        assert!(matches!(
            s.add_version(&KeyId([7; 16]), 2, &ObjectId([8; 16]), 2000)
                .await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test]
    async fn state_changes_are_conditional_and_checked_by_the_database() {
        let (_d, s) = store().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        use VersionState::*;
        let r = s
            .set_version_state(&k.id, 1, &[Enabled], Disabled, 5)
            .await
            .unwrap();
        assert_eq!(r.versions[0].state, Disabled);
        assert!(matches!(
            s.set_version_state(&k.id, 1, &[Enabled], Disabled, 6).await,
            Err(StoreError::StateConflict {
                current: "DISABLED"
            })
        ));
        // The trigger refuses an illegal edge even when Rust would allow it.
        assert!(s
            .set_version_state(&k.id, 1, &[Disabled], Destroyed, 7)
            .await
            .is_err());
        assert_eq!(
            s.key_by_id(&k.id).await.unwrap().versions[0].state,
            Disabled
        );
        // Direct SQL cannot delete keys or versions, nor resurrect a destroyed version.
        assert!(sqlx::query("DELETE FROM keys")
            .execute(&s.writer)
            .await
            .is_err());
        assert!(sqlx::query("DELETE FROM key_versions")
            .execute(&s.writer)
            .await
            .is_err());
        s.set_version_state(&k.id, 1, &[Disabled], ScheduledForDestruction, 8)
            .await
            .unwrap();
        let r = s
            .set_version_state(&k.id, 1, &[ScheduledForDestruction], Destroyed, 9)
            .await
            .unwrap();
        assert_eq!(r.versions[0].destroyed_at, Some(9));
        assert!(sqlx::query("UPDATE key_versions SET state = 'ENABLED'")
            .execute(&s.writer)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn wrap_reservations_add_up() {
        let (_d, s) = store().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        assert_eq!(s.reserve_wraps(&k.id, 1, 100).await.unwrap(), 100);
        assert_eq!(s.reserve_wraps(&k.id, 1, 28).await.unwrap(), 128);
        assert!(matches!(
            s.reserve_wraps(&k.id, 9, 1).await,
            Err(StoreError::NotFound)
        ));
    }

    #[tokio::test]
    async fn tokens_by_hash_only() {
        let (_d, s) = store().await;
        let t = crate::secret::BearerToken::from_random(&[5; 32]);
        let rec = TokenRecord {
            id: "tok_1".into(),
            hash: t.hash(),
            principal: "p".into(),
            roles: vec!["admin".into(), "x".into()],
            created_at: 1,
            expires_at: Some(2),
            revoked_at: None,
        };
        s.insert_token(&rec).await.unwrap();
        let got = s.token_by_hash(&t.hash()).await.unwrap();
        assert_eq!(got.roles, ["admin", "x"]);
        assert_eq!(got.expires_at, Some(2));
        assert!(matches!(
            s.insert_token(&rec).await,
            Err(StoreError::AlreadyExists)
        ));
        let other = crate::secret::BearerToken::from_random(&[6; 32]);
        assert!(matches!(
            s.token_by_hash(&other.hash()).await,
            Err(StoreError::NotFound)
        ));
        let stored: String = sqlx::query_scalar("SELECT token_hash FROM tokens")
            .fetch_one(&s.reader)
            .await
            .unwrap();
        assert!(!stored.contains(t.expose()));
    }
}
