//! TOTP (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, 30-second steps, accepting
//! the current step and one on either side. A code is accepted once: the caller stores
//! the step it matched and passes it back as `last_used`, and no step at or before it is
//! accepted again.

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use super::QuorumError;
use crate::secret::ct_eq;

/// Step length in seconds.
pub const STEP_SECS: i64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;

/// The HOTP value for `counter`, as a zero-padded decimal string.
pub fn hotp(secret: &[u8], counter: u64) -> String {
    let mut mac = match <Hmac<Sha1> as KeyInit>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm is unreachable.
        Err(_) => return String::new(),
    };
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = usize::from(h[19] & 0x0f);
    let bin = (u32::from(h[offset] & 0x7f) << 24)
        | (u32::from(h[offset + 1]) << 16)
        | (u32::from(h[offset + 2]) << 8)
        | u32::from(h[offset + 3]);
    format!("{:06}", bin % 10u32.pow(DIGITS))
}

/// The step containing `now_ms`.
pub fn step_at(now_ms: i64) -> i64 {
    now_ms.div_euclid(1000).div_euclid(STEP_SECS)
}

/// Verifies `code` at `now_ms`; returns the matched step, which must be stored as the
/// new `last_used`. Codes of steps at or before `last_used` are refused (no replay).
pub fn verify(
    secret: &[u8],
    code: &str,
    now_ms: i64,
    last_used: Option<i64>,
) -> Result<i64, QuorumError> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QuorumError::TotpRejected);
    }
    let now = step_at(now_ms);
    let mut matched = None;
    // Check all three candidates so the timing does not depend on which matched.
    for step in [now - 1, now, now + 1] {
        if step < 0 || last_used.is_some_and(|l| step <= l) {
            continue;
        }
        if ct_eq(hotp(secret, step as u64).as_bytes(), code.as_bytes()) && matched.is_none() {
            matched = Some(step);
        }
    }
    matched.ok_or(QuorumError::TotpRejected)
}

/// RFC 4648 base32 without padding (the form authenticator apps take).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buf: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The enrolment URI for authenticator apps.
pub fn otpauth_uri(custodian: &str, secret: &[u8]) -> String {
    let label: String = custodian
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "otpauth://totp/Arca:{label}?secret={}&issuer=Arca&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        base32(secret)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // RFC 6238 appendix B, SHA-1 seed; the RFC lists 8 digits, 6 are their last six.
    const SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_vectors() {
        for (t, code8) in [
            (59i64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
        ] {
            assert_eq!(hotp(SEED, (t / 30) as u64), code8[2..], "t={t}");
        }
    }

    #[test]
    fn window_and_replay() {
        let now = 1_234_567_890_000;
        let step = step_at(now);
        let code = hotp(SEED, step as u64);
        assert_eq!(verify(SEED, &code, now, None), Ok(step));
        assert_eq!(
            verify(SEED, &code, now, Some(step)),
            Err(QuorumError::TotpRejected)
        );
        let prev = hotp(SEED, (step - 1) as u64);
        assert_eq!(verify(SEED, &prev, now, None), Ok(step - 1));
        let old = hotp(SEED, (step - 2) as u64);
        assert!(verify(SEED, &old, now, None).is_err());
        assert!(verify(SEED, "12345", now, None).is_err());
        assert!(verify(SEED, "abcdef", now, None).is_err());
    }

    #[test]
    fn base32_rfc4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert!(otpauth_uri("alice", SEED).contains("secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"));
    }
}
