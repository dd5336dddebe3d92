//! The PKCS#11 implementation of [`Hsm`], on `cryptoki`.
//!
//! Owns: the public face of the implementation ([`Pkcs11Config`], [`Pkcs11Hsm`] and its
//! [`Hsm`] impl, which hands each operation to the file of its PKCS#11 function family).
//! Nothing outside this module sees a `cryptoki` type. The files, lowest first:
//!
//! | file | owns |
//! |---|---|
//! | `error.rs` | which `CKR_` codes mean an outage, a failed authentication or an ambiguous answer; naming failures |
//! | `connect.rs` | loading the module, `C_Initialize`, the token by label, opening sessions, `C_Login` |
//! | `session.rs` | one pooled session and its object-handle cache |
//! | `pool.rs` | the session pool: checkout, exclusive sections, outage detection, reconnection |
//! | `handles.rs` | finding key objects by `CKA_ID`, cached handles, session copies of AES keys |
//! | `objects.rs` | generating, inspecting, destroying and forgetting key objects |
//! | `gcm.rs`, `mac.rs`, `random.rs` | AES-256-GCM, HMAC-SHA256, `C_GenerateRandom` |
//!
//! # Invariants
//! - **One live [`Pkcs11Hsm`] per module per process.** `C_Initialize` is process-global
//!   for a given module: a second `Pkcs11Hsm` (or a [`crate::softhsm`] helper) on the same
//!   module while one is live fails with [`HsmError::Module`] ("already initialised"), and
//!   dropping a `Pkcs11Hsm` calls `C_Finalize`, which would pull the rug from under any
//!   other user of the module in this process.
//! - Every call blocks its thread inside the module: async callers run it on a dedicated
//!   thread, never on an executor thread.
//! - Each session has exactly one owner at a time (checked out of the pool, used by one
//!   thread, handed back); object handles never outlive their session or a reconnect;
//!   objects are addressed by `CKA_ID` only. The details are in each file's docs.
//! - Errors name the PKCS#11 function that failed. The PIN is kept in a `SecretString`,
//!   exposed only at `C_Login`, and appears in no error, log line or `Debug` output.
//! - `Drop` never panics: failures are logged with `tracing`.
//!
//! Must not import anything from the rest of Arca (this crate has no dependency on it).

mod connect;
mod device;
mod error;
mod gcm;
mod handles;
mod mac;
mod objects;
mod pool;
mod random;
mod session;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

/// The PIN type, also reachable here for callers that configure [`Pkcs11Config`].
pub use crate::AuthPin;
use crate::{Hsm, HsmError, KeyAttributes, KeyKind, ObjectId, Result, GCM_IV_LEN};
pub(crate) use connect::{find_slot, initialize, login};
pub use device::Pkcs11Hsm;
pub(crate) use error::plain_error;
use pool::SessionPool;
pub use pool::{DRAIN_WAIT, SESSION_WAIT};

/// Configuration of [`Pkcs11Hsm`]. `Debug` redacts the PIN; no `Clone` (the PIN would
/// be copied), build one per `open`.
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, `p11-kit-client.so`, a vendor's).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token (the token is always selected by label, never by slot).
    pub token_label: String,
    /// The user PIN (`C_Login` as `CKU_USER`).
    pub pin: AuthPin,
    /// Number of pooled sessions, at least 1. On SoftHSM more than one thread costs
    /// throughput (its internal locks); a network HSM gains from several.
    pub sessions: usize,
    /// Use session copies (`CKA_TOKEN = false`) of AES keys for GCM (about 2x faster on
    /// SoftHSM, which re-reads token key files on every operation).
    pub session_key_copies: bool,
    /// Minimum time between two reconnect attempts while the HSM is down.
    pub reconnect_interval: Duration,
}

impl Pkcs11Config {
    /// A configuration with one session, session copies on, and a one-second reconnect
    /// interval.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: AuthPin) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            sessions: 1,
            session_key_copies: true,
            reconnect_interval: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"[REDACTED]")
            .field("sessions", &self.sessions)
            .field("session_key_copies", &self.session_key_copies)
            .field("reconnect_interval", &self.reconnect_interval)
            .finish()
    }
}

impl Pkcs11Hsm {
    /// Loads the module, `C_Initialize`s it (OS locking), finds the token by label, opens
    /// `cfg.sessions` read-write sessions and logs in as the user once.
    ///
    /// Fails with [`HsmError::Module`] (module cannot be loaded or initialised, or is
    /// already initialised in this process), [`HsmError::TokenNotFound`],
    /// [`HsmError::LoginRefused`], or [`HsmError::InvalidInput`] (`sessions == 0`).
    pub fn open(cfg: Pkcs11Config) -> Result<Self> {
        if cfg.sessions == 0 {
            return Err(HsmError::InvalidInput("sessions must be at least 1"));
        }
        let pool = SessionPool::open(
            cfg.module,
            cfg.token_label,
            cfg.pin,
            cfg.sessions,
            cfg.reconnect_interval,
        )?;
        tracing::info!(
            module = %pool.module().display(),
            token = %pool.label(),
            sessions = pool.sessions(),
            session_key_copies = cfg.session_key_copies,
            "PKCS#11 token opened"
        );
        Ok(Pkcs11Hsm {
            pool,
            copies: cfg.session_key_copies,
        })
    }

    /// Number of successful connects so far (1 after `open`, +1 per reconnect).
    pub fn generation(&self) -> u64 {
        self.pool.generation()
    }

    /// Whether the HSM is currently considered unavailable (a reconnect is pending).
    pub fn is_down(&self) -> bool {
        self.pool.is_down()
    }

    /// Diagnostic: how many session objects (copies) with this `CKA_ID` this process can
    /// see on the token. Session objects are visible to every session of the application,
    /// so one session suffices. After [`Hsm::destroy_key`] or [`Hsm::forget_key`] this is 0.
    pub fn session_copy_count(&self, id: &ObjectId) -> Result<usize> {
        objects::session_copy_count(self, id)
    }
}

impl Hsm for Pkcs11Hsm {
    fn generate_key(&self, kind: KeyKind, id: &ObjectId, label: &str) -> Result<()> {
        objects::generate_key(self, kind, id, label)
    }

    fn key_exists(&self, id: &ObjectId) -> Result<bool> {
        objects::key_exists(self, id)
    }

    fn encrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        gcm::encrypt(self, id, iv, aad, plaintext)
    }

    fn decrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        gcm::decrypt(self, id, iv, aad, ciphertext_and_tag)
    }

    fn hmac_sha256(&self, id: &ObjectId, data: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        mac::hmac_sha256(self, id, data)
    }

    fn generate_random(&self, out: &mut [u8]) -> Result<()> {
        random::generate_random(self, out)
    }

    fn destroy_key(&self, id: &ObjectId) -> Result<bool> {
        objects::destroy_key(self, id)
    }

    fn forget_key(&self, id: &ObjectId) -> Result<()> {
        objects::forget_key(self, id)
    }

    fn reset_sessions(&self) -> Result<()> {
        self.pool.tear_down()
    }

    fn key_attributes(&self, id: &ObjectId) -> Result<KeyAttributes> {
        objects::key_attributes(self, id)
    }

    fn check(&self) -> Result<()> {
        self.pool.check()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_redacts_pin() {
        let cfg = Pkcs11Config::new("/x.so", "t", AuthPin::from("1234-secret"));
        let s = format!("{cfg:?}");
        assert!(!s.contains("1234-secret"), "{s}");
        assert!(s.contains("REDACTED"));
    }
}
