//! Persistent state: keys and their versions, the key lifecycle, job leases, bearer
//! tokens, the quorum and its custodians, approval requests, access-control state and the
//! audit trail.
//!
//! Each table family is one file behind its own trait, so that a service holds only the
//! stores it uses: [`KeyStore`], [`LifecycleStore`], [`LeaseStore`], [`TokenStore`],
//! [`QuorumStore`], [`ApprovalStore`], [`AccessStore`], [`AuditStore`], and [`Ping`] for
//! health checks. [`Store`] is all of them at once, for wiring. [`SqlStore`] implements
//! every one through sqlx on SQLite (WAL, the default; one node) and on PostgreSQL (one or
//! more nodes sharing a database), with one body of portable SQL. Migrations live beside
//! the code, one directory per back end; the contract tests run on both.
//!
//! Files, from the bottom up (a file imports only files listed before it):
//! - `error.rs`: [`StoreError`] and [`Conflict`], what a refused conditional write found.
//! - `classify.rs`: driver errors → [`StoreError`], by type and code.
//! - `rows.rs`: row decoding shared by the families.
//! - `connect.rs`: connection set-up (SQLite pragmas and pools, the PostgreSQL pool, the
//!   audit writer's own SQLite connection); `migrate.rs`: the migrations and their runner.
//! - `pool.rs`: [`SqlStore`] itself, opening it, [`Ping`]; `tx.rs`: write transactions.
//! - Table families: `keys.rs`; `lifecycle.rs` (uses `keys.rs`); `leases.rs`;
//!   `tokens.rs`; `quorum.rs` (uses `tokens.rs`); `access.rs`; `audit.rs`; `requests.rs`
//!   (approval rows; uses `keys.rs`, `quorum.rs`, `tokens.rs`); `approvals.rs` (the
//!   completions, which make another family's change with the request's `EXECUTED` mark:
//!   uses `requests.rs` and the families whose tables they change).
//!
//! Invariants:
//! - Every state change is one transaction; uniqueness (key names forever, version numbers
//!   per key, HSM object ids) and legal version-state transitions are enforced by the
//!   database (constraints and triggers), not only by checks in Rust.
//! - A refused conditional write is a typed [`Conflict`], never text to match.
//! - Keys are never deleted (a trigger refuses DELETE), so a name is never reused.
//! - No key material, token or PIN is ever stored: only HSM object ids and token hashes.
//!   A custodian's share rests only sealed under the HSM key `arca:meta`, while its
//!   approval request is pending.
//! - `wrap_count` is an upper bound of the wraps made under a version: nodes reserve
//!   blocks of wraps before using them.
//!
//! Must not import: tonic, prost, cryptoki, arca_hsm (HSM object ids are
//! [`crate::keys::ObjectId`]). The only module that uses sqlx. Within `store/`, no file
//! imports this one: each imports the file that defines what it uses.

mod access;
mod approvals;
mod attempts;
mod audit;
mod classify;
mod connect;
mod error;
mod keys;
mod leases;
mod lifecycle;
mod migrate;
mod pool;
mod quorum;
mod requests;
mod rows;
mod tokens;
mod tx;

#[cfg(test)]
mod tests;

pub use access::{
    AccessStore, GrantRecord, MfaAttempt, MfaFailure, PolicyVersion, ReviewRecord, Roster,
    TotpEnrolment,
};
pub use approvals::ApprovalStore;
pub use audit::{AppendBuilder, AuditAppend, AuditRow, AuditSeal, AuditStore, BoxFuture};
pub use connect::Backend;
pub use error::{Conflict, DbError, Result, StoreError};
pub use keys::{EnabledStamp, KeyRecord, KeyStore, NewKey, VersionRecord};
pub use leases::LeaseStore;
pub use lifecycle::{DueDestruction, LifecycleChange, LifecycleStore, Tombstone, VersionStamp};
pub use pool::{Ping, SqlStore};
pub use quorum::{Counter, CustodianAttempt, CustodianRecord, Failure, QuorumConfig, QuorumStore};
pub use requests::{
    ApprovalEntry, ApprovalRecord, NewQuorum, NewRequest, RequestResult, SealedShare,
};
pub use tokens::{TokenRecord, TokenStore};

/// Every store at once, for wiring (and for the health probe's [`Ping`]); implemented
/// by everything that implements them all. A service that uses fewer holds only those.
pub trait Store:
    KeyStore
    + LifecycleStore
    + LeaseStore
    + TokenStore
    + QuorumStore
    + ApprovalStore
    + AccessStore
    + AuditStore
    + Ping
{
}

impl<T> Store for T where
    T: KeyStore
        + LifecycleStore
        + LeaseStore
        + TokenStore
        + QuorumStore
        + ApprovalStore
        + AccessStore
        + AuditStore
        + Ping
{
}
