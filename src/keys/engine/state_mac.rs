//! The system key `arca:state-mac` (DESIGN §2b, ADR 12): an HMAC-SHA256 token key,
//! sensitive and never extractable, that authenticates every database row that grants,
//! limits or records authority. Like `arca:audit-mac` it has a fixed, well-known `CKA_ID`
//! so every node finds it, and it is made the first time a MAC is asked of an HSM that
//! lacks it.
//!
//! Invariant: the key never leaves the HSM; only MACs do. A MAC is compared in constant
//! time.

use arca_hsm::{HsmError, KeyKind, ObjectId};

use super::{hsm_err, KeyEngine};
use crate::keys::KeysError;

/// `CKA_ID` of `arca:state-mac`: "arca:state:v1" padded with zeros to 16 bytes.
pub const STATE_MAC_KEY_ID: ObjectId = ObjectId(*b"arca:state:v1\0\0\0");
/// `CKA_LABEL` of `arca:state-mac`.
pub const STATE_MAC_KEY_LABEL: &str = "arca:state-mac";

impl KeyEngine {
    /// HMAC-SHA256 of a canonical row encoding under `arca:state-mac` (one HSM call; the
    /// key is made first if the token lacks it).
    pub async fn state_mac(&self, data: Vec<u8>) -> Result<[u8; 32], KeysError> {
        self.run(move |hsm| {
            let mac = match hsm.hmac_sha256(&STATE_MAC_KEY_ID, &data) {
                Err(HsmError::ObjectNotFound) => {
                    match hsm.generate_key(
                        KeyKind::HmacSha256,
                        &STATE_MAC_KEY_ID,
                        STATE_MAC_KEY_LABEL,
                    ) {
                        Ok(()) | Err(HsmError::ObjectExists) => {}
                        Err(e) => return Err(hsm_err(e)),
                    }
                    hsm.hmac_sha256(&STATE_MAC_KEY_ID, &data)
                }
                other => other,
            }
            .map_err(hsm_err)?;
            Ok(*mac)
        })
        .await
    }

    /// Whether `mac` is the MAC of `data` under `arca:state-mac` (constant-time compare).
    pub async fn verify_state_mac(&self, data: Vec<u8>, mac: &[u8]) -> Result<bool, KeysError> {
        let want = self.state_mac(data).await?;
        Ok(crate::secret::ct_eq(&want, mac))
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
    async fn made_on_first_use_non_extractable_and_deterministic() {
        let hsm = Arc::new(FakeHsm::new());
        let e = KeyEngine::start(hsm.clone(), &EngineConfig::default()).unwrap();
        let a = e.state_mac(b"row".to_vec()).await.unwrap();
        let attrs = hsm.key_attributes(&STATE_MAC_KEY_ID).unwrap();
        assert!(attrs.sensitive && !attrs.extractable);
        assert_eq!(attrs.label, STATE_MAC_KEY_LABEL);
        assert_eq!(a, e.state_mac(b"row".to_vec()).await.unwrap());
        assert!(e.verify_state_mac(b"row".to_vec(), &a).await.unwrap());
        assert!(!e.verify_state_mac(b"rox".to_vec(), &a).await.unwrap());
        assert!(!e.verify_state_mac(b"row".to_vec(), &a[..31]).await.unwrap());
    }
}
