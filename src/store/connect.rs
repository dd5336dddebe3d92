//! Connection set-up: the SQLite pools (WAL and the pragmas every connection gets), the
//! PostgreSQL pool, and the audit writer's own SQLite connection ([`AuditConnection`]).
//!
//! Invariants:
//! - Every SQLite connection, the pools' and the audit writer's, runs WAL with a durable
//!   commit (`synchronous = FULL`), a wait for the write lock and foreign keys on.
//! - SQLite has one writer connection (writes queue on it; more writers only add lock
//!   waits) and a few readers; PostgreSQL has one pool that serves both.
//! - A pool waits a bounded time for a connection, so an outage fails calls
//!   `Unavailable` instead of hanging them.
//! - Opening PostgreSQL never quotes the URL (which may carry a password) in an error.
//!
//! Must not import: any other file of `store/` but `error.rs` and `classify.rs`; tonic,
//! prost, cryptoki.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

use super::classify::classify;
use super::error::Result;

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file (the default; one node).
    Sqlite,
    /// PostgreSQL server (one or several nodes).
    Postgres,
}

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

/// Settings of every SQLite connection (the pools' and the audit writer's): WAL, a
/// durable commit (fsync of the WAL), a wait for the write lock, foreign keys.
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;";

/// The audit connection's wait for the write lock: well under the audit commit timeout
/// (default 2 s), so a batch either starts within it or fails.
const AUDIT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// The statement that opens a write transaction on SQLite: it takes the write lock at
/// once, so several processes on one file queue on the lock instead of failing on upgrade.
pub(super) const SQLITE_BEGIN: &str = "BEGIN IMMEDIATE";

/// The statement that opens a write transaction on PostgreSQL (READ COMMITTED).
pub(super) const POSTGRES_BEGIN: &str = "BEGIN";

type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// The writer pool (one connection) and the reader pool (four) of the SQLite database
/// at `path`, created if needed.
pub(super) async fn sqlite_pools(path: &std::path::Path) -> Result<(AnyPool, AnyPool)> {
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
    Ok((writer, reader))
}

/// The pool of the PostgreSQL database at `url` (which must exist).
pub(super) async fn postgres_pool(url: &str) -> Result<AnyPool> {
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
    AnyPoolOptions::new()
        .max_connections(POSTGRES_POOL_SIZE)
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .after_connect(postgres_settings)
        .connect(url)
        .await
        .map_err(classify)
}

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
    /// The audit connection of the SQLite database at `path` (not opened yet).
    pub(super) fn new(path: &std::path::Path) -> Self {
        AuditConnection {
            path: path.to_path_buf(),
            conn: Default::default(),
        }
    }

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
