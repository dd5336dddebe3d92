//! The errors of the storage layer: [`StoreError`], and [`Conflict`], what a conditional
//! write found instead of the state it needed.
//!
//! Invariants:
//! - A conflict is a value, never text: callers match its variants, and its `Display` is
//!   for logs only.
//! - A conflict means nothing was changed by the refused call (its transaction rolled back).
//! - The driver's own error is kept as a source for logs ([`DbError`]) and never reaches a
//!   caller's answer.
//!
//! Must not import: sqlx (classification is `classify.rs`'s), any other file of `store/`,
//! tonic, prost, cryptoki.

use std::fmt;

use crate::keys::VersionState;
use crate::quorum::approvals::RequestState;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist.
    #[error("not found")]
    NotFound,
    /// A uniqueness constraint refused the write (name taken, version exists...).
    #[error("already exists")]
    AlreadyExists,
    /// A conditional write found its row in another state than it needed; nothing changed.
    #[error("state conflict: {0}")]
    Conflict(Conflict),
    /// The database could not be reached or timed out; retryable.
    #[error("database unavailable")]
    Unavailable(#[source] DbError),
    /// A stored value could not be decoded (corruption or a schema mismatch).
    #[error("corrupt row: {0}")]
    Corrupt(&'static str),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] DbError),
}

/// What a conditional write found instead of the state it needed (the refused call
/// changed nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The key version is in this state, which the change does not start from: a state
    /// change (`set_version_state`, `complete_set_version_state`), a retirement or its
    /// cancellation (`apply_lifecycle`, `complete_lifecycle`), or the end of a destruction
    /// (`finish_destruction`, which takes `Destroyed` as done). On PostgreSQL it names the
    /// state that won a race with another node.
    VersionState(VersionState),
    /// The key version's state changed under every try of a conditional update
    /// (PostgreSQL, with other nodes writing the same row): try again.
    ChangedConcurrently,
    /// The destroyer has started on the (still `SCHEDULED_FOR_DESTRUCTION`) version: it can
    /// no longer be cancelled nor scheduled again (`apply_lifecycle`, `complete_lifecycle`).
    Destroying,
    /// The version's scheduled destruction is not due yet (`begin_destruction`).
    NotDue,
    /// The key's retention date is unset, not reached yet, or was acted on already
    /// (`LifecycleChange::ApplyRetention`).
    RetentionNotDue,
    /// The approval request is in this state (its effective one: `Expired` once past its
    /// expiry short of K approvals), which the call does not accept. `Pending` means K
    /// approvals are in (no more approvals; `add_approval`) or not all of them yet (no
    /// completion; the `complete_*` methods). Also from `reject_request` and
    /// `fail_request` on a decided or expired request.
    RequestState(RequestState),
    /// The quorum's generation is no longer the one the rekey replaces: another rekey
    /// committed first (`complete_rekey`).
    Generation,
    /// The token was revoked already (`revoke_token`).
    Revoked,
    /// That TOTP step, or a later one, was used already: a replay (`use_totp_step`,
    /// `use_principal_totp_step`).
    StepUsed,
    /// The break-glass review was closed already (`close_review`).
    ReviewClosed,
    /// No TOTP attempt may be reserved: the principal or custodian is locked out, or its
    /// failures and the attempts in flight already reach the limit
    /// (`reserve_mfa_attempt`, `reserve_custodian_attempt`).
    LockedOut,
    /// The audit head moved since the caller read it: another writer appended first
    /// (`audit_append_at`, and `audit_append` when the head changes under it).
    AuditHead,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::VersionState(s) => write!(f, "key version is {}", s.as_str()),
            Conflict::ChangedConcurrently => f.write_str("key version state changed concurrently"),
            Conflict::Destroying => f.write_str("destruction of the key version has started"),
            Conflict::NotDue => f.write_str("destruction of the key version is not due"),
            Conflict::RetentionNotDue => f.write_str("key retention is not due"),
            Conflict::RequestState(s) => write!(f, "approval request is {}", s.as_str()),
            Conflict::Generation => f.write_str("quorum generation moved"),
            Conflict::Revoked => f.write_str("token revoked already"),
            Conflict::StepUsed => f.write_str("TOTP step used already"),
            Conflict::ReviewClosed => f.write_str("review closed already"),
            Conflict::LockedOut => f.write_str("no TOTP attempt left: locked out"),
            Conflict::AuditHead => f.write_str("audit head moved"),
        }
    }
}

/// The driver's error under a [`StoreError`] (sqlx's, or SQLite's own on the audit
/// writer's connection): kept as the source for logs, never shown to callers.
pub type DbError = Box<dyn std::error::Error + Send + Sync>;

/// Result alias of this layer.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
