//! The system key `arca:audit-mac` (DESIGN §1, §6): an HMAC-SHA256 token key, sensitive
//! and never extractable, that seals the audit chain. Like `arca:meta` it has a fixed,
//! well-known `CKA_ID` so every node finds it, and is made the first time an unsealed
//! service lacks it.
//!
//! Invariant: the key never leaves the HSM; only MACs do.

use arca_hsm::{HsmError, KeyKind, ObjectId};

use super::{hsm_err, KeyEngine};
use crate::keys::KeysError;

/// `CKA_ID` of `arca:audit-mac`: "arca:audit:v1" padded with zeros to 16 bytes.
pub const AUDIT_MAC_KEY_ID: ObjectId = ObjectId(*b"arca:audit:v1\0\0\0");
/// `CKA_LABEL` of `arca:audit-mac`.
pub const AUDIT_MAC_KEY_LABEL: &str = "arca:audit-mac";

impl KeyEngine {
    /// Makes `arca:audit-mac` if the token does not hold it. Returns whether it was made.
    pub async fn ensure_audit_mac_key(&self) -> Result<bool, KeysError> {
        self.run(|hsm| {
            if hsm.key_exists(&AUDIT_MAC_KEY_ID).map_err(hsm_err)? {
                return Ok(false);
            }
            match hsm.generate_key(KeyKind::HmacSha256, &AUDIT_MAC_KEY_ID, AUDIT_MAC_KEY_LABEL) {
                Ok(()) => Ok(true),
                Err(HsmError::ObjectExists) => Ok(false),
                Err(e) => Err(hsm_err(e)),
            }
        })
        .await
    }

    /// HMAC-SHA256 of `data` under `arca:audit-mac` (one HSM call).
    pub async fn audit_mac(
        &self,
        data: Vec<u8>,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, KeysError> {
        self.run(move |hsm| hsm.hmac_sha256(&AUDIT_MAC_KEY_ID, &data).map_err(hsm_err))
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
    async fn made_once_non_extractable_and_deterministic() {
        let hsm = Arc::new(FakeHsm::new());
        let e = KeyEngine::start(hsm.clone(), &EngineConfig::default()).unwrap();
        assert!(e.ensure_audit_mac_key().await.unwrap());
        assert!(!e.ensure_audit_mac_key().await.unwrap());
        let attrs = hsm.key_attributes(&AUDIT_MAC_KEY_ID).unwrap();
        assert!(attrs.sensitive && !attrs.extractable);
        assert_eq!(attrs.label, AUDIT_MAC_KEY_LABEL);
        let a = e.audit_mac(b"head".to_vec()).await.unwrap();
        assert_eq!(a, e.audit_mac(b"head".to_vec()).await.unwrap());
        assert_ne!(a, e.audit_mac(b"heae".to_vec()).await.unwrap());
    }
}
