//! Wrapped-key format v1 (DESIGN §1):
//!
//! ```text
//! 0x01 | key id (16, UUID) | key version (u32 BE) | IV (12) | ciphertext || tag (16)
//! ```
//!
//! The header (format, key id, version) followed by the canonical encryption context is
//! the GCM AAD, so a blob cannot be moved to another key, version or context. Parsing
//! refuses anything malformed with the single [`KeysError::InvalidWrappedKey`].

use arca_hsm::{GCM_IV_LEN, GCM_TAG_LEN};

use super::{KeyId, KeysError};

/// The format byte of v1.
pub const WRAPPED_V1: u8 = 0x01;
/// Format + key id + version: the part of the blob that is AAD.
pub const WRAPPED_HEADER_LEN: usize = 1 + 16 + 4;
/// Shortest and longest wrapped plaintexts (16..=64 bytes of key material).
const MIN_PLAINTEXT: usize = 16;
const MAX_PLAINTEXT: usize = 64;

/// A parsed wrapped key. Holds no secret: the ciphertext is only readable by the HSM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// The key that wrapped it.
    pub key_id: KeyId,
    /// The version that wrapped it.
    pub version: u32,
    /// GCM IV.
    pub iv: [u8; GCM_IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl WrappedKey {
    /// The header bytes (format, key id, version) that start the AAD.
    pub fn header(key_id: &KeyId, version: u32) -> [u8; WRAPPED_HEADER_LEN] {
        let mut h = [0u8; WRAPPED_HEADER_LEN];
        h[0] = WRAPPED_V1;
        h[1..17].copy_from_slice(&key_id.0);
        h[17..21].copy_from_slice(&version.to_be_bytes());
        h
    }

    /// The AAD for a wrap under `key_id`/`version` with this canonical context.
    pub fn aad(key_id: &KeyId, version: u32, canonical_context: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(WRAPPED_HEADER_LEN + canonical_context.len());
        aad.extend_from_slice(&Self::header(key_id, version));
        aad.extend_from_slice(canonical_context);
        aad
    }

    /// Serialises to the v1 byte format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WRAPPED_HEADER_LEN + GCM_IV_LEN + self.ciphertext.len());
        out.extend_from_slice(&Self::header(&self.key_id, self.version));
        out.extend_from_slice(&self.iv);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses the v1 byte format. Every malformation is the same error.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeysError> {
        let min = WRAPPED_HEADER_LEN + GCM_IV_LEN + MIN_PLAINTEXT + GCM_TAG_LEN;
        let max = WRAPPED_HEADER_LEN + GCM_IV_LEN + MAX_PLAINTEXT + GCM_TAG_LEN;
        if bytes.len() < min || bytes.len() > max || bytes[0] != WRAPPED_V1 {
            return Err(KeysError::InvalidWrappedKey);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[1..17]);
        let mut v = [0u8; 4];
        v.copy_from_slice(&bytes[17..21]);
        let version = u32::from_be_bytes(v);
        if version == 0 {
            return Err(KeysError::InvalidWrappedKey);
        }
        let mut iv = [0u8; GCM_IV_LEN];
        iv.copy_from_slice(&bytes[21..21 + GCM_IV_LEN]);
        Ok(WrappedKey {
            key_id: KeyId(id),
            version,
            iv,
            ciphertext: bytes[21 + GCM_IV_LEN..].to_vec(),
        })
    }
}

/// Checks the length of key material to wrap.
pub(crate) fn check_plaintext_len(len: usize) -> Result<(), KeysError> {
    if (MIN_PLAINTEXT..=MAX_PLAINTEXT).contains(&len) {
        Ok(())
    } else {
        Err(KeysError::InvalidPlaintextLength)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WrappedKey {
        WrappedKey {
            key_id: KeyId([9; 16]),
            version: 7,
            iv: [3; 12],
            ciphertext: vec![5; 48],
        }
    }

    #[test]
    fn roundtrip_and_layout() {
        let w = sample();
        let b = w.encode();
        assert_eq!(b.len(), 1 + 16 + 4 + 12 + 48);
        assert_eq!(b[0], 1);
        assert_eq!(&b[17..21], &[0, 0, 0, 7]);
        assert!(WrappedKey::parse(&b).is_ok_and(|p| p == w));
    }

    #[test]
    fn rejects_malformed() {
        let b = sample().encode();
        for n in 0..b.len() {
            if n < 21 + 12 + 32 {
                assert!(WrappedKey::parse(&b[..n]).is_err(), "truncated to {n}");
            }
        }
        let mut bad = b.clone();
        bad[0] = 2;
        assert!(WrappedKey::parse(&bad).is_err());
        let mut zero = b.clone();
        zero[17..21].copy_from_slice(&[0; 4]);
        assert!(WrappedKey::parse(&zero).is_err());
        let mut long = b;
        long.extend_from_slice(&[0; 64]);
        assert!(WrappedKey::parse(&long).is_err());
    }

    #[test]
    fn aad_binds_header_and_context() {
        let id = KeyId([1; 16]);
        let a = WrappedKey::aad(&id, 1, b"ctx");
        assert_eq!(&a[..21], &WrappedKey::header(&id, 1));
        assert_eq!(&a[21..], b"ctx");
        assert_ne!(a, WrappedKey::aad(&id, 2, b"ctx"));
    }
}
