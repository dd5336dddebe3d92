//! The chain and the details encryption.
//!
//! - `canonical(row)`: `"arca-audit-v1"` | seq (u64 BE) | time_ms (i64 BE) | then kind,
//!   operation, dek_id and body, each as u32-BE length + bytes | result (u32 BE). Every
//!   stored column but the hash is covered, so a change to any of them breaks the chain.
//! - `h_n = SHA-256(h_{n-1} || canonical(row_n))`, with `h_0` = 32 zero bytes.
//! - Seal input: `h_last || seq_last (u64 BE)`; the HSM computes the HMAC.
//! - Details: JSON, encrypted with AES-256-GCM under a data key (32 bytes from the HSM's
//!   RNG, stored only sealed under `arca:meta`). The IV is `0u32 || seq` (a seq is used
//!   once per cluster, so once per key), the AAD is `"arca-audit-v1" || seq`, so a body
//!   moved to another row no longer decrypts. While sealed (no HSM) details are stored in
//!   clear with an empty `dek_id`: those records carry no secret by construction either.

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

fn iv_aad(seq: u64) -> ([u8; 12], Vec<u8>) {
    let mut iv = [0u8; 12];
    iv[4..].copy_from_slice(&seq.to_be_bytes());
    let mut aad = DOMAIN.to_vec();
    aad.extend_from_slice(&seq.to_be_bytes());
    (iv, aad)
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
pub fn build_rows(
    mut seq: u64,
    mut prev: [u8; 32],
    records: &[PendingRecord],
    dek: Option<&DataKey>,
) -> Result<Vec<AuditRow>, AuditError> {
    let cipher = dek.map(DataKey::cipher).transpose()?;
    let mut rows = Vec::with_capacity(records.len());
    for r in records {
        seq += 1;
        let json = Zeroizing::new(
            serde_json::to_vec(&r.details).map_err(|_| AuditError::Corrupt("details"))?,
        );
        let body = match &cipher {
            Some(c) => {
                let (iv, aad) = iv_aad(seq);
                c.encrypt(
                    Nonce::from_slice(&iv),
                    Payload {
                        msg: &json,
                        aad: &aad,
                    },
                )
                .map_err(|_| AuditError::Corrupt("encrypt"))?
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
            let (iv, aad) = iv_aad(row.seq);
            Zeroizing::new(
                k.cipher()?
                    .decrypt(
                        Nonce::from_slice(&iv),
                        Payload {
                            msg: &row.body,
                            aad: &aad,
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
        let rows = build_rows(4, [1u8; 32], &[pending("A"), pending("B")], Some(&dek)).unwrap();
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
        let rows = build_rows(0, GENESIS, &[pending("Unseal")], None).unwrap();
        assert!(rows[0].dek_id.is_empty());
        assert_eq!(open_details(&rows[0], None).unwrap().principal, "svc:a");
    }
}
