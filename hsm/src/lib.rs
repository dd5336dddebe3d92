//! # arca-hsm — Arca's boundary with the hardware security module
//!
//! This crate owns everything Arca knows about PKCS#11. It is the only crate in the
//! workspace that links `cryptoki`; everything above it speaks the [`Hsm`] trait.
//!
//! ## Invariants
//! - Key material of key-encryption keys never leaves the HSM: [`Hsm::generate_key`]
//!   creates token objects with `CKA_SENSITIVE = true`, `CKA_EXTRACTABLE = false`, and the
//!   trait has no operation that returns key material.
//! - Objects are addressed by their `CKA_ID` ([`ObjectId`]), never by a PKCS#11 handle:
//!   handles are an implementation detail that dies with a session or a reconnect.
//! - Every method is blocking (the PKCS#11 implementation calls into C). Async callers
//!   run it on a dedicated thread, never on an async executor thread.
//! - Errors say which PKCS#11 function failed and never carry PINs or data.
//! - An unreachable HSM yields [`HsmError::Unavailable`] quickly; there is never a
//!   software fallback.
//!
//! ## Modules
//! - [`pkcs11`]: the cryptoki implementation, with a session pool and reconnection; one
//!   file per PKCS#11 function family (see its docs for the map).
//! - [`softhsm`]: SoftHSM2 configuration template and token initialisation (dev mode,
//!   tests), and setting the user PIN as the security officer on any token.
//! - `fake` (feature `fake`): an in-memory implementation for unit tests of upper layers.
//!
//! Depends on no other crate of the workspace; `cryptoki` types never appear in its
//! public API (PINs are [`AuthPin`], a `secrecy` type).

#![forbid(unsafe_code)]

use std::fmt;

use zeroize::Zeroizing;

#[cfg(feature = "fake")]
pub mod fake;
pub mod pkcs11;
pub mod softhsm;

/// A PIN (token user or SO PIN): a `SecretString` that prints `[REDACTED]`, zeroizes on
/// drop, and is exposed only at the `C_Login` / `C_InitToken` / `C_InitPIN` call. Build
/// one with `AuthPin::from(String)`. (The same type as `cryptoki::types::AuthPin`.)
pub type AuthPin = secrecy::SecretString;

/// Length of an AES-GCM IV, in bytes (96 bits, NIST SP 800-38D).
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag Arca uses, in bytes (128 bits).
pub const GCM_TAG_LEN: usize = 16;

/// The `CKA_ID` of a key object: 16 bytes chosen by the caller, unique per object.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub [u8; 16]);

impl ObjectId {
    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What kind of secret key object to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// AES-256, `CKA_ENCRYPT` and `CKA_DECRYPT` (key versions, `arca:meta`).
    Aes256,
    /// Generic secret of 32 bytes for HMAC-SHA256, `CKA_SIGN` and `CKA_VERIFY` (`arca:audit-mac`).
    HmacSha256,
}

/// Attributes of a key object as the HSM reports them (read back through PKCS#11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAttributes {
    /// `CKA_TOKEN`: a persistent object.
    pub token: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
    /// `CKA_LABEL`, as UTF-8 (lossy).
    pub label: String,
}

/// Errors of the HSM layer. None of them carries a PIN, key material or data.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The HSM, the token or the session went away (device removed, session handle
    /// invalid, module unreachable), or a reconnect is pending. Retryable: the
    /// implementation reconnects by itself.
    #[error("HSM unavailable ({function}: {detail})")]
    Unavailable {
        /// The PKCS#11 function (or step) that failed.
        function: &'static str,
        /// What went wrong, e.g. the CKR_ name.
        detail: String,
    },
    /// No object with that `CKA_ID` exists on the token.
    #[error("HSM object not found")]
    ObjectNotFound,
    /// An object with that `CKA_ID` already exists.
    #[error("HSM object already exists")]
    ObjectExists,
    /// Decryption failed authentication (GCM tag mismatch or malformed ciphertext).
    #[error("HSM decryption failed authentication")]
    AuthenticationFailed,
    /// No token with the configured label is present.
    #[error("no token labelled {label:?}")]
    TokenNotFound {
        /// The label looked for.
        label: String,
    },
    /// The token refused the PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, ...).
    #[error("HSM login refused ({detail})")]
    LoginRefused {
        /// The CKR_ name.
        detail: String,
    },
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("loading PKCS#11 module {path}: {detail}")]
    Module {
        /// Module path.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The caller passed something the HSM layer refuses (wrong length, ...).
    #[error("invalid HSM request: {0}")]
    InvalidInput(&'static str),
    /// Any other PKCS#11 failure, with the function that failed and its return value.
    #[error("PKCS#11 {function} failed: {detail}")]
    Pkcs11 {
        /// The PKCS#11 function that failed, e.g. `C_Encrypt`.
        function: &'static str,
        /// The CKR_ name or other detail.
        detail: String,
    },
}

impl HsmError {
    /// True when the error means the HSM is (temporarily) unreachable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, HsmError::Unavailable { .. })
    }
}

/// Result alias of this crate.
pub type Result<T, E = HsmError> = std::result::Result<T, E>;

/// The operations Arca needs from an HSM.
///
/// Implementations are shared between threads (`Send + Sync`) and handle their own
/// session management; every method blocks the calling thread until the HSM answers.
/// Objects are always addressed by [`ObjectId`] (`CKA_ID`).
pub trait Hsm: Send + Sync + 'static {
    /// Generates a persistent secret key object (`CKA_TOKEN = true`, `CKA_PRIVATE = true`,
    /// `CKA_SENSITIVE = true`, `CKA_EXTRACTABLE = false`) with the given `CKA_ID` and label.
    /// Fails with [`HsmError::ObjectExists`] if an object with that id exists.
    fn generate_key(&self, kind: KeyKind, id: &ObjectId, label: &str) -> Result<()>;

    /// Whether a key object with that `CKA_ID` exists on the token.
    fn key_exists(&self, id: &ObjectId) -> Result<bool>;

    /// AES-256-GCM encryption with a 128-bit tag. Returns ciphertext || tag.
    fn encrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>>;

    /// AES-256-GCM decryption of ciphertext || tag. A tag mismatch (or any malformed
    /// input the HSM rejects as data) is [`HsmError::AuthenticationFailed`].
    fn decrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>>;

    /// HMAC-SHA256 of `data` under a [`KeyKind::HmacSha256`] key. Zeroized on drop: an
    /// HMAC under a secret key can itself be a key (derived keys are made this way).
    fn hmac_sha256(&self, id: &ObjectId, data: &[u8]) -> Result<Zeroizing<[u8; 32]>>;

    /// Fills `out` from the HSM's random number generator.
    fn generate_random(&self, out: &mut [u8]) -> Result<()>;

    /// Destroys the key object with that `CKA_ID` (`C_DestroyObject`), and every
    /// session copy or cached handle of it this process holds. Returns `false` if no such
    /// object existed (destruction is idempotent).
    fn destroy_key(&self, id: &ObjectId) -> Result<bool>;

    /// Drops every cached handle and session copy of that object held by this process,
    /// without touching the token object (another node destroyed it, or it changed).
    /// `Ok` only when the HSM confirmed it: every session's copy destroyed and no session
    /// object with that `CKA_ID` left. An error means copies may survive: the caller
    /// retries, or tears the sessions down with [`Hsm::reset_sessions`].
    fn forget_key(&self, id: &ObjectId) -> Result<()>;

    /// Tears down every session this process holds on the HSM (so no session object, copy
    /// or handle survives: they go with `C_Finalize`), then tries to reconnect with fresh
    /// sessions, as after an outage. `Ok` once the old sessions can no longer be used by
    /// any call (the reconnect itself may still be pending: calls then fail with
    /// [`HsmError::Unavailable`] until it succeeds).
    fn reset_sessions(&self) -> Result<()>;

    /// Reads back the security-relevant attributes of the token object.
    fn key_attributes(&self, id: &ObjectId) -> Result<KeyAttributes>;

    /// Liveness probe: succeeds when the token answers. When the HSM was unavailable,
    /// this is also where the implementation tries to reconnect (rate-limited).
    fn check(&self) -> Result<()>;
}
