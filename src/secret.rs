//! Secret types. Every value here is zeroized on drop and has no `Debug`, `Display`,
//! `Clone` or `Serialize`: a secret can only be read through an explicit accessor, at the
//! point where it is used.
//!
//! Invariant: no function in Arca logs, formats, audits or returns in an error a value of
//! these types. Comparisons of key material or token hashes are constant-time.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The operating system's CSPRNG failed (no entropy source).
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RngError;

/// Fills a zeroizing buffer from the operating system's CSPRNG: the crate's one source of
/// random bytes outside the HSM (ids, token secrets, PINs, quorum secrets, nonces).
pub fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, RngError> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::fill(out.as_mut()).map_err(|_| RngError)?;
    Ok(out)
}

/// Length of a data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// Key material in plaintext: a data key from the HSM's RNG, or caller-supplied key
/// material to wrap (16 to 64 bytes), or an unwrapped key.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes ownership of the bytes; they are wiped when the value is dropped.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Plaintext(bytes)
    }

    /// Copies `bytes` into a zeroizing buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Plaintext(Zeroizing::new(bytes.to_vec()))
    }

    /// The key material. Call only where it is used or returned to its owner.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Consumes the value, handing the zeroizing buffer to the caller.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Plaintext([REDACTED])")
    }
}

/// A bearer token as presented by a client (`arca_…`). Never stored: only its SHA-256.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// Prefix of every Arca token.
    pub const PREFIX: &'static str = "arca_";

    /// Wraps a presented token.
    pub fn new(token: String) -> Self {
        BearerToken(Zeroizing::new(token))
    }

    /// Mints a fresh token from 32 random bytes: `arca_` + 64 hex digits.
    pub fn from_random(bytes: &[u8; 32]) -> Self {
        let mut s = String::with_capacity(Self::PREFIX.len() + 64);
        s.push_str(Self::PREFIX);
        s.push_str(&hex::encode(bytes));
        BearerToken(Zeroizing::new(s))
    }

    /// The token text, to hand to its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token text: what the store keeps.
    pub fn hash(&self) -> TokenHash {
        use sha2::Digest;
        TokenHash(sha2::Sha256::digest(self.0.as_bytes()).into())
    }
}

/// SHA-256 of a bearer token. Not secret by itself, but compared in constant time.
#[derive(Clone, Copy)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hex form, as stored.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for TokenHash {}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A prefix is enough to tell tokens apart in a debugger, and reveals nothing usable.
        write!(f, "TokenHash({}…)", &hex::encode(&self.0[..4]))
    }
}

/// The 256-bit quorum secret S. Exists only while it is being split or used, then is
/// zeroized.
pub struct QuorumSecret(Zeroizing<[u8; 32]>);

impl QuorumSecret {
    /// From 32 bytes (the copy is zeroized by the caller's buffer type).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(QuorumSecret(Zeroizing::new(arr)))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &QuorumSecret) -> bool {
        ct_eq(self.0.as_ref(), other.0.as_ref())
    }
}

/// One custodian's Shamir share: x-coordinate (1 byte) then 32 y bytes.
pub struct Share(Zeroizing<Vec<u8>>);

impl Share {
    /// Takes ownership of the bytes.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Share(bytes)
    }

    /// The share bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The x-coordinate (custodian index, 1-based).
    pub fn x(&self) -> Option<u8> {
        self.0.first().copied()
    }
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_material() {
        let p = Plaintext::from_slice(b"super secret key material!!!!!!!");
        assert_eq!(format!("{p:?}"), "Plaintext([REDACTED])");
        let t = BearerToken::from_random(&[7u8; 32]);
        let h = t.hash();
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn token_format_and_hash() {
        let t = BearerToken::from_random(&[0xab; 32]);
        assert!(t.expose().starts_with("arca_"));
        assert_eq!(t.expose().len(), 5 + 64);
        assert_eq!(t.hash(), BearerToken::new(t.expose().to_string()).hash());
        assert_ne!(t.hash(), BearerToken::from_random(&[0xac; 32]).hash());
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
