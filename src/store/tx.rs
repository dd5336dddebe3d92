//! Transactions shared by the table families: [`Tx`], and opening a write transaction
//! with the back end's statement ([`SqlStore::begin_write`]).
//!
//! Invariants:
//! - Every state change runs in one write transaction opened here: `BEGIN IMMEDIATE` on
//!   SQLite (the write lock at once), plain `BEGIN` on PostgreSQL (READ COMMITTED).
//! - A transaction dropped without `commit` rolls back: an error path never commits half
//!   a change.
//!
//! Must not import: the table-family files of `store/`; tonic, prost, cryptoki.

use super::classify::classify;
use super::error::Result;
use super::pool::SqlStore;

/// An open transaction on either back end.
pub(super) type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

impl SqlStore {
    /// Opens a write transaction on the writer pool.
    pub(super) async fn begin_write(&self) -> Result<Tx<'static>> {
        self.writer.begin_with(self.begin).await.map_err(classify)
    }
}
