//! [`Pkcs11Hsm`], the handle every PKCS#11 function family works through: the session pool
//! and the configuration the families need. The families (`handles`, `objects`, `gcm`,
//! `mac`, `random`) take it; `mod.rs` builds it and implements the [`crate::Hsm`] trait
//! over them, so no family reaches up into `mod.rs`.
//!
//! Must not import anything from the rest of Arca.

use std::fmt;

use super::pool::SessionPool;

/// An [`Hsm`] on a PKCS#11 token, with a session pool and automatic reconnection.
///
/// Only one `Pkcs11Hsm` per module may be live in a process at a time (see the module
/// docs). For SoftHSM, `SOFTHSM2_CONF` must be set in the environment before
/// [`Pkcs11Hsm::open`] (SoftHSM reads it in `C_Initialize`).
pub struct Pkcs11Hsm {
    /// The sessions, the module context and the reconnect machinery; dropping it
    /// finalizes the module.
    pub(super) pool: SessionPool,
    /// `session_key_copies` of the configuration.
    pub(super) copies: bool,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.pool.module())
            .field("token_label", &self.pool.label())
            .field("sessions", &self.pool.sessions())
            .field("session_key_copies", &self.copies)
            .finish_non_exhaustive()
    }
}
