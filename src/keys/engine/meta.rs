//! The system key `arca:meta` (DESIGN §1): an AES-256 token key, sensitive and never
//! extractable, that encrypts sensitive rows at rest — today the custodians' shares of
//! pending approval requests. It has a fixed, well-known `CKA_ID` so that every node
//! finds it, and is made the first time a service unseals without it.
//!
//! Sealed form: `0x01` | IV (12, from the HSM's RNG) | ciphertext ‖ tag (16), AES-256-GCM
//! inside the HSM, with the caller's AAD (which binds the value to its row).
//!
//! Invariant: an opened value is returned only zeroizing; any failure to authenticate is
//! the single [`KeysError::InvalidWrappedKey`].

use arca_hsm::{HsmError, KeyKind, ObjectId, GCM_IV_LEN, GCM_TAG_LEN};
use zeroize::Zeroizing;

use super::{hsm_err, KeyEngine};
use crate::keys::KeysError;

/// `CKA_ID` of `arca:meta`: "arca:meta:v1" padded with zeros to 16 bytes.
pub const META_KEY_ID: ObjectId = ObjectId(*b"arca:meta:v1\0\0\0\0");
/// `CKA_LABEL` of `arca:meta`.
pub const META_KEY_LABEL: &str = "arca:meta";

/// Format byte of a sealed value.
const SEALED_V1: u8 = 0x01;

impl KeyEngine {
    /// Makes `arca:meta` if the token does not hold it. Returns whether it was made.
    pub async fn ensure_meta_key(&self) -> Result<bool, KeysError> {
        self.run(|hsm| {
            if hsm.key_exists(&META_KEY_ID).map_err(hsm_err)? {
                return Ok(false);
            }
            match hsm.generate_key(KeyKind::Aes256, &META_KEY_ID, META_KEY_LABEL) {
                Ok(()) => Ok(true),
                // Another node made it first.
                Err(HsmError::ObjectExists) => Ok(false),
                Err(e) => Err(hsm_err(e)),
            }
        })
        .await
    }

    /// Encrypts `plaintext` under `arca:meta` with `aad`.
    pub async fn seal_meta(
        &self,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Vec<u8>, KeysError> {
        self.run(move |hsm| {
            let mut iv = [0u8; GCM_IV_LEN];
            hsm.generate_random(&mut iv).map_err(hsm_err)?;
            let ct = hsm
                .encrypt_aes_gcm(&META_KEY_ID, &iv, &aad, &plaintext)
                .map_err(hsm_err)?;
            let mut out = Vec::with_capacity(1 + GCM_IV_LEN + ct.len());
            out.push(SEALED_V1);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&ct);
            Ok(out)
        })
        .await
    }

    /// Decrypts a value sealed by [`KeyEngine::seal_meta`] with the same `aad`.
    pub async fn open_meta(
        &self,
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KeysError> {
        if sealed.len() < 1 + GCM_IV_LEN + GCM_TAG_LEN || sealed[0] != SEALED_V1 {
            return Err(KeysError::InvalidWrappedKey);
        }
        self.run(move |hsm| {
            let mut iv = [0u8; GCM_IV_LEN];
            iv.copy_from_slice(&sealed[1..=GCM_IV_LEN]);
            match hsm.decrypt_aes_gcm(&META_KEY_ID, &iv, &aad, &sealed[1 + GCM_IV_LEN..]) {
                Ok(pt) => Ok(pt),
                Err(HsmError::AuthenticationFailed) => Err(KeysError::InvalidWrappedKey),
                Err(e) => Err(hsm_err(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use arca_hsm::fake::FakeHsm;
    use arca_hsm::Hsm;

    use super::*;
    use crate::keys::EngineConfig;

    #[tokio::test]
    async fn made_once_and_seals_with_aad() {
        let hsm = Arc::new(FakeHsm::new());
        let e = KeyEngine::start(hsm.clone(), &EngineConfig::default()).unwrap();
        assert!(e.ensure_meta_key().await.unwrap());
        assert!(!e.ensure_meta_key().await.unwrap());
        let attrs = hsm.key_attributes(&META_KEY_ID).unwrap();
        assert!(attrs.sensitive && !attrs.extractable);
        assert_eq!(attrs.label, META_KEY_LABEL);

        let secret = Zeroizing::new(b"a share of 33 bytes, give or take".to_vec());
        let sealed = e
            .seal_meta(b"row-1".to_vec(), secret.clone())
            .await
            .unwrap();
        assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_slice()));
        let back = e
            .open_meta(b"row-1".to_vec(), sealed.clone())
            .await
            .unwrap();
        assert_eq!(back.as_slice(), secret.as_slice());
        // Another row's AAD, a flipped bit, a truncation: one error.
        assert!(matches!(
            e.open_meta(b"row-2".to_vec(), sealed.clone()).await,
            Err(KeysError::InvalidWrappedKey)
        ));
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(matches!(
            e.open_meta(b"row-1".to_vec(), bad).await,
            Err(KeysError::InvalidWrappedKey)
        ));
        assert!(matches!(
            e.open_meta(b"row-1".to_vec(), sealed[..20].to_vec()).await,
            Err(KeysError::InvalidWrappedKey)
        ));
        // Fresh IVs: sealing twice differs.
        let again = e.seal_meta(b"row-1".to_vec(), secret).await.unwrap();
        assert_ne!(again, sealed);
    }
}
