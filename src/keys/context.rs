//! The encryption context: a string map bound to a wrapped key as AAD (as in AWS KMS).
//!
//! Canonical form: entries sorted by key (byte order), each as u32-BE length + UTF-8 key,
//! u32-BE length + UTF-8 value. Context values are never logged.

use std::collections::BTreeMap;

use super::KeysError;

/// At most this many entries.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
/// At most this many bytes in the canonical form.
pub const MAX_CONTEXT_BYTES: usize = 8 * 1024;

/// An encryption context, kept sorted.
pub type EncryptionContext = BTreeMap<String, String>;

/// The canonical encoding of a context, refusing one over the limits.
pub fn canonical_context(ctx: &EncryptionContext) -> Result<Vec<u8>, KeysError> {
    if ctx.len() > MAX_CONTEXT_ENTRIES {
        return Err(KeysError::InvalidContext("too many entries"));
    }
    let size: usize = ctx.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    if size > MAX_CONTEXT_BYTES {
        return Err(KeysError::InvalidContext("too large"));
    }
    let mut out = Vec::with_capacity(size);
    // BTreeMap<String, _> iterates in byte order of the keys.
    for (k, v) in ctx {
        if k.is_empty() {
            return Err(KeysError::InvalidContext("empty key"));
        }
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    Ok(out)
}

/// A validated encryption context with its canonical form, computed once per call: the
/// map for policy conditions, the bytes for the AAD and the audit digest. No `Debug` of
/// the values (a context may name a patient).
pub struct CanonicalContext {
    map: EncryptionContext,
    bytes: Vec<u8>,
}

impl CanonicalContext {
    /// Validates and canonicalises `map`.
    pub fn new(map: EncryptionContext) -> Result<Self, KeysError> {
        let bytes = canonical_context(&map)?;
        Ok(CanonicalContext { map, bytes })
    }

    /// The entries.
    pub fn map(&self) -> &EncryptionContext {
        &self.map
    }

    /// The canonical encoding.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for CanonicalContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CanonicalContext({} entries)", self.map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_is_sorted_and_length_prefixed() {
        let mut c = EncryptionContext::new();
        c.insert("b".into(), "2".into());
        c.insert("a".into(), "xy".into());
        let enc = canonical_context(&c).unwrap_or_default();
        assert_eq!(
            enc,
            [
                &[0, 0, 0, 1][..],
                b"a",
                &[0, 0, 0, 2],
                b"xy",
                &[0, 0, 0, 1],
                b"b",
                &[0, 0, 0, 1],
                b"2"
            ]
            .concat()
        );
        assert!(canonical_context(&EncryptionContext::new()).is_ok_and(|v| v.is_empty()));
    }

    #[test]
    fn no_ambiguity_between_splits() {
        let mut a = EncryptionContext::new();
        a.insert("ab".into(), "c".into());
        let mut b = EncryptionContext::new();
        b.insert("a".into(), "bc".into());
        assert_ne!(canonical_context(&a).ok(), canonical_context(&b).ok());
    }

    #[test]
    fn limits() {
        let mut c = EncryptionContext::new();
        for i in 0..=MAX_CONTEXT_ENTRIES {
            c.insert(format!("k{i}"), String::new());
        }
        assert!(canonical_context(&c).is_err());
        let mut c = EncryptionContext::new();
        c.insert("k".into(), "v".repeat(MAX_CONTEXT_BYTES));
        assert!(canonical_context(&c).is_err());
        let mut c = EncryptionContext::new();
        c.insert(String::new(), "v".into());
        assert!(canonical_context(&c).is_err());
    }
}
