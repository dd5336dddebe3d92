//! [`SqlStore`]: the [`Store`] on sqlx's `Any` driver, so one body of portable SQL
//! (`$n` placeholders, BIGINT/TEXT columns) serves SQLite and PostgreSQL. DDL differs per
//! back end and lives in `migrations/<backend>/`.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`, through one writer connection (write
//! transactions start with `BEGIN IMMEDIATE`, so several processes on one file queue on
//! the lock instead of failing on upgrade) and a small pool of readers.
//!
//! PostgreSQL runs through one pool (writer and reader are the same) at READ COMMITTED,
//! with plain `BEGIN`. Every write is safe with several nodes on one database without
//! row locks in Rust: a rotation race is decided by the primary key on (key, version) (the
//! loser gets `AlreadyExists`), a state change is a conditional `UPDATE … WHERE state =
//! $current` (PostgreSQL re-checks the condition on the newest row version after waiting
//! for a concurrent writer, so the loser gets `StateConflict`), a wrap reservation is one
//! atomic `UPDATE … SET wrap_count = wrap_count + $n`, and migrations take a transaction-
//! scoped advisory lock first, so nodes starting together apply each migration once.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use arca_hsm::ObjectId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::{
    DueDestruction, KeyRecord, LifecycleChange, NewKey, Result, Store, StoreError, TokenRecord,
    Tombstone, VersionRecord,
};
use crate::keys::{KeyId, KeyName, VersionState};
use crate::secret::TokenHash;

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file (the default; one node).
    Sqlite,
    /// PostgreSQL server (one or several nodes).
    Postgres,
}

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite/0001_keys.sql")),
    (2, include_str!("migrations/sqlite/0002_quorum.sql")),
    (3, include_str!("migrations/sqlite/0003_approvals.sql")),
    (4, include_str!("migrations/sqlite/0004_token_scopes.sql")),
    (5, include_str!("migrations/sqlite/0005_lifecycle.sql")),
    (6, include_str!("migrations/sqlite/0006_audit.sql")),
    (7, include_str!("migrations/sqlite/0007_rbac.sql")),
];
const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres/0001_keys.sql")),
    (2, include_str!("migrations/postgres/0002_quorum.sql")),
    (3, include_str!("migrations/postgres/0003_approvals.sql")),
    (4, include_str!("migrations/postgres/0004_token_scopes.sql")),
    (5, include_str!("migrations/postgres/0005_lifecycle.sql")),
    (6, include_str!("migrations/postgres/0006_audit.sql")),
    (7, include_str!("migrations/postgres/0007_rbac.sql")),
];

/// Key of the PostgreSQL advisory lock that serialises migrations across nodes ("arca"
/// in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6172_6361_0000_0001;

/// Connections to PostgreSQL per node. Requests are served from the key cache; the pool
/// serves refills, admin operations and cache misses.
const POSTGRES_POOL_SIZE: u32 = 8;

/// How long a query waits for a free connection (or a new one) before `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The same on PostgreSQL: shorter, because while the server is down every new
/// connection is refused and sqlx keeps retrying until this ends; requests should fail
/// `UNAVAILABLE` quickly rather than hang for the length of an outage. (Requests are
/// served from the key cache; the pool is rarely contended.)
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// SQL store over SQLite or PostgreSQL, with the same SQL.
pub struct SqlStore {
    pub(super) writer: AnyPool,
    pub(super) reader: AnyPool,
    backend: Backend,
    pub(super) begin: &'static str,
    /// SQLite only: the audit writer's own connection (see `store::audit`).
    pub(super) audit_conn: Option<AuditConnection>,
}

/// A SQLite connection that only the audit writer uses, opened on first use and again
/// after an error: SQLite's own (rusqlite), not a sqlx one, so an append runs on the
/// calling thread with prepared statements, with no hop to a connection worker thread
/// and no SQL text to parse. Its appends do not queue behind the writer pool (whose one
/// connection serves every other write); SQLite's write lock and `busy_timeout` (1 s
/// here) order them with the pool's transactions and other processes'. Both drivers link
/// the one SQLite library in the process, so they see each other's locks.
pub(super) struct AuditConnection {
    path: std::path::PathBuf,
    conn: std::sync::Mutex<Option<rusqlite::Connection>>,
}

impl AuditConnection {
    /// The connection's slot: an append holds it for its whole transaction, connects
    /// when it is empty ([`AuditConnection::connect`]) and empties it after an error.
    pub(super) fn slot(&self) -> &std::sync::Mutex<Option<rusqlite::Connection>> {
        &self.conn
    }

    /// Opens a connection to the (migrated) database with the pools' settings, and a
    /// shorter wait for the write lock.
    pub(super) fn connect(&self) -> std::result::Result<rusqlite::Connection, rusqlite::Error> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.execute_batch(SQLITE_PRAGMAS)?;
        conn.busy_timeout(AUDIT_BUSY_TIMEOUT)?;
        Ok(conn)
    }
}

/// The [`StoreError`] of an error on the audit connection (as [`classify`] does for sqlx).
pub(super) fn classify_sqlite(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode;
    let code = e.sqlite_error().map(|f| (f.code, f.extended_code));
    match code {
        // SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE.
        Some((ErrorCode::ConstraintViolation, 1555 | 2067)) => StoreError::AlreadyExists,
        Some((
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed,
            _,
        )) => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Database(Box::new(e)),
    }
}

impl SqlStore {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        // No ping before each acquire: the database is a file in this process, not a
        // peer that can go away, and the ping is a round trip to the connection's worker
        // thread on every query (it was a third of each audit commit).
        let writer = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(sqlite_pragmas)
            .connect(&url)
            .await
            .map_err(classify)?;
        let reader = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .after_connect(sqlite_pragmas)
            .connect(&url)
            .await
            .map_err(classify)?;
        let store = SqlStore {
            writer,
            reader,
            backend: Backend::Sqlite,
            begin: "BEGIN IMMEDIATE",
            audit_conn: Some(AuditConnection {
                path: path.to_path_buf(),
                conn: Default::default(),
            }),
        };
        store.migrate(SQLITE_MIGRATIONS).await?;
        Ok(store)
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://…`; the database must
    /// exist) and applies migrations. Several nodes may open the same database at once.
    ///
    /// The URL may carry a password: it is handed to the driver only, and no error of
    /// this function quotes it.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        // One plain connection first: its error says why (refused, authentication, no
        // such database), where the pool would retry and only report a timeout.
        sqlx::AnyConnection::connect(url)
            .await
            .map_err(classify)?
            .close()
            .await
            .map_err(classify)?;
        let pool = AnyPoolOptions::new()
            .max_connections(POSTGRES_POOL_SIZE)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .after_connect(postgres_settings)
            .connect(url)
            .await
            .map_err(classify)?;
        let store = SqlStore {
            writer: pool.clone(),
            reader: pool,
            backend: Backend::Postgres,
            begin: "BEGIN",
            audit_conn: None,
        };
        store.migrate(POSTGRES_MIGRATIONS).await?;
        Ok(store)
    }

    /// The back end in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations not applied yet, each in one transaction with its row in
    /// `schema_migrations`. On PostgreSQL the transaction first takes an advisory lock,
    /// so nodes migrating at once queue (even `CREATE TABLE IF NOT EXISTS` is not safe
    /// against a concurrent twin there); on SQLite `BEGIN IMMEDIATE` does the same.
    async fn migrate(&self, migrations: &[(i64, &'static str)]) -> Result<()> {
        for (version, sql) in migrations {
            let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
            if self.backend == Backend::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
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
                tracing::info!(version, backend = ?self.backend, "applied database migration");
            }
            tx.commit().await.map_err(classify)?;
        }
        Ok(())
    }

    pub(super) async fn load_key<'e, E>(&self, exec: E, by: KeyLookup<'_>) -> Result<KeyRecord>
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

/// Settings of every SQLite connection (the pools' and the audit writer's): WAL, a
/// durable commit (fsync of the WAL), a wait for the write lock, foreign keys.
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;";

/// The audit connection's wait for the write lock: well under the audit commit timeout
/// (default 2 s), so a batch either starts within it or fails.
const AUDIT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Applies [`SQLITE_PRAGMAS`] to each new pool connection.
fn sqlite_pragmas(
    conn: &mut sqlx::AnyConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::raw_sql(SQLITE_PRAGMAS).execute(conn).await?;
        Ok(())
    })
}

/// Per-connection PostgreSQL settings: notices (such as "relation already exists,
/// skipping" from the migration runner) stay out of the log; warnings still reach it.
fn postgres_settings(
    conn: &mut sqlx::AnyConnection,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::raw_sql("SET client_min_messages = warning")
            .execute(conn)
            .await?;
        Ok(())
    })
}

pub(crate) enum KeyLookup<'a> {
    Name(&'a KeyName),
    Id(&'a KeyId),
}

/// The joined key/version select, with a WHERE clause appended.
macro_rules! key_select {
    ($tail:literal) => {
        concat!(
            "SELECT k.id, k.name, k.description, k.primary_version, k.created_at, ",
            "k.rotation_period_ms, k.retain_until, k.retention_applied_at, ",
            "v.version, v.state, v.hsm_id, v.wrap_count, v.created_at AS v_created_at, ",
            "v.updated_at, v.destroy_at, v.destroyed_at, v.retire_request, v.destroying_at ",
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
                versions: vec![version],
            }),
        }
    }
    Ok(out)
}

pub(super) fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col)
        .map_err(|_| StoreError::Corrupt("column type"))
}

pub(super) fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("version number"))
}

pub(super) fn object_id_from_hex(s: &str) -> Result<ObjectId> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).map_err(|_| StoreError::Corrupt("hsm id"))?;
    Ok(ObjectId(id))
}

/// Inside a transaction: adds version `version` (which must be the next number) as
/// ENABLED and makes it primary. `AlreadyExists` if another rotation took the number.
pub(super) async fn insert_next_version(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    version: u32,
    hsm_id: &ObjectId,
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
    Ok(())
}

/// Inside a transaction: moves a version to `to` if it is in one of `from`
/// (`StateConflict` naming the state found otherwise; with `already_ok`, a version
/// already in `to` is left as it is).
///
/// On SQLite the transaction holds the write lock, so the first pass decides. On
/// PostgreSQL a concurrent writer may change the row between the read and the
/// conditional update; the update then matches nothing, and the state is read again (a
/// new statement sees the other commit) so that the answer names the state that won, or
/// the change is made from it if it is still allowed.
pub(super) async fn change_version_state(
    tx: &mut sqlx::AnyConnection,
    key: &KeyId,
    version: u32,
    from: &[VersionState],
    to: VersionState,
    now: i64,
    already_ok: bool,
) -> Result<()> {
    let destroyed_at = (to == VersionState::Destroyed).then_some(now);
    for _attempt in 0..3 {
        let current: Option<String> =
            sqlx::query_scalar("SELECT state FROM key_versions WHERE key_id = $1 AND version = $2")
                .bind(key.to_string())
                .bind(i64::from(version))
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
        let current = VersionState::parse(&current.ok_or(StoreError::NotFound)?)
            .ok_or(StoreError::Corrupt("version state"))?;
        if already_ok && current == to {
            return Ok(());
        }
        if !from.contains(&current) {
            return Err(StoreError::StateConflict {
                current: current.as_str(),
            });
        }
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
        if done.rows_affected() == 1 {
            return Ok(());
        }
    }
    Err(StoreError::StateConflict {
        current: "changed concurrently",
    })
}

/// Classifies a sqlx error once, by type and SQLSTATE (never by message text).
///
/// `Unavailable` (retryable) is every way of losing the database: I/O and TLS errors,
/// pool timeouts and a closed pool, protocol errors, on PostgreSQL the SQLSTATEs of a
/// lost or refused connection (class 08), a server shutting down or restarting (57P01
/// admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now) and 53300 (too many
/// connections), and on SQLite a lock still held by another process when the busy
/// timeout ends (`SQLITE_BUSY` and `SQLITE_LOCKED` with their extended codes).
pub(super) fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists,
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_unavailable_code(&c)) => {
            StoreError::Unavailable(Box::new(e))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Database(Box::new(e)),
    }
}

/// Error codes that mean the database is gone or busy for now. A PostgreSQL SQLSTATE is
/// always five characters; SQLite's extended result codes are decimal numbers below
/// 10000, with the primary code in the low byte (`SQLITE_BUSY` = 5, `SQLITE_LOCKED` = 6).
fn is_unavailable_code(code: &str) -> bool {
    if code.len() == 5 {
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
    }
    code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

#[async_trait::async_trait]
impl Store for SqlStore {
    async fn create_key(&self, key: &NewKey) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO keys (id, name, description, primary_version, created_at, \
             rotation_period_ms, retain_until) VALUES ($1, $2, $3, 1, $4, $5, $6)",
        )
        .bind(key.id.to_string())
        .bind(key.name.to_string())
        .bind(key.description.clone())
        .bind(key.now)
        .bind(key.rotation_period_ms)
        .bind(key.retain_until)
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
        insert_next_version(&mut tx, key, version, hsm_id, now).await?;
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
        change_version_state(&mut tx, key, version, from, to, now, false).await?;
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

    async fn reserve_wraps_within(
        &self,
        key: &KeyId,
        version: u32,
        n: u64,
        limit: u64,
    ) -> Result<u64> {
        super::lifecycle::reserve_wraps_within(self, key, version, n, limit).await
    }

    async fn apply_lifecycle(
        &self,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        super::lifecycle::apply_in(&mut tx, key, change, now).await?;
        let rec = self.load_key(&mut *tx, KeyLookup::Id(key)).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn keys_due_rotation(&self, now: i64) -> Result<Vec<KeyId>> {
        super::lifecycle::keys_due_rotation(self, now).await
    }

    async fn keys_due_retention(&self, now: i64) -> Result<Vec<KeyId>> {
        super::lifecycle::keys_due_retention(self, now).await
    }

    async fn due_destructions(&self, now: i64, limit: u32) -> Result<Vec<DueDestruction>> {
        super::lifecycle::due_destructions(self, now, limit).await
    }

    async fn begin_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<()> {
        super::lifecycle::begin_destruction(self, key, version, now).await
    }

    async fn finish_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<KeyRecord> {
        super::lifecycle::finish_destruction(self, key, version, now).await
    }

    async fn destroyed_since(&self, since: i64) -> Result<Vec<(ObjectId, i64)>> {
        super::lifecycle::destroyed_since(self, since).await
    }

    async fn tombstones(&self, key: &KeyId) -> Result<Vec<Tombstone>> {
        super::lifecycle::tombstones(self, key).await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: i64) -> Result<bool> {
        super::lifecycle::acquire_lease(self, name, holder, ttl_ms, now).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        super::lifecycle::release_lease(self, name, holder).await
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        super::tokens::insert_token_in(&self.writer, token).await
    }

    async fn token_by_hash(&self, hash: &TokenHash) -> Result<TokenRecord> {
        let sql = format!(
            "SELECT {} FROM tokens WHERE token_hash = $1",
            super::tokens::TOKEN_COLUMNS
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash.to_hex())
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?
            .ok_or(StoreError::NotFound)?;
        super::tokens::token_from_row(&row)
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
    //! The store contract, run on both back ends: every case runs on SQLite (a file in a
    //! temporary directory) and on PostgreSQL (a fresh database per case on the server at
    //! `ARCA_TEST_POSTGRES_URL`, dropped afterwards). Without that variable the PostgreSQL
    //! cases print a SKIP line and pass, unless `ARCA_REQUIRE_POSTGRES=1`: then they fail.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::borrow::Cow;
    use std::io::Write;
    use std::sync::Arc;

    use sqlx::Connection;

    use super::*;

    /// Where a case's database lives. A case may open several stores on it (a restart,
    /// or two nodes).
    enum TestDb {
        Sqlite(tempfile::TempDir),
        Postgres {
            admin_url: String,
            url: String,
            name: String,
        },
    }

    impl TestDb {
        fn sqlite() -> TestDb {
            TestDb::Sqlite(tempfile::tempdir().unwrap())
        }

        /// A fresh database on the test server, or `None` (after a SKIP line for `test`)
        /// without one.
        async fn postgres(test: &str) -> Option<TestDb> {
            let admin_url = postgres_url(test)?;
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).unwrap();
            let name = format!("arca_t_{}", hex::encode(raw));
            sqlx::any::install_default_drivers();
            let mut admin = sqlx::AnyConnection::connect(&admin_url)
                .await
                .expect("connect to ARCA_TEST_POSTGRES_URL");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
            let url = with_database(&admin_url, &name);
            Some(TestDb::Postgres {
                admin_url,
                url,
                name,
            })
        }

        fn backend(&self) -> Backend {
            match self {
                TestDb::Sqlite(_) => Backend::Sqlite,
                TestDb::Postgres { .. } => Backend::Postgres,
            }
        }

        /// Opens a store on the database (migrating it if needed).
        async fn open(&self) -> SqlStore {
            self.try_open().await.unwrap()
        }

        async fn try_open(&self) -> Result<SqlStore> {
            match self {
                TestDb::Sqlite(dir) => SqlStore::open_sqlite(&dir.path().join("t.db")).await,
                TestDb::Postgres { url, .. } => SqlStore::open_postgres(url).await,
            }
        }

        /// A connection to the server besides the store's pools (PostgreSQL only).
        async fn admin(&self) -> sqlx::AnyConnection {
            match self {
                TestDb::Postgres { admin_url, .. } => {
                    sqlx::AnyConnection::connect(admin_url).await.unwrap()
                }
                TestDb::Sqlite(_) => panic!("no admin connection on SQLite"),
            }
        }

        async fn remove(self) {
            if let TestDb::Postgres { name, .. } = &self {
                let mut admin = self.admin().await;
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await;
                let _ = admin.close().await;
            }
        }
    }

    /// `ARCA_TEST_POSTGRES_URL`, or `None` after a SKIP line; panics without it when
    /// `ARCA_REQUIRE_POSTGRES=1`.
    fn postgres_url(test: &str) -> Option<String> {
        match std::env::var("ARCA_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("ARCA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                    "ARCA_REQUIRE_POSTGRES=1 but ARCA_TEST_POSTGRES_URL is not set"
                );
                // Straight to stderr: libtest captures only the print macros, and a skip
                // must show in a passing run.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP {test}: ARCA_TEST_POSTGRES_URL is not set"
                );
                None
            }
        }
    }

    /// `base` with its database (the URL path) replaced by `name`.
    fn with_database(base: &str, name: &str) -> String {
        let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, format!("?{q}")),
            None => (rest, String::new()),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        format!("{scheme}://{authority}/{name}{query}")
    }

    /// Runs a case on `db` in a task (so a failing case still removes its database).
    async fn run<F, Fut>(db: TestDb, case: F)
    where
        F: FnOnce(Arc<TestDb>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let db = Arc::new(db);
        let outcome = tokio::spawn(case(Arc::clone(&db))).await;
        if let Ok(db) = Arc::try_unwrap(db) {
            db.remove().await;
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Each case as `case::sqlite` and `case::postgres`.
    macro_rules! on_both_backends {
        ($($case:ident),* $(,)?) => {$(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::run(super::TestDb::sqlite(), super::$case).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let test = concat!(module_path!(), "::postgres");
                    if let Some(db) = super::TestDb::postgres(test).await {
                        super::run(db, super::$case).await;
                    }
                }
            }
        )*};
    }

    /// Cases for PostgreSQL only, as `case::postgres`.
    macro_rules! on_postgres {
        ($($case:ident),* $(,)?) => {$(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let test = concat!(module_path!(), "::postgres");
                    if let Some(db) = super::TestDb::postgres(test).await {
                        super::run(db, super::$case).await;
                    }
                }
            }
        )*};
    }

    on_both_backends!(
        create_get_list,
        names_and_objects_are_unique,
        versions_are_consecutive,
        state_changes_are_conditional_and_checked_by_the_database,
        wrap_reservations_add_up,
        tokens_by_hash_only,
        keys_list_in_byte_order_of_names,
        two_nodes_race_for_a_version_number_and_exactly_one_wins,
        two_nodes_race_for_a_state_change_and_exactly_one_wins,
        two_nodes_reserve_wraps_without_losing_any,
        two_nodes_migrate_at_once,
        retirement_cancel_and_destruction_are_conditional_and_leave_a_tombstone,
        retention_is_applied_once,
        usage_limited_reservations_never_pass_the_limit,
        leases_have_one_holder_until_they_expire,
        due_rotations_follow_the_period_of_the_primary,
    );

    on_postgres!(
        a_lost_connection_is_unavailable_and_the_pool_recovers,
        truncate_is_refused_too,
    );

    fn new_key(name: &str, n: u8) -> NewKey {
        NewKey {
            id: KeyId::from_random([n; 16]),
            name: KeyName::parse(name).unwrap(),
            description: "d".into(),
            first_hsm_id: ObjectId([n; 16]),
            rotation_period_ms: None,
            retain_until: None,
            now: 1000,
        }
    }

    fn migration_versions(backend: Backend) -> Vec<i64> {
        let all = match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        all.iter().map(|(v, _)| *v).collect()
    }

    fn names(page: &[KeyRecord]) -> Vec<&str> {
        page.iter().map(|k| k.name.as_str()).collect()
    }

    async fn create_get_list(db: Arc<TestDb>) {
        let s = db.open().await;
        assert_eq!(s.backend(), db.backend());
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        assert_eq!(k.primary_version, 1);
        assert_eq!(k.versions.len(), 1);
        assert_eq!(k.versions[0].state, VersionState::Enabled);
        assert_eq!(k.versions[0].hsm_id, ObjectId([1; 16]));
        assert_eq!(k.created_at, 1000);
        assert_eq!(k.description, "d");
        assert_eq!(s.key_by_name(&k.name).await.unwrap().id, k.id);
        assert_eq!(s.key_by_id(&k.id).await.unwrap().name, k.name);
        s.create_key(&new_key("b", 2)).await.unwrap();
        s.create_key(&new_key("c", 3)).await.unwrap();
        assert_eq!(names(&s.list_keys(None, 2).await.unwrap()), ["a", "b"]);
        assert_eq!(names(&s.list_keys(Some("b"), 2).await.unwrap()), ["c"]);
        assert!(s.list_keys(Some("c"), 2).await.unwrap().is_empty());
        assert!(matches!(
            s.key_by_name(&KeyName::parse("zz").unwrap()).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            s.key_by_id(&KeyId([9; 16])).await,
            Err(StoreError::NotFound)
        ));
        s.ping().await.unwrap();
        // Reopening applies no migration twice and keeps the data.
        drop(s);
        let s = db.open().await;
        assert_eq!(s.list_keys(None, 10).await.unwrap().len(), 3);
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&s.reader)
                .await
                .unwrap();
        assert_eq!(applied, migration_versions(db.backend()));
    }

    async fn names_and_objects_are_unique(db: Arc<TestDb>) {
        let s = db.open().await;
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
        // The same id under another name is refused too.
        let mut same_id = new_key("c", 3);
        same_id.id = KeyId::from_random([1; 16]);
        assert!(matches!(
            s.create_key(&same_id).await,
            Err(StoreError::AlreadyExists)
        ));
    }

    async fn versions_are_consecutive(db: Arc<TestDb>) {
        let s = db.open().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        let k2 = s
            .add_version(&k.id, 2, &ObjectId([9; 16]), 2000)
            .await
            .unwrap();
        assert_eq!(k2.primary_version, 2);
        assert_eq!(k2.versions.len(), 2);
        assert_eq!(k2.versions[1].hsm_id, ObjectId([9; 16]));
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
        // An HSM object id is never used twice, across keys too.
        assert!(matches!(
            s.add_version(&k.id, 3, &ObjectId([1; 16]), 2000).await,
            Err(StoreError::AlreadyExists)
        ));
        assert_eq!(s.key_by_id(&k.id).await.unwrap().primary_version, 2);
    }

    async fn state_changes_are_conditional_and_checked_by_the_database(db: Arc<TestDb>) {
        let s = db.open().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        use VersionState::*;
        let r = s
            .set_version_state(&k.id, 1, &[Enabled], Disabled, 5)
            .await
            .unwrap();
        assert_eq!(r.versions[0].state, Disabled);
        assert_eq!(r.versions[0].updated_at, 5);
        assert!(matches!(
            s.set_version_state(&k.id, 1, &[Enabled], Disabled, 6).await,
            Err(StoreError::StateConflict {
                current: "DISABLED"
            })
        ));
        assert!(matches!(
            s.set_version_state(&k.id, 2, &[Enabled], Disabled, 6).await,
            Err(StoreError::NotFound)
        ));
        // The trigger refuses an illegal edge even when Rust would allow it.
        assert!(matches!(
            s.set_version_state(&k.id, 1, &[Disabled], Destroyed, 7)
                .await,
            Err(StoreError::Database(_))
        ));
        assert_eq!(
            s.key_by_id(&k.id).await.unwrap().versions[0].state,
            Disabled
        );
        // Direct SQL cannot delete keys or versions, nor change their identity.
        for sql in [
            "DELETE FROM keys",
            "DELETE FROM key_versions",
            "UPDATE keys SET name = 'renamed'",
            "UPDATE keys SET id = 'other'",
            "UPDATE key_versions SET version = 7",
            "UPDATE key_versions SET hsm_id = 'ff'",
            "UPDATE key_versions SET key_id = 'other'",
            "UPDATE key_versions SET state = 'DESTROYED'",
            "UPDATE key_versions SET state = 'BROKEN'",
            "UPDATE key_versions SET wrap_count = -1",
            "UPDATE keys SET primary_version = 0",
        ] {
            assert!(
                sqlx::query(sql).execute(&s.writer).await.is_err(),
                "{sql} was allowed"
            );
        }
        // Updating other columns of the key stays possible.
        sqlx::query("UPDATE keys SET description = 'changed'")
            .execute(&s.writer)
            .await
            .unwrap();
        s.set_version_state(&k.id, 1, &[Disabled], ScheduledForDestruction, 8)
            .await
            .unwrap();
        // Cancelling a scheduled destruction goes back to DISABLED, never straight to ENABLED.
        assert!(sqlx::query("UPDATE key_versions SET state = 'ENABLED'")
            .execute(&s.writer)
            .await
            .is_err());
        let r = s
            .set_version_state(&k.id, 1, &[ScheduledForDestruction], Destroyed, 9)
            .await
            .unwrap();
        assert_eq!(r.versions[0].destroyed_at, Some(9));
        // DESTROYED is final.
        for to in ["ENABLED", "DISABLED", "SCHEDULED_FOR_DESTRUCTION"] {
            assert!(
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE key_versions SET state = '{to}'"
                )))
                .execute(&s.writer)
                .await
                .is_err(),
                "DESTROYED -> {to} was allowed"
            );
        }
        // The legal edges, on a second key: ENABLED <-> DISABLED, either to
        // SCHEDULED_FOR_DESTRUCTION, and back to DISABLED.
        let k2 = s.create_key(&new_key("b", 2)).await.unwrap();
        for (from, to) in [
            (Enabled, Disabled),
            (Disabled, Enabled),
            (Enabled, ScheduledForDestruction),
            (ScheduledForDestruction, Disabled),
            (Disabled, ScheduledForDestruction),
        ] {
            let r = s
                .set_version_state(&k2.id, 1, &[from], to, 10)
                .await
                .unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e}"));
            assert_eq!(r.versions[0].state, to);
        }
    }

    async fn retirement_cancel_and_destruction_are_conditional_and_leave_a_tombstone(
        db: Arc<TestDb>,
    ) {
        use crate::store::LifecycleChange::*;
        let s = db.open().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        s.add_version(&k.id, 2, &ObjectId([0x42; 16]), 1500)
            .await
            .unwrap();
        let schedule = |v: u32, at: i64| Schedule {
            versions: vec![v],
            destroy_at: at,
            request: Some("req_1".into()),
        };
        let r = s
            .apply_lifecycle(&k.id, &schedule(1, 5000), 2000)
            .await
            .unwrap();
        let v1 = r.version(1).unwrap();
        assert_eq!(v1.state, VersionState::ScheduledForDestruction);
        assert_eq!(v1.destroy_at, Some(5000));
        assert_eq!(v1.retire_request.as_deref(), Some("req_1"));
        // Twice: refused, nothing changes.
        assert!(matches!(
            s.apply_lifecycle(&k.id, &schedule(1, 9000), 2100).await,
            Err(StoreError::StateConflict {
                current: "SCHEDULED_FOR_DESTRUCTION"
            })
        ));
        // A schedule of several versions is all or nothing.
        assert!(s
            .apply_lifecycle(
                &k.id,
                &Schedule {
                    versions: vec![2, 1],
                    destroy_at: 1,
                    request: None
                },
                2100
            )
            .await
            .is_err());
        assert_eq!(
            s.key_by_id(&k.id).await.unwrap().version(2).unwrap().state,
            VersionState::Enabled
        );
        // Not due yet: the destroyer cannot start.
        assert!(s.begin_destruction(&k.id, 1, 4999).await.is_err());
        assert!(s.due_destructions(4999, 10).await.unwrap().is_empty());
        // Cancel → DISABLED, schedule cleared; schedule again.
        let r = s
            .apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 3000)
            .await
            .unwrap();
        let v1 = r.version(1).unwrap();
        assert_eq!(
            (v1.state, v1.destroy_at, v1.retire_request.clone()),
            (VersionState::Disabled, None, None)
        );
        s.apply_lifecycle(&k.id, &schedule(1, 5000), 3100)
            .await
            .unwrap();
        let due = s.due_destructions(5000, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].version, due[0].hsm_id), (1, ObjectId([1; 16])));
        s.begin_destruction(&k.id, 1, 5000).await.unwrap();
        // Started: no cancel, neither through the store nor by hand.
        assert!(matches!(
            s.apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 5001)
                .await,
            Err(StoreError::StateConflict {
                current: "DESTROYING"
            })
        ));
        assert!(
            sqlx::query("UPDATE key_versions SET state = 'DISABLED' WHERE version = 1")
                .execute(&s.writer)
                .await
                .is_err()
        );
        // Still listed as due (a restart finishes it), and finishing is idempotent.
        assert_eq!(s.due_destructions(0, 10).await.unwrap().len(), 1);
        let r = s.finish_destruction(&k.id, 1, 6000).await.unwrap();
        assert_eq!(r.version(1).unwrap().state, VersionState::Destroyed);
        assert_eq!(r.version(1).unwrap().destroyed_at, Some(6000));
        let again = s.finish_destruction(&k.id, 1, 7000).await.unwrap();
        assert_eq!(again.version(1).unwrap().destroyed_at, Some(6000));
        assert!(s.due_destructions(i64::MAX, 10).await.unwrap().is_empty());
        let t = s.tombstones(&k.id).await.unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].version,
                t[0].hsm_id,
                t[0].destroyed_at,
                t[0].retire_request.as_deref()
            ),
            (1, ObjectId([1; 16]), 6000, Some("req_1"))
        );
        assert_eq!(
            s.destroyed_since(6000).await.unwrap(),
            vec![(ObjectId([1; 16]), 6000)]
        );
        assert!(s.destroyed_since(6001).await.unwrap().is_empty());
        // Tombstones are permanent; DESTROYED is final; cancel after destruction refused.
        for sql in [
            "DELETE FROM key_tombstones",
            "UPDATE key_tombstones SET destroyed_at = 1",
            "UPDATE key_versions SET state = 'ENABLED' WHERE version = 1",
        ] {
            assert!(
                sqlx::query(sql).execute(&s.writer).await.is_err(),
                "{sql} was allowed"
            );
        }
        assert!(matches!(
            s.apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 8000)
                .await,
            Err(StoreError::StateConflict {
                current: "DESTROYED"
            })
        ));
        assert!(matches!(
            s.apply_lifecycle(&k.id, &schedule(1, 9000), 8000).await,
            Err(StoreError::StateConflict {
                current: "DESTROYED"
            })
        ));
    }

    async fn retention_is_applied_once(db: Arc<TestDb>) {
        use crate::store::LifecycleChange::*;
        let s = db.open().await;
        let mut nk = new_key("kept", 1);
        nk.retain_until = Some(5000);
        let k = s.create_key(&nk).await.unwrap();
        assert_eq!(k.retain_until, Some(5000));
        assert!(s.keys_due_retention(4999).await.unwrap().is_empty());
        assert_eq!(s.keys_due_retention(5000).await.unwrap(), vec![k.id]);
        // Not before the date.
        assert!(s
            .apply_lifecycle(&k.id, &ApplyRetention { destroy_at: 9000 }, 4000)
            .await
            .is_err());
        let r = s
            .apply_lifecycle(&k.id, &ApplyRetention { destroy_at: 9000 }, 5000)
            .await
            .unwrap();
        assert_eq!(r.retention_applied_at, Some(5000));
        assert_eq!(
            r.version(1).unwrap().state,
            VersionState::ScheduledForDestruction
        );
        assert_eq!(r.version(1).unwrap().destroy_at, Some(9000));
        assert!(s.keys_due_retention(6000).await.unwrap().is_empty());
        assert!(matches!(
            s.apply_lifecycle(&k.id, &ApplyRetention { destroy_at: 9000 }, 6000)
                .await,
            Err(StoreError::StateConflict { .. })
        ));
        // A new date re-arms it; clearing it disarms it.
        s.apply_lifecycle(
            &k.id,
            &Retention {
                retain_until: Some(7000),
            },
            6000,
        )
        .await
        .unwrap();
        assert_eq!(s.keys_due_retention(7000).await.unwrap(), vec![k.id]);
        s.apply_lifecycle(&k.id, &Retention { retain_until: None }, 6000)
            .await
            .unwrap();
        assert!(s.keys_due_retention(i64::MAX).await.unwrap().is_empty());
    }

    async fn usage_limited_reservations_never_pass_the_limit(db: Arc<TestDb>) {
        let s = db.open().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 64);
        assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 36);
        assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 0);
        assert_eq!(
            s.key_by_id(&k.id)
                .await
                .unwrap()
                .version(1)
                .unwrap()
                .wrap_count,
            100
        );
        // Two nodes at once: together never more than the limit.
        let k2 = s.create_key(&new_key("b", 2)).await.unwrap();
        let b = db.open().await;
        let (mut ga, mut gb) = (0, 0);
        for _ in 0..20 {
            let (x, y) = tokio::join!(
                s.reserve_wraps_within(&k2.id, 1, 7, 100),
                b.reserve_wraps_within(&k2.id, 1, 7, 100)
            );
            ga += x.unwrap();
            gb += y.unwrap();
        }
        assert_eq!(ga + gb, 100);
        assert_eq!(
            s.key_by_id(&k2.id)
                .await
                .unwrap()
                .version(1)
                .unwrap()
                .wrap_count,
            100
        );
    }

    async fn leases_have_one_holder_until_they_expire(db: Arc<TestDb>) {
        let (a, b) = (db.open().await, db.open().await);
        assert!(a
            .acquire_lease("jobs", "node-a", 1000, 10_000)
            .await
            .unwrap());
        assert!(!b
            .acquire_lease("jobs", "node-b", 1000, 10_500)
            .await
            .unwrap());
        // The holder renews.
        assert!(a
            .acquire_lease("jobs", "node-a", 1000, 10_900)
            .await
            .unwrap());
        assert!(!b
            .acquire_lease("jobs", "node-b", 1000, 11_800)
            .await
            .unwrap());
        // Expired: the other node takes it, and the first one no longer holds it.
        assert!(b
            .acquire_lease("jobs", "node-b", 1000, 11_900)
            .await
            .unwrap());
        assert!(!a
            .acquire_lease("jobs", "node-a", 1000, 12_000)
            .await
            .unwrap());
        // Given up: free at once.
        b.release_lease("jobs", "node-b").await.unwrap();
        assert!(a
            .acquire_lease("jobs", "node-a", 1000, 12_100)
            .await
            .unwrap());
        // Other leases are independent; racing takers: exactly one wins.
        let (x, y) = tokio::join!(
            a.acquire_lease("other", "node-a", 1000, 0),
            b.acquire_lease("other", "node-b", 1000, 0)
        );
        assert!(x.unwrap() ^ y.unwrap());
    }

    async fn due_rotations_follow_the_period_of_the_primary(db: Arc<TestDb>) {
        let s = db.open().await;
        let mut nk = new_key("rotating", 1);
        nk.rotation_period_ms = Some(1000);
        let k = s.create_key(&nk).await.unwrap();
        s.create_key(&new_key("still", 2)).await.unwrap();
        assert!(s.keys_due_rotation(1999).await.unwrap().is_empty());
        assert_eq!(s.keys_due_rotation(2000).await.unwrap(), vec![k.id]);
        s.add_version(&k.id, 2, &ObjectId([9; 16]), 2100)
            .await
            .unwrap();
        assert!(s.keys_due_rotation(3099).await.unwrap().is_empty());
        assert_eq!(s.keys_due_rotation(3100).await.unwrap(), vec![k.id]);
        // A primary that is not ENABLED is not rotated by the schedule.
        s.set_version_state(
            &k.id,
            2,
            &[VersionState::Enabled],
            VersionState::Disabled,
            3200,
        )
        .await
        .unwrap();
        assert!(s.keys_due_rotation(i64::MAX / 2).await.unwrap().is_empty());
    }

    async fn wrap_reservations_add_up(db: Arc<TestDb>) {
        let s = db.open().await;
        let k = s.create_key(&new_key("a", 1)).await.unwrap();
        assert_eq!(s.reserve_wraps(&k.id, 1, 100).await.unwrap(), 100);
        assert_eq!(s.reserve_wraps(&k.id, 1, 28).await.unwrap(), 128);
        assert!(matches!(
            s.reserve_wraps(&k.id, 9, 1).await,
            Err(StoreError::NotFound)
        ));
        assert_eq!(
            s.key_by_id(&k.id).await.unwrap().versions[0].wrap_count,
            128
        );
    }

    async fn tokens_by_hash_only(db: Arc<TestDb>) {
        let s = db.open().await;
        let t = crate::secret::BearerToken::from_random(&[5; 32]);
        let rec = TokenRecord {
            id: "tok_1".into(),
            hash: t.hash(),
            principal: "p".into(),
            roles: vec!["admin".into(), "x".into()],
            created_at: 1,
            expires_at: Some(2),
            revoked_at: None,
            key_globs: Vec::new(),
            cidrs: Vec::new(),
            bound_principal: None,
            description: String::new(),
        };
        s.insert_token(&rec).await.unwrap();
        let got = s.token_by_hash(&t.hash()).await.unwrap();
        assert_eq!(got.roles, ["admin", "x"]);
        assert_eq!(got.expires_at, Some(2));
        assert_eq!(got.revoked_at, None);
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

    /// Pages are in byte order of names on both back ends, whatever the PostgreSQL
    /// collation (the test cluster's default is ICU en-US, which sorts `_` before `-`
    /// before digits).
    async fn keys_list_in_byte_order_of_names(db: Arc<TestDb>) {
        let s = db.open().await;
        let mut all = ["a_", "a0", "a/", "a-", "ab", "a", "b-c", "b/c"];
        for (n, name) in all.iter().enumerate() {
            s.create_key(&new_key(name, n as u8 + 1)).await.unwrap();
        }
        all.sort_unstable();
        assert_eq!(all, ["a", "a-", "a/", "a0", "a_", "ab", "b-c", "b/c"]);
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list_keys(after.as_deref(), 3).await.unwrap();
            if page.is_empty() {
                break;
            }
            seen.extend(names(&page).into_iter().map(str::to_string));
            after = seen.last().cloned();
        }
        assert_eq!(seen, all);
    }

    async fn two_nodes_race_for_a_version_number_and_exactly_one_wins(db: Arc<TestDb>) {
        let a = Arc::new(db.open().await);
        let b = Arc::new(db.open().await);
        for round in 0..10u8 {
            let k = a
                .create_key(&new_key(&format!("k{round}"), 100 + round))
                .await
                .unwrap();
            let race = |s: Arc<SqlStore>, obj: u8| {
                let id = k.id;
                tokio::spawn(async move { s.add_version(&id, 2, &ObjectId([obj; 16]), 5).await })
            };
            let (ra, rb) = tokio::join!(
                race(Arc::clone(&a), round),
                race(Arc::clone(&b), 200 - round)
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            let won: Vec<&KeyRecord> = [&ra, &rb]
                .into_iter()
                .filter_map(|r| r.as_ref().ok())
                .collect();
            assert_eq!(won.len(), 1, "round {round}: {ra:?} / {rb:?}");
            for r in [&ra, &rb] {
                if let Err(e) = r {
                    assert!(
                        matches!(e, StoreError::AlreadyExists),
                        "round {round}: loser got {e:?}"
                    );
                }
            }
            let k = b.key_by_id(&k.id).await.unwrap();
            assert_eq!(k.versions.len(), 2);
            assert_eq!(k.primary_version, 2);
            assert_eq!(k.versions[1].hsm_id, won[0].versions[1].hsm_id);
        }
    }

    async fn two_nodes_race_for_a_state_change_and_exactly_one_wins(db: Arc<TestDb>) {
        use VersionState::*;
        let a = Arc::new(db.open().await);
        let b = Arc::new(db.open().await);
        for round in 0..10u8 {
            let k = a
                .create_key(&new_key(&format!("k{round}"), 100 + round))
                .await
                .unwrap();
            let race = |s: Arc<SqlStore>| {
                let id = k.id;
                tokio::spawn(
                    async move { s.set_version_state(&id, 1, &[Enabled], Disabled, 5).await },
                )
            };
            let (ra, rb) = tokio::join!(race(Arc::clone(&a)), race(Arc::clone(&b)));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            let won = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
            assert_eq!(won, 1, "round {round}: {ra:?} / {rb:?}");
            for r in [&ra, &rb] {
                if let Err(e) = r {
                    assert!(
                        matches!(
                            e,
                            StoreError::StateConflict {
                                current: "DISABLED"
                            }
                        ),
                        "round {round}: loser got {e:?}"
                    );
                }
            }
        }
    }

    async fn two_nodes_reserve_wraps_without_losing_any(db: Arc<TestDb>) {
        let a = Arc::new(db.open().await);
        let b = Arc::new(db.open().await);
        let k = a.create_key(&new_key("counted", 1)).await.unwrap();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..16u64 {
            let s = Arc::clone(if i % 2 == 0 { &a } else { &b });
            let id = k.id;
            set.spawn(async move {
                let mut got = Vec::new();
                for _ in 0..5 {
                    got.push(s.reserve_wraps(&id, 1, 7).await.unwrap());
                }
                got
            });
        }
        let mut counts = Vec::new();
        while let Some(r) = set.join_next().await {
            counts.extend(r.unwrap());
        }
        // Every reservation saw its own total: no two were merged or lost.
        counts.sort_unstable();
        let expected: Vec<u64> = (1..=80).map(|n| n * 7).collect();
        assert_eq!(counts, expected);
        assert_eq!(
            b.key_by_id(&k.id).await.unwrap().versions[0].wrap_count,
            560
        );
    }

    async fn two_nodes_migrate_at_once(db: Arc<TestDb>) {
        // Several stores open a fresh database at the same moment: all succeed and the
        // schema is applied once.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let db = Arc::clone(&db);
            set.spawn(async move { db.try_open().await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap()
                .unwrap_or_else(|e| panic!("concurrent open: {e} ({e:?})"));
        }
        let s = db.open().await;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&s.reader)
                .await
                .unwrap();
        assert_eq!(applied, migration_versions(db.backend()));
        s.create_key(&new_key("a", 1)).await.unwrap();
    }

    async fn a_lost_connection_is_unavailable_and_the_pool_recovers(db: Arc<TestDb>) {
        let s = db.open().await;
        // A transaction whose connection the server then terminates (as on a failover or
        // an administrator's pg_terminate_backend).
        let mut tx = s.writer.begin().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let mut admin = db.admin().await;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let mut lost = None;
        for _ in 0..50 {
            match sqlx::query("SELECT 1").execute(&mut *tx).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    lost = Some(classify(e));
                    break;
                }
            }
        }
        let lost = lost.expect("the terminated connection kept answering");
        assert!(matches!(lost, StoreError::Unavailable(_)), "{lost:?}");
        drop(tx);
        // The pool replaces the connection: the next calls work.
        s.ping().await.unwrap();
        s.create_key(&new_key("after", 1)).await.unwrap();

        // A server that is not there at all: Unavailable, and no error text quotes the
        // password of the URL.
        let started = std::time::Instant::now();
        let e = SqlStore::open_postgres("postgres://arca:pw-s3cret-42@127.0.0.1:1/arca")
            .await
            .err()
            .expect("connected to port 1");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        let mut text = format!("{e} {e:?}");
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            text.push_str(&s.to_string());
            src = s.source();
        }
        assert!(!text.contains("pw-s3cret-42"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    async fn truncate_is_refused_too(db: Arc<TestDb>) {
        // Row triggers do not see TRUNCATE; statement triggers refuse it.
        let s = db.open().await;
        s.create_key(&new_key("a", 1)).await.unwrap();
        for sql in [
            "TRUNCATE key_versions",
            "TRUNCATE keys CASCADE",
            "TRUNCATE keys, key_versions",
        ] {
            assert!(
                sqlx::query(sql).execute(&s.writer).await.is_err(),
                "{sql} was allowed"
            );
        }
        assert_eq!(s.list_keys(None, 10).await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sqlite_write_lock_held_past_the_busy_timeout_is_unavailable() {
        // Another process holds the write lock for longer than the busy timeout (5 s):
        // the write fails as retryable, not as an internal error.
        let db = TestDb::sqlite();
        let a = db.open().await;
        let b = db.open().await;
        let mut held = a.writer.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("UPDATE schema_migrations SET applied_at = applied_at")
            .execute(&mut *held)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let r = b.create_key(&new_key("blocked", 1)).await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(started.elapsed() >= Duration::from_secs(4));
        held.rollback().await.unwrap();
        b.create_key(&new_key("blocked", 1)).await.unwrap();
    }

    /// A database error with a given SQLSTATE, for [`classify`].
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "message text is never looked at"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            if self.0 == "23505" {
                sqlx::error::ErrorKind::UniqueViolation
            } else {
                sqlx::error::ErrorKind::Other
            }
        }
    }

    #[test]
    fn errors_are_classified_by_type_and_sqlstate() {
        let db = |c: &'static str| classify(sqlx::Error::Database(Box::new(Coded(c))));
        for c in [
            // PostgreSQL
            "08000", "08003", "08006", "08001", "08004", "08P01", "57P01", "57P02", "57P03",
            "53300", // SQLite: BUSY and LOCKED, and their extended codes
            "5", "6", "261", "517", "773", "262",
        ] {
            assert!(matches!(db(c), StoreError::Unavailable(_)), "{c}");
        }
        assert!(matches!(db("23505"), StoreError::AlreadyExists));
        // Constraint and trigger failures are not outages, on either back end.
        for c in [
            "23514", "P0001", "23000", "42P01", "19", "2067", "1811", "787", "1",
        ] {
            assert!(matches!(db(c), StoreError::Database(_)), "{c}");
        }
        assert!(matches!(
            classify(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            classify(sqlx::Error::PoolClosed),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            classify(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset
            ))),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            classify(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    #[test]
    fn a_database_name_replaces_the_url_path() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5/arca", "t1"),
            "postgres://u@127.0.0.1:5/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/x?sslmode=disable", "t2"),
            "postgres://u:p@h/t2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t3"), "postgres://h/t3");
    }
}
