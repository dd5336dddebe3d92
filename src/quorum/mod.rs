//! Dual control: the quorum secret, its Shamir shares, custodian commitments, the
//! sealed HSM PIN, and TOTP for custodians.
//!
//! A 256-bit quorum secret S is split K-of-N (Shamir over GF(256), [`shamir`]). Arca
//! stores only: the HSM user PIN encrypted under `HKDF(S, "pin")`, a verifier
//! `HKDF(S, "verify")`, and per custodian a commitment `SHA-256(domain ‖ name ‖ share)`.
//! Each share is checked against its custodian's commitment on arrival; the rebuilt S is
//! checked against the verifier before use; S is zeroized as soon as it has been used.
//!
//! A custodian's TOTP secret is stored encrypted under a key derived from that
//! custodian's own share, so it can be checked while the service is sealed (the HSM is
//! locked then) and a stolen database reveals no second factor.
//!
//! Quorum operations ([`approvals`], [`policy`]): the operations `policies/quorum.toml`
//! lists wait for K custodians to approve a request's digest; the K shares rebuild S,
//! which is checked against the verifier into a [`approvals::QuorumApproved`] proof.
//!
//! Invariants:
//! - The Shamir library is never given duplicate x-coordinates or fewer shares than the
//!   threshold (it would return a wrong secret without error); [`shamir::combine`] refuses
//!   both itself.
//! - Secrets, shares and the PIN live in zeroizing types with no `Debug`.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

pub mod age;
pub mod approvals;
pub mod crypto;
pub mod policy;
pub mod shamir;
pub mod totp;

/// Errors of the quorum layer. Messages name what was wrong, never a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuorumError {
    /// Bad K/N or custodian list.
    #[error("{0}")]
    InvalidParameters(&'static str),
    /// A share that does not parse or does not match its custodian's commitment.
    #[error("share rejected: it does not belong to this custodian")]
    ShareRejected,
    /// The same custodian (or share) twice.
    #[error("duplicate share")]
    DuplicateShare,
    /// Fewer shares than the threshold.
    #[error("not enough shares")]
    NotEnoughShares,
    /// The rebuilt secret does not match the verifier.
    #[error("the shares do not rebuild the quorum secret")]
    VerifierMismatch,
    /// Decryption of a sealed value failed (wrong key or tampering).
    #[error("sealed value failed authentication")]
    SealedValueCorrupt,
    /// A TOTP code that is wrong, reused or malformed.
    #[error("TOTP code rejected")]
    TotpRejected,
    /// The randomness source failed.
    #[error("no randomness available")]
    Rng,
}
