//! Key derivation and sealing around the quorum secret (software AES-256-GCM and
//! HKDF-SHA256; the HSM is locked while these run).
//!
//! - verifier `= HKDF(S, info "arca verify v1")`, compared in constant time;
//! - PIN key `= HKDF(S, info "arca pin v1")`; sealed PIN `= nonce ‖ AES-GCM(key, PIN)`
//!   with AAD `"arca:pin:v1"`;
//! - commitment `= SHA-256("arca share commitment v1" ‖ len(name) ‖ name ‖ share)`;
//! - TOTP key of a custodian `= HKDF(share, salt name, info "arca totp v1")`;
//! - state key `= HKDF(S, info "arca state v1")`: the init ceremony's MAC over the rows
//!   it writes while the HSM is locked (custodian tokens, the caller's token), checked
//!   and replaced by HSM MACs at unseal (ADR 12).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit as MacKeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::QuorumError;
use crate::secret::{ct_eq, QuorumSecret, Share};

const SALT: &[u8] = b"arca quorum v1";

fn derive(ikm: &[u8], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF's limit (255 × 32), so expand cannot fail.
    let _ = hk.expand(info, out.as_mut());
    out
}

/// Random bytes for the quorum's own use (secrets, nonces); an RNG failure is
/// [`QuorumError::Rng`].
pub(super) fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, QuorumError> {
    crate::secret::random::<N>().map_err(|_| QuorumError::Rng)
}

/// A fresh quorum secret.
pub fn new_secret() -> Result<QuorumSecret, QuorumError> {
    let r = random::<32>()?;
    QuorumSecret::from_slice(r.as_ref()).ok_or(QuorumError::Rng)
}

/// The verifier stored for S.
pub fn verifier(s: &QuorumSecret) -> [u8; 32] {
    *derive(s.expose(), SALT, b"arca verify v1")
}

/// Checks a rebuilt S against the stored verifier.
pub fn check_verifier(s: &QuorumSecret, stored: &[u8]) -> Result<(), QuorumError> {
    if ct_eq(&verifier(s), stored) {
        Ok(())
    } else {
        Err(QuorumError::VerifierMismatch)
    }
}

/// HMAC-SHA256 of `data` under the state key of S (hex), for rows written while the HSM
/// is locked.
pub fn state_mac(s: &QuorumSecret, data: &[u8]) -> String {
    let key = derive(s.expose(), SALT, b"arca state v1");
    match <Hmac<Sha256> as MacKeyInit>::new_from_slice(key.as_ref()) {
        Ok(mut m) => {
            m.update(data);
            hex::encode(m.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is unreachable, and an empty MAC
        // verifies nothing.
        Err(_) => String::new(),
    }
}

/// Whether `mac` (hex) is [`state_mac`] of `data` (constant-time compare).
pub fn check_state_mac(s: &QuorumSecret, data: &[u8], mac: &str) -> bool {
    let want = state_mac(s, data);
    !want.is_empty() && ct_eq(want.as_bytes(), mac.as_bytes())
}

/// The commitment binding a share to its custodian.
pub fn commitment(custodian: &str, share: &Share) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"arca share commitment v1");
    h.update((custodian.len() as u32).to_be_bytes());
    h.update(custodian.as_bytes());
    h.update(share.expose());
    h.finalize().into()
}

/// Checks a presented share against the custodian's stored commitment.
pub fn check_commitment(custodian: &str, share: &Share, stored: &[u8]) -> Result<(), QuorumError> {
    if ct_eq(&commitment(custodian, share), stored) {
        Ok(())
    } else {
        Err(QuorumError::ShareRejected)
    }
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, QuorumError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| QuorumError::SealedValueCorrupt)?;
    let nonce = random::<12>()?;
    let ct = cipher
        .encrypt(
            Nonce::from_slice(nonce.as_ref()),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| QuorumError::SealedValueCorrupt)?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(nonce.as_ref());
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, QuorumError> {
    if sealed.len() < 12 + 16 {
        return Err(QuorumError::SealedValueCorrupt);
    }
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| QuorumError::SealedValueCorrupt)?;
    cipher
        .decrypt(
            Nonce::from_slice(&sealed[..12]),
            Payload {
                msg: &sealed[12..],
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| QuorumError::SealedValueCorrupt)
}

/// Seals the HSM PIN under S.
pub fn seal_pin(s: &QuorumSecret, pin: &[u8]) -> Result<Vec<u8>, QuorumError> {
    seal(
        &derive(s.expose(), SALT, b"arca pin v1"),
        b"arca:pin:v1",
        pin,
    )
}

/// Opens the sealed HSM PIN with S.
pub fn open_pin(s: &QuorumSecret, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, QuorumError> {
    open(
        &derive(s.expose(), SALT, b"arca pin v1"),
        b"arca:pin:v1",
        sealed,
    )
}

/// Seals a custodian's TOTP secret under a key derived from that custodian's share.
pub fn seal_totp(custodian: &str, share: &Share, secret: &[u8]) -> Result<Vec<u8>, QuorumError> {
    let key = derive(share.expose(), custodian.as_bytes(), b"arca totp v1");
    seal(&key, custodian.as_bytes(), secret)
}

/// Opens a custodian's TOTP secret with that custodian's share.
pub fn open_totp(
    custodian: &str,
    share: &Share,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, QuorumError> {
    let key = derive(share.expose(), custodian.as_bytes(), b"arca totp v1");
    open(&key, custodian.as_bytes(), sealed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quorum::shamir;

    #[test]
    fn pin_seals_under_s_only() {
        let s = new_secret().unwrap();
        let sealed = seal_pin(&s, b"123456").unwrap();
        assert_eq!(open_pin(&s, &sealed).unwrap().as_slice(), b"123456");
        let other = new_secret().unwrap();
        assert_eq!(
            open_pin(&other, &sealed).err(),
            Some(QuorumError::SealedValueCorrupt)
        );
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(open_pin(&s, &bad).is_err());
        assert!(open_pin(&s, &sealed[..10]).is_err());
    }

    #[test]
    fn verifier_and_commitments() {
        let s = new_secret().unwrap();
        let v = verifier(&s);
        assert!(check_verifier(&s, &v).is_ok());
        assert!(check_verifier(&new_secret().unwrap(), &v).is_err());
        let shares = shamir::split(&s, 2, 3).unwrap();
        let c = commitment("alice", &shares[0]);
        assert!(check_commitment("alice", &shares[0], &c).is_ok());
        // Another custodian's share, or the same share under another name, fails.
        assert!(check_commitment("alice", &shares[1], &c).is_err());
        assert!(check_commitment("bob", &shares[0], &c).is_err());
    }

    #[test]
    fn totp_secret_needs_the_custodians_share() {
        let s = new_secret().unwrap();
        let shares = shamir::split(&s, 2, 3).unwrap();
        let sealed = seal_totp("alice", &shares[0], b"totp-secret-20-bytes").unwrap();
        assert_eq!(
            open_totp("alice", &shares[0], &sealed).unwrap().as_slice(),
            b"totp-secret-20-bytes"
        );
        assert!(open_totp("alice", &shares[1], &sealed).is_err());
        assert!(open_totp("bob", &shares[0], &sealed).is_err());
    }
}
