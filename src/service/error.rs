//! [`ServiceError`], the one error of the service layer, and the typed reasons it carries.
//!
//! Every variant is a distinct class for the caller (`grpc::status` maps each to one gRPC
//! code, in one place). Where one code covers several outcomes a caller must tell apart
//! (which state blocked a change, why a custodian's submission was refused, why MFA
//! failed), the variant holds an enum, never a string to match: [`Conflict`],
//! [`Rejection`], [`MfaRefusal`]. Each has a stable [`reason`](ServiceError::reason) that
//! goes on the wire beside the code, and a fixed message that says what went wrong
//! without revealing internals.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::audit::AuditError;
use crate::authz::AuthError;
use crate::keys::state::Unverified;
use crate::keys::{KeysError, VersionState};
use crate::quorum::approvals::RequestState;
use crate::quorum::QuorumError;
use crate::store::StoreError;

/// Result alias of this layer.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Errors of the service layer.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No or bad credentials.
    #[error("unauthenticated")]
    Unauthenticated,
    /// The caller may not do this (or see this key).
    #[error("permission denied")]
    PermissionDenied,
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// A wrapped key that does not parse, names no known key or version, or fails
    /// authentication.
    #[error("invalid wrapped key or encryption context")]
    InvalidWrappedKey,
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// The name is taken (forever).
    #[error("{0}")]
    AlreadyExists(&'static str),
    /// The state found forbids the change.
    #[error("{0}")]
    Conflict(Conflict),
    /// A precondition of the policy in force is not met.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// The service is sealed: custodians must unseal it.
    #[error("sealed")]
    Sealed,
    /// A dependency (HSM, database) is unreachable.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The audit record of the call could not be made durable: the call fails closed.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// A custodian's submission refused: the custodian needs to know why.
    #[error("{0}")]
    Rejected(Rejection),
    /// The caller is over its rate limit; retry after this long.
    #[error("rate limit exceeded")]
    RateLimited(std::time::Duration),
    /// A race lost (e.g. concurrent rotations); retry.
    #[error("{0}")]
    Aborted(&'static str),
    /// A role that needs MFA without a valid TOTP code: the person must act on why.
    #[error("{0}")]
    Mfa(MfaRefusal),
    /// A policy that does not load; the message names the file, role or value at fault.
    #[error("{0}")]
    InvalidPolicy(#[source] crate::authz::policy::PolicyError),
    /// A stored row the decision depends on is not authenticated by the HSM (forged, or
    /// not re-stamped yet): refused, alerted and audited (ADR 12).
    #[error("{0}")]
    StateForged(Unverified),
    /// A bug or misconfiguration; details go to the log only.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ServiceError {
    /// A bug, with what went wrong for the log.
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ServiceError::Internal(e.into())
    }

    /// The stable machine-readable reason of a typed refusal (`x-arca-reason` on the
    /// wire), if the variant has one.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            ServiceError::Conflict(c) => Some(c.reason()),
            ServiceError::Rejected(r) => Some(r.reason()),
            ServiceError::Mfa(m) => Some(m.reason()),
            ServiceError::Sealed => Some("SEALED"),
            ServiceError::StateForged(u) => Some(u.reason()),
            _ => None,
        }
    }
}

/// What state blocked a change (`FAILED_PRECONDITION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The version is `DESTROYED`.
    VersionDestroyed,
    /// The version is `DISABLED` (unwrap refused).
    VersionDisabled,
    /// The version is `SCHEDULED_FOR_DESTRUCTION`.
    VersionScheduled,
    /// The version is not `SCHEDULED_FOR_DESTRUCTION` (nothing to cancel).
    VersionNotScheduled,
    /// No version of the key is scheduled for destruction.
    NothingScheduled,
    /// The destroyer has started on the version: no cancelling.
    DestructionStarted,
    /// The version's state does not lead to the one asked for.
    IllegalTransition,
    /// The primary version is not `ENABLED`: nothing wraps.
    PrimaryNotEnabled,
    /// The primary cannot be retired while another version is enabled.
    PrimaryInUse,
    /// Every version of the key is retired: it is not rotated back to life.
    KeyRetired,
    /// Every version of the key is already retired.
    AllRetired,
    /// The key has `u32::MAX` versions.
    TooManyVersions,
    /// The approval request is in this state (decided, expired, or waiting to run).
    Request(RequestState),
    /// The custodians changed (a rekey) since the request was made.
    QuorumChanged,
    /// The stored request's operation or parameters no longer match its digest (what the
    /// custodians were shown): it was changed in the database, and is failed.
    RequestAltered,
    /// Dual control was not initialised.
    NotInitialised,
    /// Dual control was initialised already.
    AlreadyInitialised,
    /// The HSM is open: seal the service first.
    HsmOpen,
    /// The service is unsealed already.
    AlreadyUnsealed,
    /// The token was revoked already.
    TokenRevoked,
    /// The review was closed already.
    ReviewClosed,
    /// A share stored for the request failed authentication under `arca:meta`.
    StoredShareCorrupt,
    /// The stored shares do not rebuild the quorum secret.
    QuorumMismatch,
    /// The sealed HSM PIN does not open with the rebuilt secret.
    SealedPinCorrupt,
}

impl Conflict {
    /// The conflict of a version found in `state`, when another state was needed.
    pub fn of_version(state: VersionState) -> Self {
        match state {
            VersionState::Destroyed => Conflict::VersionDestroyed,
            VersionState::Disabled => Conflict::VersionDisabled,
            VersionState::ScheduledForDestruction => Conflict::VersionScheduled,
            VersionState::Enabled => Conflict::IllegalTransition,
        }
    }

    /// The stable reason (`x-arca-reason`).
    pub fn reason(self) -> &'static str {
        match self {
            Conflict::VersionDestroyed => "VERSION_DESTROYED",
            Conflict::VersionDisabled => "VERSION_DISABLED",
            Conflict::VersionScheduled => "VERSION_SCHEDULED_FOR_DESTRUCTION",
            Conflict::VersionNotScheduled => "VERSION_NOT_SCHEDULED",
            Conflict::NothingScheduled => "NOTHING_SCHEDULED",
            Conflict::DestructionStarted => "DESTRUCTION_STARTED",
            Conflict::IllegalTransition => "ILLEGAL_TRANSITION",
            Conflict::PrimaryNotEnabled => "PRIMARY_NOT_ENABLED",
            Conflict::PrimaryInUse => "PRIMARY_IN_USE",
            Conflict::KeyRetired => "KEY_RETIRED",
            Conflict::AllRetired => "ALL_RETIRED",
            Conflict::TooManyVersions => "TOO_MANY_VERSIONS",
            Conflict::Request(RequestState::Pending) => "REQUEST_WAITING_TO_RUN",
            Conflict::Request(RequestState::Executed) => "REQUEST_EXECUTED",
            Conflict::Request(RequestState::Rejected) => "REQUEST_REJECTED",
            Conflict::Request(RequestState::Expired) => "REQUEST_EXPIRED",
            Conflict::Request(RequestState::Failed) => "REQUEST_FAILED",
            Conflict::QuorumChanged => "QUORUM_CHANGED",
            Conflict::RequestAltered => "REQUEST_ALTERED",
            Conflict::NotInitialised => "NOT_INITIALISED",
            Conflict::AlreadyInitialised => "ALREADY_INITIALISED",
            Conflict::HsmOpen => "HSM_OPEN",
            Conflict::AlreadyUnsealed => "ALREADY_UNSEALED",
            Conflict::TokenRevoked => "TOKEN_REVOKED",
            Conflict::ReviewClosed => "REVIEW_CLOSED",
            Conflict::StoredShareCorrupt => "STORED_SHARE_CORRUPT",
            Conflict::QuorumMismatch => "QUORUM_MISMATCH",
            Conflict::SealedPinCorrupt => "SEALED_PIN_CORRUPT",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Conflict::VersionDestroyed => "key version destroyed",
            Conflict::VersionDisabled => "key version is disabled",
            Conflict::VersionScheduled => "key version is scheduled for destruction",
            Conflict::VersionNotScheduled => "key version is not scheduled for destruction",
            Conflict::NothingScheduled => "no version of this key is scheduled for destruction",
            Conflict::DestructionStarted => {
                "destruction has already started; it cannot be cancelled"
            }
            Conflict::IllegalTransition => "illegal key version state transition",
            Conflict::PrimaryNotEnabled => "primary key version is not enabled",
            Conflict::PrimaryInUse => {
                "the primary version cannot be retired while other versions are enabled: \
                 rotate the key first, or retire the whole key"
            }
            Conflict::KeyRetired => "every version of this key is retired; it cannot be rotated",
            Conflict::AllRetired => "every version of this key is already retired",
            Conflict::TooManyVersions => "key has too many versions",
            Conflict::Request(RequestState::Pending) => {
                "the request has all its approvals and is waiting to run"
            }
            Conflict::Request(RequestState::Executed) => "the request was executed already",
            Conflict::Request(RequestState::Rejected) => "the request was rejected",
            Conflict::Request(RequestState::Expired) => "the request has expired",
            Conflict::Request(RequestState::Failed) => "the request failed",
            Conflict::QuorumChanged => "the custodians changed since this request was made",
            Conflict::RequestAltered => {
                "the stored request does not match its digest; it was altered and is failed"
            }
            Conflict::NotInitialised => "dual control is not initialised",
            Conflict::AlreadyInitialised => "already initialised",
            Conflict::HsmOpen => "the HSM is open; seal the service before initialising",
            Conflict::AlreadyUnsealed => "already unsealed",
            Conflict::TokenRevoked => "token already revoked",
            Conflict::ReviewClosed => "review already closed",
            Conflict::StoredShareCorrupt => "a stored share failed authentication",
            Conflict::QuorumMismatch => "the approvals' shares do not rebuild the quorum secret",
            Conflict::SealedPinCorrupt => "the sealed HSM PIN does not open with the quorum secret",
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Why a custodian's submission (a share, a TOTP code, an approval), or a review's close,
/// was refused (`PERMISSION_DENIED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The share does not match this custodian's commitment.
    ShareRejected,
    /// The custodian already submitted a share to this unseal.
    DuplicateShare,
    /// The shares do not rebuild the quorum secret (unseal progress is cleared).
    VerifierMismatch,
    /// The TOTP code is wrong or was used already.
    TotpRejected,
    /// Locked out after repeated failures.
    LockedOut,
    /// The HSM refused the security officer's PIN.
    SoPinRefused,
    /// The requester cannot approve their own request.
    Requester,
    /// This custodian approved this request already.
    AlreadyApproved,
    /// Only custodians approve requests.
    NotCustodian,
    /// Nobody closes the review of their own break-glass (through any of their
    /// principals).
    OwnReview,
}

impl Rejection {
    /// The stable reason (`x-arca-reason`).
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::ShareRejected => "SHARE_REJECTED",
            Rejection::DuplicateShare => "DUPLICATE_SHARE",
            Rejection::VerifierMismatch => "VERIFIER_MISMATCH",
            Rejection::TotpRejected => "TOTP_REJECTED",
            Rejection::LockedOut => "LOCKED_OUT",
            Rejection::SoPinRefused => "SO_PIN_REFUSED",
            Rejection::Requester => "REQUESTER_CANNOT_APPROVE",
            Rejection::AlreadyApproved => "ALREADY_APPROVED",
            Rejection::NotCustodian => "NOT_CUSTODIAN",
            Rejection::OwnReview => "OWN_REVIEW",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rejection::ShareRejected => "share rejected: it does not belong to this custodian",
            Rejection::DuplicateShare => "this custodian has already submitted a share",
            Rejection::VerifierMismatch => {
                "the shares do not rebuild the quorum secret; progress cleared"
            }
            Rejection::TotpRejected => "TOTP code rejected",
            Rejection::LockedOut => "custodian locked out after repeated failures; try later",
            Rejection::SoPinRefused => "the SO PIN was refused",
            Rejection::Requester => "the requester cannot approve their own request",
            Rejection::AlreadyApproved => {
                "this custodian (or another identity of the same person) has already approved \
                 this request"
            }
            Rejection::NotCustodian => "only custodians approve requests",
            Rejection::OwnReview => "nobody closes the review of their own break-glass",
        })
    }
}

/// Why a role that needs MFA was refused (`UNAUTHENTICATED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfaRefusal {
    /// The principal has no TOTP enrolment.
    NotEnrolled,
    /// No code in `x-arca-totp`.
    Missing,
    /// The code is wrong or was used already.
    Rejected,
    /// Locked out after repeated failures.
    LockedOut,
}

impl MfaRefusal {
    /// The stable reason (`x-arca-reason`).
    pub fn reason(self) -> &'static str {
        match self {
            MfaRefusal::NotEnrolled => "MFA_NOT_ENROLLED",
            MfaRefusal::Missing => "MFA_CODE_MISSING",
            MfaRefusal::Rejected => "MFA_CODE_REJECTED",
            MfaRefusal::LockedOut => "MFA_LOCKED_OUT",
        }
    }
}

impl std::fmt::Display for MfaRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MfaRefusal::NotEnrolled => "this role needs MFA: enrol with EnrollTotp first",
            MfaRefusal::Missing => "this role needs a TOTP code in x-arca-totp",
            MfaRefusal::Rejected => "TOTP code rejected",
            MfaRefusal::LockedOut => "locked out after repeated MFA failures; try later",
        })
    }
}

impl From<KeysError> for ServiceError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::InvalidWrappedKey => ServiceError::InvalidWrappedKey,
            KeysError::InvalidKeyName => ServiceError::InvalidArgument("invalid key name"),
            KeysError::InvalidContext(_) => {
                ServiceError::InvalidArgument("invalid encryption context")
            }
            KeysError::InvalidPlaintextLength => {
                ServiceError::InvalidArgument("plaintext must be 16 to 64 bytes")
            }
            KeysError::HsmUnavailable(_) => ServiceError::Unavailable("HSM unavailable"),
            KeysError::HsmObjectMissing => ServiceError::Conflict(Conflict::VersionDestroyed),
            KeysError::LoginRefused => {
                ServiceError::Unavailable("the HSM refused the login; the node stays sealed")
            }
            e => ServiceError::Internal(Box::new(e)),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ServiceError::NotFound("key not found"),
            StoreError::AlreadyExists => ServiceError::AlreadyExists("key name already used"),
            StoreError::Conflict(_) => ServiceError::Conflict(Conflict::IllegalTransition),
            StoreError::Unavailable(_) => ServiceError::Unavailable("database unavailable"),
            e => ServiceError::Internal(Box::new(e)),
        }
    }
}

impl From<AuthError> for ServiceError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => ServiceError::Unauthenticated,
            AuthError::Store(e) => e.into(),
            AuthError::Forged { why, .. } => ServiceError::StateForged(why),
            AuthError::Check(e) => e.into(),
        }
    }
}

impl From<AuditError> for ServiceError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Unavailable => ServiceError::AuditUnavailable,
            AuditError::Hsm => ServiceError::Unavailable("HSM unavailable"),
            AuditError::Store(s) => s.into(),
            e => ServiceError::Internal(Box::new(e)),
        }
    }
}

impl From<QuorumError> for ServiceError {
    fn from(e: QuorumError) -> Self {
        match e {
            QuorumError::InvalidParameters(m) => ServiceError::InvalidArgument(m),
            QuorumError::ShareRejected => ServiceError::Rejected(Rejection::ShareRejected),
            QuorumError::DuplicateShare => ServiceError::Rejected(Rejection::DuplicateShare),
            QuorumError::NotEnoughShares => ServiceError::FailedPrecondition("not enough shares"),
            QuorumError::VerifierMismatch => ServiceError::Rejected(Rejection::VerifierMismatch),
            QuorumError::TotpRejected => ServiceError::Rejected(Rejection::TotpRejected),
            e @ (QuorumError::SealedValueCorrupt | QuorumError::Rng) => {
                ServiceError::Internal(Box::new(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_typed_refusal_has_a_distinct_reason() {
        let mut seen = std::collections::HashSet::new();
        let conflicts = [
            Conflict::VersionDestroyed,
            Conflict::VersionDisabled,
            Conflict::VersionScheduled,
            Conflict::VersionNotScheduled,
            Conflict::NothingScheduled,
            Conflict::DestructionStarted,
            Conflict::IllegalTransition,
            Conflict::PrimaryNotEnabled,
            Conflict::PrimaryInUse,
            Conflict::KeyRetired,
            Conflict::AllRetired,
            Conflict::TooManyVersions,
            Conflict::Request(RequestState::Pending),
            Conflict::Request(RequestState::Executed),
            Conflict::Request(RequestState::Rejected),
            Conflict::Request(RequestState::Expired),
            Conflict::Request(RequestState::Failed),
            Conflict::QuorumChanged,
            Conflict::RequestAltered,
            Conflict::NotInitialised,
            Conflict::AlreadyInitialised,
            Conflict::HsmOpen,
            Conflict::AlreadyUnsealed,
            Conflict::TokenRevoked,
            Conflict::ReviewClosed,
            Conflict::StoredShareCorrupt,
            Conflict::QuorumMismatch,
            Conflict::SealedPinCorrupt,
        ];
        let rejections = [
            Rejection::ShareRejected,
            Rejection::DuplicateShare,
            Rejection::VerifierMismatch,
            Rejection::TotpRejected,
            Rejection::LockedOut,
            Rejection::SoPinRefused,
            Rejection::Requester,
            Rejection::AlreadyApproved,
            Rejection::NotCustodian,
        ];
        let mfa = [
            MfaRefusal::NotEnrolled,
            MfaRefusal::Missing,
            MfaRefusal::Rejected,
            MfaRefusal::LockedOut,
        ];
        seen.insert("SEALED");
        let reasons = conflicts
            .iter()
            .map(|c| c.reason())
            .chain(rejections.iter().map(|r| r.reason()))
            .chain(mfa.iter().map(|m| m.reason()));
        for r in reasons {
            assert!(seen.insert(r), "reason {r} used twice");
            assert!(
                r.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{r}"
            );
        }
    }
}
