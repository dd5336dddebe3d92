//! Migrations: the DDL of each back end (`migrations/<backend>/`, compiled in) and the
//! runner that applies what a database lacks.
//!
//! Invariants:
//! - Each migration is applied once, in one transaction with its row in
//!   `schema_migrations`; migrations are only ever appended, never edited.
//! - Nodes starting together on one database queue: on PostgreSQL the transaction first
//!   takes an advisory lock (even `CREATE TABLE IF NOT EXISTS` is not safe against a
//!   concurrent twin there); on SQLite `BEGIN IMMEDIATE` does the same.
//!
//! Must not import: the table-family files or `pool.rs` of `store/`; tonic, prost,
//! cryptoki.

use sqlx::AnyPool;

use super::classify::classify;
use super::connect::Backend;
use super::error::Result;

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/sqlite/0001_keys.sql")),
    (2, include_str!("migrations/sqlite/0002_quorum.sql")),
    (3, include_str!("migrations/sqlite/0003_approvals.sql")),
    (4, include_str!("migrations/sqlite/0004_token_scopes.sql")),
    (5, include_str!("migrations/sqlite/0005_lifecycle.sql")),
    (6, include_str!("migrations/sqlite/0006_audit.sql")),
    (7, include_str!("migrations/sqlite/0007_rbac.sql")),
    (8, include_str!("migrations/sqlite/0008_state_mac.sql")),
    (9, include_str!("migrations/sqlite/0009_attempt_slots.sql")),
    (
        10,
        include_str!("migrations/sqlite/0010_requester_person.sql"),
    ),
    (12, include_str!("migrations/sqlite/0012_counters.sql")),
    (13, include_str!("migrations/sqlite/0013_tombstone_seq.sql")),
];
const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/postgres/0001_keys.sql")),
    (2, include_str!("migrations/postgres/0002_quorum.sql")),
    (3, include_str!("migrations/postgres/0003_approvals.sql")),
    (4, include_str!("migrations/postgres/0004_token_scopes.sql")),
    (5, include_str!("migrations/postgres/0005_lifecycle.sql")),
    (6, include_str!("migrations/postgres/0006_audit.sql")),
    (7, include_str!("migrations/postgres/0007_rbac.sql")),
    (8, include_str!("migrations/postgres/0008_state_mac.sql")),
    (
        9,
        include_str!("migrations/postgres/0009_attempt_slots.sql"),
    ),
    (
        10,
        include_str!("migrations/postgres/0010_requester_person.sql"),
    ),
    (12, include_str!("migrations/postgres/0012_counters.sql")),
    (
        13,
        include_str!("migrations/postgres/0013_tombstone_seq.sql"),
    ),
];

/// Key of the PostgreSQL advisory lock that serialises migrations across nodes ("arca"
/// in ASCII, then 1).
const MIGRATION_LOCK: i64 = 0x6172_6361_0000_0001;

/// The migrations of a back end, by version.
pub(super) fn migrations(backend: Backend) -> &'static [(i64, &'static str)] {
    match backend {
        Backend::Sqlite => SQLITE_MIGRATIONS,
        Backend::Postgres => POSTGRES_MIGRATIONS,
    }
}

/// Applies the migrations of `backend` not applied yet, each in one transaction (opened
/// on `writer` with `begin`) with its row in `schema_migrations`.
///
/// A database that already has every migration is only read: a runtime role without
/// the right to change the schema (see docs/deployment.md) then starts a node, and the
/// migration role runs first (`arca server` with it, once per upgrade).
pub(super) async fn migrate(writer: &AnyPool, begin: &'static str, backend: Backend) -> Result<()> {
    // No table yet (or no right to read it) is an error here: the loop below finds out.
    if let Ok(applied) = sqlx::query_scalar::<_, i64>("SELECT version FROM schema_migrations")
        .fetch_all(writer)
        .await
    {
        if migrations(backend)
            .iter()
            .all(|(version, _)| applied.contains(version))
        {
            return Ok(());
        }
    }
    for (version, sql) in migrations(backend) {
        let mut tx = writer.begin_with(begin).await.map_err(classify)?;
        if backend == Backend::Postgres {
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
            tracing::info!(version, backend = ?backend, "applied database migration");
        }
        tx.commit().await.map_err(classify)?;
    }
    Ok(())
}
