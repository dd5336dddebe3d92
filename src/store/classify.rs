//! Error classification: every driver error becomes a [`StoreError`] here, once, by its
//! type and code (SQLSTATE on PostgreSQL, result code on SQLite), never by message text.
//!
//! Invariants:
//! - `Unavailable` (retryable) is every way of losing the database; a constraint or
//!   trigger refusal is never an outage (`Database`), except a unique violation
//!   (`AlreadyExists`).
//! - The driver's error is kept as the source, for logs.
//!
//! Must not import: any other file of `store/` but `error.rs`; tonic, prost, cryptoki.

use super::error::StoreError;

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

/// The [`StoreError`] of an error on the audit writer's own SQLite connection (as
/// [`classify`] does for sqlx).
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
