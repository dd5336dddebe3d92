//! HMAC-SHA256 inside the HSM (`C_Sign` with `CKM_SHA256_HMAC`), under a
//! [`crate::KeyKind::HmacSha256`] key: the audit chain's MAC, and the derivation of keys
//! that are HMACs of a secret key.
//!
//! # Invariants
//! - The token object is used, never a session copy ([`Usage::Token`]).
//! - The MAC is returned in [`Zeroizing`] memory (it may itself be a key), and so is the
//!   intermediate buffer cryptoki returns.
//! - A MAC that is not 32 bytes is an error, never truncated or padded.
//!
//! Must not import anything from the rest of Arca.

use cryptoki::mechanism::Mechanism;
use zeroize::Zeroizing;

use super::device::Pkcs11Hsm;
use super::handles::Usage;
use crate::{HsmError, ObjectId, Result};

/// [`crate::Hsm::hmac_sha256`].
pub(super) fn hmac_sha256(
    hsm: &Pkcs11Hsm,
    id: &ObjectId,
    data: &[u8],
) -> Result<Zeroizing<[u8; 32]>> {
    let mac = Zeroizing::new(
        hsm.with_key(id, Usage::Token, "C_Sign", false, |session, key| {
            session.sign(&Mechanism::Sha256Hmac, key, data)
        })?,
    );
    if mac.len() != 32 {
        return Err(HsmError::Pkcs11 {
            function: "C_Sign",
            detail: format!("HMAC-SHA256 of {} bytes", mac.len()),
        });
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac);
    Ok(out)
}
