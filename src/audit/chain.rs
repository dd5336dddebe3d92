//! The chain and the details encryption.
//!
//! - `canonical(row)`: `"arca-audit-v1"` | seq (u64 BE) | time_ms (i64 BE) | then kind,
//!   operation, dek_id and body, each as u32-BE length + bytes | result (u32 BE). Every
//!   stored column but the hash is covered, so a change to any of them breaks the chain.
//! - `h_n = SHA-256(h_{n-1} || canonical(row_n))`, with `h_0` = 32 zero bytes.
//! - Seal input: `h_last || seq_last (u64 BE)`; the HSM computes the HMAC.
//! - Details: JSON, encrypted with AES-256-GCM under a data key (32 bytes from the HSM's
//!   RNG, stored only sealed under `arca:meta`; where the HSM cannot seal, a key derived
//!   from `arca:audit-mac` instead, stored as a mark). The body is `IV (12 random bytes) ||
//!   ciphertext || tag`. The IV is random, not derived from the seq: a batch whose commit
//!   failed is built again at the same seqs with other contents (its calls now refused),
//!   and the failed attempt's bytes may survive in the database's files (dead rows, WAL),
//!   so a seq-derived IV would repeat under one key. A data key encrypts at most
//!   `DEK_RECORDS` (2^24) records, far below the 2^32 random IVs NIST SP 800-38D allows
//!   per key. The AAD is `"arca-audit-v1" || seq`, so a body moved to another row no
//!   longer decrypts. While sealed (no HSM) details are stored in clear with an empty
//!   `dek_id`: those records carry no secret by construction either.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::record::{Details, PendingRecord};
use super::AuditError;
use crate::store::AuditRow;

const DOMAIN: &[u8] = b"arca-audit-v1";

/// `h_0`.
pub const GENESIS: [u8; 32] = [0u8; 32];

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The canonical encoding of a row (every column but its hash).
pub fn canonical(row: &AuditRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + row.body.len() + row.operation.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&row.seq.to_be_bytes());
    out.extend_from_slice(&row.time_ms.to_be_bytes());
    put(&mut out, row.kind.as_bytes());
    put(&mut out, row.operation.as_bytes());
    put(&mut out, row.dek_id.as_bytes());
    put(&mut out, &row.body);
    out.extend_from_slice(&row.result.to_be_bytes());
    out
}

/// `SHA-256(prev || canonical(row))`.
pub fn link(prev: &[u8; 32], row: &AuditRow) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical(row));
    h.finalize().into()
}

/// What the HSM MACs to seal a head.
pub fn seal_input(head: &[u8; 32], seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(head);
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

/// Length of the random IV that opens an encrypted body.
const IV_LEN: usize = 12;

fn aad(seq: u64) -> Vec<u8> {
    let mut aad = DOMAIN.to_vec();
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

/// A data key of the details encryption, with its id.
pub struct DataKey {
    /// Public id (stored with each row and in `audit_deks`).
    pub id: String,
    key: Zeroizing<[u8; 32]>,
}

impl DataKey {
    /// Wraps raw key bytes.
    pub fn new(id: String, key: Zeroizing<[u8; 32]>) -> Self {
        DataKey { id, key }
    }

    fn cipher(&self) -> Result<Aes256Gcm, AuditError> {
        Aes256Gcm::new_from_slice(self.key.as_ref()).map_err(|_| AuditError::Corrupt("data key"))
    }
}

/// Turns pending records into rows after `(seq, prev)`: numbered, encrypted (when `dek`
/// is given) and chained.
pub fn build_rows<'a>(
    mut seq: u64,
    mut prev: [u8; 32],
    records: impl ExactSizeIterator<Item = &'a PendingRecord>,
    dek: Option<&DataKey>,
) -> Result<Vec<AuditRow>, AuditError> {
    let cipher = dek.map(DataKey::cipher).transpose()?;
    // Every IV of the batch in one call to the OS RNG.
    let mut ivs = vec![
        0u8;
        if cipher.is_some() {
            IV_LEN * records.len()
        } else {
            0
        }
    ];
    getrandom::fill(&mut ivs).map_err(|_| AuditError::Corrupt("no randomness for IVs"))?;
    let mut rows = Vec::with_capacity(records.len());
    for (i, r) in records.enumerate() {
        seq += 1;
        let json = Zeroizing::new(
            serde_json::to_vec(&r.details).map_err(|_| AuditError::Corrupt("details"))?,
        );
        let body = match &cipher {
            Some(c) => {
                let iv = &ivs[i * IV_LEN..(i + 1) * IV_LEN];
                let sealed = c
                    .encrypt(
                        Nonce::from_slice(iv),
                        Payload {
                            msg: &json,
                            aad: &aad(seq),
                        },
                    )
                    .map_err(|_| AuditError::Corrupt("encrypt"))?;
                let mut body = Vec::with_capacity(IV_LEN + sealed.len());
                body.extend_from_slice(iv);
                body.extend_from_slice(&sealed);
                body
            }
            None => json.to_vec(),
        };
        let mut row = AuditRow {
            seq,
            time_ms: r.time_ms,
            kind: r.kind.as_str().to_string(),
            operation: r.operation.clone(),
            result: r.result,
            dek_id: dek.map(|d| d.id.clone()).unwrap_or_default(),
            body,
            hash: [0u8; 32],
        };
        row.hash = link(&prev, &row);
        prev = row.hash;
        rows.push(row);
    }
    Ok(rows)
}

/// Decrypts a row's details with its data key (`None` for a clear row).
pub fn open_details(row: &AuditRow, dek: Option<&DataKey>) -> Result<Details, AuditError> {
    let json = match dek {
        None if row.dek_id.is_empty() => Zeroizing::new(row.body.clone()),
        None => return Err(AuditError::Corrupt("data key missing")),
        Some(k) => {
            if row.body.len() < IV_LEN {
                return Err(AuditError::Corrupt("details do not authenticate"));
            }
            let (iv, sealed) = row.body.split_at(IV_LEN);
            Zeroizing::new(
                k.cipher()?
                    .decrypt(
                        Nonce::from_slice(iv),
                        Payload {
                            msg: sealed,
                            aad: &aad(row.seq),
                        },
                    )
                    .map_err(|_| AuditError::Corrupt("details do not authenticate"))?,
            )
        }
    };
    serde_json::from_slice(&json).map_err(|_| AuditError::Corrupt("details"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::record::Kind;

    fn pending(op: &str) -> PendingRecord {
        PendingRecord {
            time_ms: 1_800_000_000_000,
            kind: Kind::Rpc,
            operation: op.into(),
            result: 0,
            details: Details {
                principal: "svc:a".into(),
                ..Details::default()
            },
        }
    }

    #[test]
    fn rows_chain_and_decrypt_only_in_place() {
        let dek = DataKey::new("d1".into(), Zeroizing::new([7u8; 32]));
        let rows = build_rows(
            4,
            [1u8; 32],
            [pending("A"), pending("B")].iter(),
            Some(&dek),
        )
        .unwrap();
        assert_eq!(rows[0].seq, 5);
        assert_eq!(rows[1].seq, 6);
        assert_eq!(rows[0].hash, link(&[1u8; 32], &rows[0]));
        assert_eq!(rows[1].hash, link(&rows[0].hash, &rows[1]));
        assert!(!String::from_utf8_lossy(&rows[0].body).contains("svc:a"));
        assert_eq!(
            open_details(&rows[0], Some(&dek)).unwrap().principal,
            "svc:a"
        );
        // A body moved to another seq does not decrypt.
        let mut moved = rows[1].clone();
        moved.body = rows[0].body.clone();
        assert!(open_details(&moved, Some(&dek)).is_err());
        // The same record built again at the same seq (a retried batch) gets another IV.
        let again = build_rows(4, [1u8; 32], [pending("A")].iter(), Some(&dek)).unwrap();
        assert_ne!(again[0].body[..IV_LEN], rows[0].body[..IV_LEN]);
        assert_eq!(
            open_details(&again[0], Some(&dek)).unwrap().principal,
            "svc:a"
        );
        // A cut body is refused, not a panic.
        let mut cut = rows[0].clone();
        cut.body.truncate(5);
        assert!(open_details(&cut, Some(&dek)).is_err());
        // Any column change changes the hash.
        let mut m = rows[0].clone();
        m.result = 7;
        assert_ne!(link(&[1u8; 32], &m), rows[0].hash);
        m = rows[0].clone();
        m.body[0] ^= 1;
        assert_ne!(link(&[1u8; 32], &m), rows[0].hash);
    }

    #[test]
    fn clear_rows_while_sealed() {
        let rows = build_rows(0, GENESIS, [pending("Unseal")].iter(), None).unwrap();
        assert!(rows[0].dek_id.is_empty());
        assert_eq!(open_details(&rows[0], None).unwrap().principal, "svc:a");
    }
}
