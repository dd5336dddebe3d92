//! # The audit trail (DESIGN §6)
//!
//! One record per RPC (allowed, denied or failed) and per background action, appended to
//! a hash chain in the store, sealed per batch by the HSM, with its details encrypted.
//!
//! - [`record`]: the record, its details, and the gRPC result codes by name.
//! - [`chain`]: the canonical encoding of a stored row, the chain
//!   `h_n = SHA-256(h_{n-1} || canonical(row_n))`, the seal input `h_last || seq_last`, and
//!   the encryption of details (AES-256-GCM under a data key sealed by `arca:meta`).
//! - [`writer`]: [`AuditLog`], the group-commit writer (one transaction per batch, and at
//!   most one HSM seal per batch, computed beside the commits), and the keyed digest of
//!   encryption contexts for records.
//! - [`checkpoint`]: the second sink, sealed heads appended to a JSON-lines file.
//! - [`verify`]: walks the chain, the seals, the head and the checkpoint file, and names
//!   the first bad sequence number.
//! - [`alerts`]: rules from `policies/alerts.toml`, evaluated on committed records.
//!
//! Invariants:
//! - A record never holds key material, plaintext, tokens, shares, PINs or context values:
//!   the context is kept only as an HMAC digest under a key derived in the HSM.
//! - A waiter is told "durable" only after the transaction holding its record committed.
//! - The chain covers exactly what is stored (the encrypted body), so verification needs
//!   no key; the seals need the HSM.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

pub mod alerts;
pub mod chain;
pub mod checkpoint;
pub mod record;
pub mod verify;
pub mod writer;

pub use record::{code_name, code_of_name, Details, Kind, PendingRecord, Record};
pub use writer::{AuditConfig, AuditLog};

use crate::store::StoreError;

/// Errors of the audit layer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The record could not be made durable in time (store failing, queue full, writer
    /// gone): the request it belongs to must fail closed.
    #[error("audit log unavailable")]
    Unavailable,
    /// The HSM refused or could not be reached (sealed, down).
    #[error("HSM unavailable for the audit log")]
    Hsm,
    /// A stored value could not be read back (bad body, unknown data key).
    #[error("audit record unreadable: {0}")]
    Corrupt(&'static str),
    /// The store failed.
    #[error("audit store error")]
    Store(#[from] StoreError),
    /// The alert rules could not be read.
    #[error("alert rules: {0}")]
    Policy(String),
    /// The checkpoint file could not be read.
    #[error("checkpoint file: {0}")]
    Checkpoints(#[source] std::io::Error),
}

/// The HSM operations the audit trail needs, implemented over the key engine by the
/// service (which owns the seal state).
#[async_trait::async_trait]
pub trait AuditKeys: Send + Sync + 'static {
    /// Whether the HSM is open (unsealed).
    fn is_open(&self) -> bool;
    /// Makes `arca:audit-mac` if missing.
    async fn ensure(&self) -> Result<(), AuditError>;
    /// HMAC-SHA256 under `arca:audit-mac` (zeroized on drop: derived keys are made so).
    async fn mac(&self, data: Vec<u8>) -> Result<zeroize::Zeroizing<[u8; 32]>, AuditError>;
    /// 32 random bytes from the HSM's RNG.
    async fn random32(&self) -> Result<zeroize::Zeroizing<[u8; 32]>, AuditError>;
    /// Encrypts under `arca:meta` with `aad`.
    async fn seal_meta(
        &self,
        aad: Vec<u8>,
        plaintext: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<Vec<u8>, AuditError>;
    /// Decrypts a value sealed by [`AuditKeys::seal_meta`].
    async fn open_meta(
        &self,
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, AuditError>;
}

#[cfg(test)]
pub(crate) mod tests;
