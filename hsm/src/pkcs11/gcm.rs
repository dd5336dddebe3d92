//! AES-256-GCM encryption and decryption inside the HSM (`C_Encrypt` / `C_Decrypt` with
//! `CKM_AES_GCM`), one-shot, with a 96-bit IV and a 128-bit tag appended to the ciphertext.
//!
//! # Invariants
//! - The key is used through [`Usage::Gcm`]: its session copy when `session_key_copies`
//!   is on, the token object otherwise (see `handles.rs`).
//! - cryptoki's `GcmParams` takes the tag length in bits: always [`GCM_TAG_LEN`] * 8.
//! - A decryption that fails authentication is [`HsmError::AuthenticationFailed`], never
//!   an outage (`decrypting = true` in the error classification, see `error.rs`).
//! - Decrypted data is returned in [`Zeroizing`] memory.
//!
//! Must not import anything from the rest of Arca.

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::types::Ulong;
use zeroize::Zeroizing;

use super::device::Pkcs11Hsm;
use super::handles::Usage;
use crate::{HsmError, ObjectId, Result, GCM_IV_LEN, GCM_TAG_LEN};

/// [`crate::Hsm::encrypt_aes_gcm`].
pub(super) fn encrypt(
    hsm: &Pkcs11Hsm,
    id: &ObjectId,
    iv: &[u8; GCM_IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let out = hsm.with_key(id, Usage::Gcm, "C_Encrypt", false, |session, key| {
        let mut iv = *iv;
        let params = GcmParams::new(&mut iv, aad, gcm_tag_bits())?;
        session.encrypt(&Mechanism::AesGcm(params), key, plaintext)
    })?;
    if out.len() != plaintext.len() + GCM_TAG_LEN {
        return Err(HsmError::Pkcs11 {
            function: "C_Encrypt",
            detail: format!(
                "unexpected output length {} for {} bytes of plaintext",
                out.len(),
                plaintext.len()
            ),
        });
    }
    Ok(out)
}

/// [`crate::Hsm::decrypt_aes_gcm`].
pub(super) fn decrypt(
    hsm: &Pkcs11Hsm,
    id: &ObjectId,
    iv: &[u8; GCM_IV_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    hsm.with_key(id, Usage::Gcm, "C_Decrypt", true, |session, key| {
        let mut iv = *iv;
        let params = GcmParams::new(&mut iv, aad, gcm_tag_bits())?;
        session
            .decrypt(&Mechanism::AesGcm(params), key, ciphertext_and_tag)
            .map(Zeroizing::new)
    })
}

fn gcm_tag_bits() -> Ulong {
    // cryptoki's GcmParams takes the tag length in bits.
    Ulong::new((GCM_TAG_LEN * 8) as _)
}
