//! The small part of the age v1 format (age-encryption.org/v1) Arca needs: encryption
//! of a custodian's share to one X25519 recipient (`age1…`), ASCII-armored. Nothing
//! here decrypts; custodians use the `age` tool (`age -d -i KEY`).
//!
//! - file key: 16 random bytes;
//! - stanza `-> X25519 b64(E)`, body `ChaCha20-Poly1305(HKDF(ikm X25519(e, R),
//!   salt E ‖ R, info "age-encryption.org/v1/X25519"), zero nonce, file key)`;
//! - header MAC `= HMAC-SHA256(HKDF(file key, no salt, "header"), header up to "---")`;
//! - payload: 16-byte nonce, then STREAM with key `HKDF(file key, nonce, "payload")`,
//!   64 KiB chunks, nonce `= 11-byte big-endian counter ‖ last-chunk flag`.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::crypto::random;
use super::QuorumError;

const X25519_LABEL: &[u8] = b"age-encryption.org/v1/X25519";
const CHUNK: usize = 64 * 1024;
const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";
const ARMOR_END: &str = "-----END AGE ENCRYPTED FILE-----";
const BAD_RECIPIENT: QuorumError = QuorumError::InvalidParameters("invalid age recipient");

/// Parses an `age1…` X25519 recipient (Bech32, HRP `age`) into its public key.
pub fn parse_recipient(s: &str) -> Result<[u8; 32], QuorumError> {
    // age encodes recipients lower case; Bech32 also allows all upper case.
    let (hrp, data) = bech32::decode(s.trim()).map_err(|_| BAD_RECIPIENT)?;
    if !hrp.as_str().eq_ignore_ascii_case("age") {
        return Err(BAD_RECIPIENT);
    }
    let key: [u8; 32] = data.as_slice().try_into().map_err(|_| BAD_RECIPIENT)?;
    // The all-zero point (and other low-order points) would give an all-zero shared
    // secret; refuse it here rather than at encryption time.
    if key == [0u8; 32] {
        return Err(BAD_RECIPIENT);
    }
    Ok(key)
}

fn hkdf32(ikm: &[u8], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF's limit (255 × 32), so expand cannot fail.
    let _ = hk.expand(info, out.as_mut());
    out
}

fn seal(key: &[u8; 32], nonce: &[u8; 12], plaintext: &[u8]) -> Result<Vec<u8>, QuorumError> {
    ChaCha20Poly1305::new(Key::from_slice(key))
        .encrypt(Nonce::from_slice(nonce), plaintext)
        .map_err(|_| QuorumError::InvalidParameters("age encryption failed"))
}

/// Base64 (standard, unpadded) wrapped at 64 columns, as age writes stanza bodies: the
/// last line is always shorter than 64 (empty if the body is a multiple of 48 bytes).
fn wrap_body(body: &[u8]) -> String {
    let b64 = STANDARD_NO_PAD.encode(body);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 1);
    let mut rest = b64.as_str();
    loop {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
        if line.len() < 64 {
            return out;
        }
    }
}

/// Encrypts `plaintext` to one X25519 recipient and returns an ASCII-armored age file.
pub fn encrypt_armored(recipient: &[u8; 32], plaintext: &[u8]) -> Result<String, QuorumError> {
    let file_key = random::<16>()?;

    // X25519 recipient stanza.
    let ephemeral = random::<32>()?;
    let ephemeral_public = x25519_dalek::x25519(*ephemeral, x25519_dalek::X25519_BASEPOINT_BYTES);
    let shared = Zeroizing::new(x25519_dalek::x25519(*ephemeral, *recipient));
    if *shared == [0u8; 32] {
        return Err(BAD_RECIPIENT);
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&ephemeral_public);
    salt[32..].copy_from_slice(recipient);
    let wrap_key = hkdf32(shared.as_ref(), &salt, X25519_LABEL);
    let body = seal(&wrap_key, &[0u8; 12], file_key.as_ref())?;

    let mut header = String::from("age-encryption.org/v1\n");
    header.push_str("-> X25519 ");
    header.push_str(&STANDARD_NO_PAD.encode(ephemeral_public));
    header.push('\n');
    header.push_str(&wrap_body(&body));
    header.push_str("---");
    let mac_key = hkdf32(file_key.as_ref(), &[], b"header");
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(mac_key.as_ref())
        .map_err(|_| QuorumError::InvalidParameters("age encryption failed"))?;
    mac.update(header.as_bytes());
    let tag = mac.finalize().into_bytes();
    header.push(' ');
    header.push_str(&STANDARD_NO_PAD.encode(tag));
    header.push('\n');

    // Payload: nonce, then STREAM chunks.
    let nonce = random::<16>()?;
    let payload_key = hkdf32(file_key.as_ref(), nonce.as_ref(), b"payload");
    let mut file = header.into_bytes();
    file.extend_from_slice(nonce.as_ref());
    let chunks: Vec<&[u8]> = if plaintext.is_empty() {
        vec![&[]]
    } else {
        plaintext.chunks(CHUNK).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut n = [0u8; 12];
        n[..11].copy_from_slice(&(i as u128).to_be_bytes()[5..]);
        if i == last {
            n[11] = 1;
        }
        file.extend_from_slice(&seal(&payload_key, &n, chunk)?);
    }

    // ASCII armor: padded standard base64 in 64-column lines.
    let b64 = STANDARD.encode(&file);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 80);
    out.push_str(ARMOR_BEGIN);
    out.push('\n');
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).map_err(|_| BAD_RECIPIENT)?);
        out.push('\n');
    }
    out.push_str(ARMOR_END);
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recipients_parse_or_are_refused() {
        // Spec test vector-style recipient from age's documentation.
        let r = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
        assert!(parse_recipient(r).is_ok());
        assert!(parse_recipient(&r.to_uppercase()).is_ok());
        for bad in [
            "",
            "age1",
            "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q",
            "agf1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
            "AGE-SECRET-KEY-1QQQQ",
        ] {
            assert_eq!(parse_recipient(bad), Err(BAD_RECIPIENT), "{bad}");
        }
    }

    #[test]
    fn body_wrapping_follows_age() {
        assert_eq!(wrap_body(&[0u8; 32]).lines().count(), 1);
        let w = wrap_body(&[0u8; 48]);
        assert!(w.ends_with("\n\n"), "{w:?}");
        assert_eq!(w.lines().next().map(str::len), Some(64));
    }

    #[test]
    fn armor_shape() {
        let r = parse_recipient("age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p")
            .unwrap();
        let a = encrypt_armored(&r, b"hello").unwrap();
        assert!(a.starts_with(ARMOR_BEGIN));
        assert!(a.ends_with("-----END AGE ENCRYPTED FILE-----\n"));
        assert!(a.lines().all(|l| l.len() <= 64));
        let body: String = a
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("-----"))
            .collect();
        let bin = STANDARD.decode(body).unwrap();
        assert!(bin.starts_with(b"age-encryption.org/v1\n-> X25519 "));
    }
}
