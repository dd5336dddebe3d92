//! Random bytes from the HSM's generator (`C_GenerateRandom`).
//!
//! # Invariants
//! - There is no software fallback: an unreachable HSM is [`crate::HsmError::Unavailable`].
//! - An empty buffer asks nothing of the HSM (and takes no session).
//!
//! Must not import anything from the rest of Arca.

use super::device::Pkcs11Hsm;
use crate::Result;

/// [`crate::Hsm::generate_random`].
pub(super) fn generate_random(hsm: &Pkcs11Hsm, out: &mut [u8]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let mut guard = hsm.pool.checkout()?;
    let s = guard.get()?;
    s.session
        .generate_random_slice(out)
        .map_err(|e| hsm.pool.fail(s, e, "C_GenerateRandom", false))
}
