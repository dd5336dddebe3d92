//! Persistent state: keys, key versions, bearer tokens, dual control and approval
//! requests.
//!
//! [`Store`] is the one interface the service uses; [`SqlStore`] implements it through
//! sqlx on SQLite (WAL, the default; one node) and on PostgreSQL (one or more nodes
//! sharing a database), with one body of portable SQL. Migrations live beside the code,
//! one directory per back end; the contract tests run on both.
//!
//! Invariants:
//! - Every state change is one transaction; uniqueness (key names forever, version numbers
//!   per key, HSM object ids) and legal version-state transitions are enforced by the
//!   database (constraints and triggers), not only by checks in Rust.
//! - Keys are never deleted (a trigger refuses DELETE), so a name is never reused.
//! - No key material, token or PIN is ever stored: only HSM object ids and token hashes.
//!   A custodian's share rests only sealed under the HSM key `arca:meta`, while its
//!   approval request is pending.
//! - `wrap_count` is an upper bound of the wraps made under a version: nodes reserve
//!   blocks of wraps before using them.
//!
//! Must not import: tonic, prost, cryptoki. The only module that uses sqlx.

mod access;
mod approvals;
mod audit;
mod lifecycle;
mod quorum;
mod sql;
mod tokens;

pub use access::{
    AccessStore, GrantRecord, MfaFailure, PolicyVersion, ReviewRecord, TotpEnrolment,
};
pub use approvals::{
    ApprovalEntry, ApprovalRecord, ApprovalStore, NewQuorum, NewRequest, RequestResult, SealedShare,
};
pub use audit::{AppendBuilder, AuditAppend, AuditRow, AuditSeal, AuditStore, BoxFuture};
pub use quorum::{CustodianRecord, Failure, QuorumConfig, QuorumStore};
pub use sql::{Backend, SqlStore};

pub use tokens::TokenStore;

use arca_hsm::ObjectId;

use crate::keys::{KeyId, KeyName, VersionState};
use crate::secret::TokenHash;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist.
    #[error("not found")]
    NotFound,
    /// A uniqueness constraint refused the write (name taken, version exists...).
    #[error("already exists")]
    AlreadyExists,
    /// A conditional update found the row in another state than expected.
    #[error("state conflict: current state {current}")]
    StateConflict {
        /// The state found.
        current: &'static str,
    },
    /// TEMPORARY SHIM until the store restructure lands.
    #[error("state conflict: {0:?}")]
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

/// TEMPORARY SHIM until the store restructure lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Conflict {
    VersionState(VersionState),
    ChangedConcurrently,
    Destroying,
    NotDue,
    RetentionNotDue,
    RequestState(crate::quorum::approvals::RequestState),
    Generation,
    Revoked,
    StepUsed,
    ReviewClosed,
    AuditHead,
}

/// The driver's error under a [`StoreError`] (sqlx's, or SQLite's own on the audit
/// writer's connection): kept as the source for logs, never shown to callers.
pub type DbError = Box<dyn std::error::Error + Send + Sync>;

/// Result alias of this layer.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

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
    /// Scheduled rotation period (ms).
    pub rotation_period_ms: Option<i64>,
    /// Retention date (Unix ms).
    pub retain_until: Option<i64>,
    /// Unix ms.
    pub now: i64,
}

/// A lifecycle change to one key, made in one transaction (directly, or with the
/// completion of the approval request that ordered it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleChange {
    /// ENABLED/DISABLED → SCHEDULED_FOR_DESTRUCTION for each listed version, due at
    /// `destroy_at`; `StateConflict` (nothing changed) if any is in another state.
    Schedule {
        /// Versions to retire.
        versions: Vec<u32>,
        /// When the destroyer may act (Unix ms).
        destroy_at: i64,
        /// The approval request that ordered it.
        request: Option<String>,
    },
    /// SCHEDULED_FOR_DESTRUCTION → DISABLED for each listed version, unless the
    /// destroyer has started on it (`StateConflict { current: "DESTROYING" }`).
    Cancel {
        /// Versions to restore.
        versions: Vec<u32>,
    },
    /// Sets or clears the retention date (and forgets an earlier application of it).
    Retention {
        /// The new date (Unix ms).
        retain_until: Option<i64>,
    },
    /// The retention job: schedules every version not yet retired, like `Schedule`,
    /// and records that the retention date was acted on — only if the date has passed
    /// and was not acted on already (`StateConflict`).
    ApplyRetention {
        /// When the destroyer may act (Unix ms).
        destroy_at: i64,
    },
}

/// A version whose destruction is due.
#[derive(Clone, Debug)]
pub struct DueDestruction {
    /// Key id.
    pub key: KeyId,
    /// Version.
    pub version: u32,
    /// Its HSM object.
    pub hsm_id: ObjectId,
}

/// The permanent record of a destroyed version.
#[derive(Clone, Debug)]
pub struct Tombstone {
    /// Key id.
    pub key: KeyId,
    /// Version.
    pub version: u32,
    /// The destroyed HSM object's `CKA_ID`.
    pub hsm_id: ObjectId,
    /// Unix ms.
    pub destroyed_at: i64,
    /// The approval request that retired it, if any.
    pub retire_request: Option<String>,
}

/// A bearer token's stored form (the token itself is never stored).
#[derive(Clone, Debug)]
pub struct TokenRecord {
    /// Public token id (for listing and revocation).
    pub id: String,
    /// SHA-256 of the token.
    pub hash: TokenHash,
    /// The principal the token authenticates.
    pub principal: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; `None` = no expiry.
    pub expires_at: Option<i64>,
    /// Key-name globs the token may touch; empty = every key its roles allow.
    pub key_globs: Vec<String>,
    /// Source networks it may be used from; empty = anywhere.
    pub cidrs: Vec<String>,
    /// Certificate principal it only works with (over mutual TLS).
    pub bound_principal: Option<String>,
    /// Free text.
    pub description: String,
    /// Unix ms when revoked.
    pub revoked_at: Option<i64>,
}

/// The storage interface of the service.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
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
        now: i64,
    ) -> Result<KeyRecord>;

    /// Moves a version to `to` if it is in one of `from`; `StateConflict` otherwise.
    async fn set_version_state(
        &self,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        now: i64,
    ) -> Result<KeyRecord>;

    /// Reserves `n` wraps under a version: adds `n` to its `wrap_count` and returns the
    /// new count. The caller may make `n` wraps.
    async fn reserve_wraps(&self, key: &KeyId, version: u32, n: u64) -> Result<u64>;

    /// Stores a new token.
    async fn insert_token(&self, token: &TokenRecord) -> Result<()>;

    /// The token with that hash.
    async fn token_by_hash(&self, hash: &TokenHash) -> Result<TokenRecord>;

    /// Reserves up to `n` wraps under a version without passing `limit` wraps in all;
    /// returns how many were granted (0: the version has reached its usage limit).
    async fn reserve_wraps_within(
        &self,
        key: &KeyId,
        version: u32,
        n: u64,
        limit: u64,
    ) -> Result<u64>;

    /// Applies a lifecycle change in one transaction.
    async fn apply_lifecycle(
        &self,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord>;

    /// Ids of keys whose primary version is ENABLED and older than the key's rotation
    /// period. (The usage limit is enforced where wraps are reserved.)
    async fn keys_due_rotation(&self, now: i64) -> Result<Vec<KeyId>>;

    /// Ids of keys whose retention date has passed and was not acted on yet.
    async fn keys_due_retention(&self, now: i64) -> Result<Vec<KeyId>>;

    /// Versions SCHEDULED_FOR_DESTRUCTION whose `destroy_at` has passed (or whose
    /// destruction was started), oldest first.
    async fn due_destructions(&self, now: i64, limit: u32) -> Result<Vec<DueDestruction>>;

    /// Marks the destruction of a due version as started (no cancelling from now on).
    /// `StateConflict` if it is no longer scheduled or not yet due.
    async fn begin_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<()>;

    /// SCHEDULED_FOR_DESTRUCTION (started) → DESTROYED, writing the tombstone, in one
    /// transaction. A version already DESTROYED is left as it is.
    async fn finish_destruction(&self, key: &KeyId, version: u32, now: i64) -> Result<KeyRecord>;

    /// HSM object ids of versions destroyed at or after `since` (Unix ms), so every
    /// node can drop what it still holds of them.
    async fn destroyed_since(&self, since: i64) -> Result<Vec<(ObjectId, i64)>>;

    /// The tombstones of a key.
    async fn tombstones(&self, key: &KeyId) -> Result<Vec<Tombstone>>;

    /// Takes or renews the lease `name` for `holder` until `now + ttl_ms`, if it is free,
    /// expired or already `holder`'s. Returns whether `holder` holds it.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: i64) -> Result<bool>;

    /// Gives the lease up (if `holder` holds it).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;

    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<()>;
}
