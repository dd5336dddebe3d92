//! Shamir secret sharing of the 256-bit quorum secret, over `blahaj` (the maintained fork
//! of `sharks` with RUSTSEC-2024-0398 fixed; see docs/adr/0004).
//!
//! Share wire form: `arca-share-v1:<x>:<hex of 32 y-bytes>`, where x is the custodian's
//! 1-based index. The library is only ever given distinct x values and at least K shares.

use std::collections::HashSet;

use zeroize::Zeroizing;

use super::QuorumError;
use crate::secret::{QuorumSecret, Share};

/// Smallest and largest K and N (DESIGN §2: 2 ≤ K ≤ N ≤ 16; dev mode may use 1-of-1).
pub const MAX_SHARES: u8 = 16;

const PREFIX: &str = "arca-share-v1:";

/// Splits `secret` into `n` shares, any `k` of which rebuild it. Share i has x = i + 1.
pub fn split(secret: &QuorumSecret, k: u8, n: u8) -> Result<Vec<Share>, QuorumError> {
    if k == 0 || k > n || n > MAX_SHARES {
        return Err(QuorumError::InvalidParameters(
            "need 1 <= threshold <= shares <= 16",
        ));
    }
    let dealer = blahaj::Sharks(k).dealer(secret.expose());
    let shares: Vec<Share> = dealer
        .take(usize::from(n))
        .map(|s| Share::new(Zeroizing::new(Vec::from(&s))))
        .collect();
    // The dealer numbers shares 1..=n; the custodian index relies on it.
    for (i, s) in shares.iter().enumerate() {
        if s.x() != Some(i as u8 + 1) || s.expose().len() != 33 {
            return Err(QuorumError::InvalidParameters("unexpected share layout"));
        }
    }
    Ok(shares)
}

/// Rebuilds the secret from at least `k` shares with distinct x values.
pub fn combine(shares: &[&Share], k: u8) -> Result<QuorumSecret, QuorumError> {
    if shares.len() < usize::from(k.max(1)) {
        return Err(QuorumError::NotEnoughShares);
    }
    let mut xs = HashSet::new();
    let mut parsed = Vec::with_capacity(shares.len());
    for s in shares {
        let bytes = s.expose();
        if bytes.len() != 33 || bytes[0] == 0 {
            return Err(QuorumError::ShareRejected);
        }
        if !xs.insert(bytes[0]) {
            return Err(QuorumError::DuplicateShare);
        }
        parsed.push(blahaj::Share::try_from(bytes).map_err(|_| QuorumError::ShareRejected)?);
    }
    let secret = Zeroizing::new(
        blahaj::Sharks(k.max(1))
            .recover(parsed.iter())
            .map_err(|_| QuorumError::NotEnoughShares)?,
    );
    QuorumSecret::from_slice(&secret).ok_or(QuorumError::ShareRejected)
}

/// The text form handed to a custodian.
pub fn encode(share: &Share) -> Zeroizing<String> {
    let b = share.expose();
    let mut s = Zeroizing::new(String::with_capacity(PREFIX.len() + 4 + 64));
    s.push_str(PREFIX);
    s.push_str(&b.first().copied().unwrap_or(0).to_string());
    s.push(':');
    s.push_str(&hex::encode(b.get(1..).unwrap_or_default()));
    s
}

/// Parses the text form (surrounding white space ignored).
pub fn decode(text: &str) -> Result<Share, QuorumError> {
    let rest = text
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(QuorumError::ShareRejected)?;
    let (x, y) = rest.split_once(':').ok_or(QuorumError::ShareRejected)?;
    let x: u8 = x.parse().map_err(|_| QuorumError::ShareRejected)?;
    if x == 0 || x > MAX_SHARES || y.len() != 64 {
        return Err(QuorumError::ShareRejected);
    }
    let mut bytes = Zeroizing::new(vec![0u8; 33]);
    bytes[0] = x;
    hex::decode_to_slice(y, &mut bytes[1..]).map_err(|_| QuorumError::ShareRejected)?;
    Ok(Share::new(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret() -> QuorumSecret {
        QuorumSecret::from_slice(&[0x5a; 32]).unwrap()
    }

    #[test]
    fn any_k_of_n_rebuild() {
        let s = secret();
        let shares = split(&s, 3, 5).unwrap();
        for (a, b, c) in [(0, 1, 2), (0, 2, 4), (1, 3, 4), (4, 2, 0)] {
            let got = combine(&[&shares[a], &shares[b], &shares[c]], 3).unwrap();
            assert!(got.ct_eq(&s));
        }
        let got = combine(&shares.iter().collect::<Vec<_>>(), 3).unwrap();
        assert!(got.ct_eq(&s));
    }

    #[test]
    fn short_and_duplicate_sets_are_refused() {
        let shares = split(&secret(), 3, 5).unwrap();
        assert_eq!(
            combine(&[&shares[0], &shares[1]], 3).err(),
            Some(QuorumError::NotEnoughShares)
        );
        assert_eq!(
            combine(&[&shares[0], &shares[1], &shares[1]], 3).err(),
            Some(QuorumError::DuplicateShare)
        );
    }

    #[test]
    fn text_roundtrip_and_rejects() {
        let shares = split(&secret(), 2, 3).unwrap();
        let t = encode(&shares[1]);
        assert!(t.starts_with("arca-share-v1:2:"));
        let back = decode(&t).unwrap();
        assert_eq!(back.expose(), shares[1].expose());
        for bad in [
            "",
            "arca-share-v1:0:00",
            "arca-share-v1:2:zz",
            "x:1:00",
            "arca-share-v1:17:",
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_are_checked() {
        assert!(split(&secret(), 0, 3).is_err());
        assert!(split(&secret(), 4, 3).is_err());
        assert!(split(&secret(), 2, 17).is_err());
        assert!(split(&secret(), 1, 1).is_ok());
    }
}
