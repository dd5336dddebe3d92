//! The use cases of Arca, one service per use case, sharing one [`Context`] (stores,
//! engine slot, clock, key cache, audit log).
//!
//! | service | use cases |
//! |---|---|
//! | [`Guard`] (`access/guard.rs`) | authentication with the rate limit; the one authorization decision per call → [`Authorized`] |
//! | [`Keys`] (`keys/`) | data plane (generate, wrap, unwrap, rewrap) and key CRUD (create, get, list) |
//! | [`Rotation`] | `RotateKey`, and the one rotation used by jobs, the usage limit and approvals |
//! | [`Lifecycle`] | disable, enable, retire, cancel a retirement, retention dates |
//! | [`Jobs`] | the background passes: retention, scheduled rotation, crypto-shredding |
//! | [`Approvals`] (`quorum/approvals/`) | list, show, approve, reject; runs approved operations exactly once |
//! | [`Ceremony`] (`quorum/ceremony.rs`) | `Init`, `Rekey` (new quorums and custodian kits) |
//! | [`Sealing`] (`quorum/sealing.rs`) | `Unseal`, `Seal`, `SealStatus`, dev mode's auto-unseal |
//! | [`Tokens`], [`Grants`], [`Policies`], [`Totp`] (`access/`) | token administration; elevation, break-glass, reviews; policy changes; TOTP enrolment |
//! | [`AuditQueries`] | `QueryAudit`, `VerifyAudit` |
//!
//! [`Services`] builds them all once, for the server and the tests. Each service holds
//! only the services it calls; files import only from below them (no cycles:
//! `scripts/check-layering`).
//!
//! Invariants:
//! - **Authorization is a value.** A use case decides once ([`Guard::authorize`]), getting
//!   an [`Authorized<A>`] for its action `A`; the store is reached only through
//!   [`Context::db`], which takes such a proof (or the proof of a quorum approval, or the
//!   background [`System`] permit). A lookup before authorization does not compile, so a
//!   refusal looks and takes the same whether or not the key exists.
//! - One canonical context per call: the proof carries it to the HSM (as AAD) and to the
//!   audit record (as a keyed digest, in the call's [`Facts`]).
//! - Only the primary version wraps; only `ENABLED` versions unwrap; a wrapped key that
//!   fails in any way is the one error [`ServiceError::InvalidWrappedKey`].
//! - Every wrap is counted against its version's reserved budget before the HSM call.
//! - A gated operation runs only with a `QuorumApproved` proof, exactly once.
//!
//! Must not import: tonic, prost, sqlx, cryptoki, arca_hsm (the HSM is reached through
//! `keys`: the engine, and `keys::HsmAccess` to open it).

mod access;
mod admin;
mod audit;
mod cache;
mod context;
mod error;
mod facts;
mod gate;
mod jobs;
mod keys;
mod lifecycle;
mod quorum;
mod rotation;
mod serial;
mod services;

#[cfg(test)]
mod tests;

pub use access::{
    act, Act, Attempt, Authorized, Guard, Scope, FAILURE_LIMIT, FAILURE_WINDOW_MS, LOCKOUT_MS,
    REFRESH as ACCESS_REFRESH,
};
pub use admin::{
    AccessOutcome, Grants, NewToken, Policies, ReloadError, TokenInfo, TokenOutcome, Tokens, Totp,
    TotpEnrolled, MAX_REASON, MAX_TTL_MS,
};
pub use audit::{AuditQueries, EngineKeys};
pub use context::{Context, Db, EngineSlot, Forgetting, Permit, ServiceConfig, System};
pub use error::{Conflict, MfaRefusal, Rejection, Result, ServiceError};
pub use facts::{Facts, Outcome};
pub use gate::{AdminOutcome, Commit, Gate};
pub use jobs::Forgotten;
pub use jobs::{JobConfig, Jobs, LIFECYCLE_LEASE};
pub use keys::{
    DataKey, KeyOptions, Keys, Unwrapped, Wrapped, MAX_PAGE_SIZE, POLICY_REFUSED_AS_INVALID,
};
pub use lifecycle::Lifecycle;
pub use quorum::{
    Approvals, ApproveOutcome, Ceremony, CustodianKit, SealStatus, Sealing, AGE_PARAM_PREFIX,
    MAX_REASON_BYTES, MAX_REQUEST_PAGE, MIN_THRESHOLD, REKEY_NEEDS_LIVE_APPROVER,
    UNSEAL_PROGRESS_TTL_MS,
};
pub use rotation::Rotation;
pub use services::Services;

pub use crate::store::{
    ApprovalEntry, ApprovalRecord, GrantRecord, KeyRecord, RequestResult, ReviewRecord,
    VersionRecord,
};

use std::sync::Arc;

/// How long key metadata is trusted without asking the store again.
pub const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_millis(500);
/// Default number of wraps reserved in the store at a time, per version and node.
pub const DEFAULT_WRAP_RESERVATION: u64 = 1024;

/// Who is calling, as established by the transport.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The authenticated principal.
    pub principal: Arc<crate::authz::Principal>,
    /// The request id (also on the response as `x-request-id`).
    pub request_id: String,
    /// Where the request came from (address, verified client certificate).
    pub peer: crate::authz::Peer,
    /// The TOTP code the request carries (`x-arca-totp`), for roles that need MFA.
    pub mfa: Option<crate::authz::TotpCode>,
}

impl Caller {
    /// The principal named by the client certificate (URI SAN, else DNS SAN, else CN),
    /// parsed on demand.
    pub fn cert_principal(&self) -> Option<String> {
        crate::authz::cert::principal_from_der(self.peer.cert.as_deref()?)
    }
}
