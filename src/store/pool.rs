//! [`SqlStore`]: the storage traits on sqlx's `Any` driver, so one body of portable SQL
//! (`$n` placeholders, BIGINT/TEXT columns) serves SQLite and PostgreSQL. This file owns
//! the struct, opening it (connections, then migrations) and [`Ping`]; each table
//! family implements its own trait for it in its own file.
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
//! for a concurrent writer, so the loser gets a `Conflict`), a wrap reservation is one
//! atomic `UPDATE … SET wrap_count = wrap_count + $n`, and migrations take a transaction-
//! scoped advisory lock first, so nodes starting together apply each migration once.
//!
//! Invariant: a store is usable only once its database is migrated (`open_*` returns
//! after the migrations).
//!
//! Must not import: the table-family files of `store/` (they import this one); tonic,
//! prost, cryptoki.

use sqlx::AnyPool;

use super::classify::classify;
use super::connect::{self, AuditConnection, Backend};
use super::error::Result;
use super::migrate::migrate;

/// SQL store over SQLite or PostgreSQL, with the same SQL.
pub struct SqlStore {
    /// Write transactions (one connection on SQLite).
    pub(super) writer: AnyPool,
    /// Reads outside transactions (the writer's pool on PostgreSQL).
    pub(super) reader: AnyPool,
    backend: Backend,
    /// The statement that opens a write transaction (see `tx.rs`).
    pub(super) begin: &'static str,
    /// SQLite only: the audit writer's own connection (see `audit.rs`).
    pub(super) audit_conn: Option<AuditConnection>,
}

impl SqlStore {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        let (writer, reader) = connect::sqlite_pools(path).await?;
        let store = SqlStore {
            writer,
            reader,
            backend: Backend::Sqlite,
            begin: connect::SQLITE_BEGIN,
            audit_conn: Some(AuditConnection::new(path)),
        };
        migrate(&store.writer, store.begin, store.backend).await?;
        Ok(store)
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://…`; the database must
    /// exist) and applies migrations. Several nodes may open the same database at once.
    ///
    /// The URL may carry a password: it is handed to the driver only, and no error of
    /// this function quotes it.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        let pool = connect::postgres_pool(url).await?;
        let store = SqlStore {
            writer: pool.clone(),
            reader: pool,
            backend: Backend::Postgres,
            begin: connect::POSTGRES_BEGIN,
            audit_conn: None,
        };
        migrate(&store.writer, store.begin, store.backend).await?;
        Ok(store)
    }

    /// The back end in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

/// A health probe of the database.
#[async_trait::async_trait]
pub trait Ping: Send + Sync + 'static {
    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<()>;
}

#[async_trait::async_trait]
impl Ping for SqlStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(classify)?;
        Ok(())
    }
}
