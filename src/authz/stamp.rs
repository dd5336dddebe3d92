//! State MACs (DESIGN §2b, ADR 12): which fields of each authority-bearing row the HSM
//! key `arca:state-mac` authenticates, stamping a row before it is written, and checking
//! a row before it is trusted.
//!
//! Each table's canonical form ([`RowEncoding`]) names the table, the row's identity,
//! every field that grants or limits authority, and the row's state sequence
//! (`state_seq`, or a policy's version): a MAC copied from another row, a row moved to
//! another principal, or a field changed under a valid MAC does not verify.
//!
//! [`Stamps`] remembers what it verified, keyed by SHA-256 of the encoding and the MAC,
//! so a row costs an HSM call only when it is new or changed: a cache refresh over
//! unchanged rows asks the HSM nothing. A refused row is remembered too, so its alert
//! fires once.
//!
//! Invariants:
//! - Nothing reads a MAC as valid without the HSM's answer (or the memory of one); a
//!   missing MAC is [`Unverified::Unstamped`], a `q:` MAC (the quorum's, at init) is not
//!   an HSM MAC and is refused here: only the unseal that rebuilds the quorum secret
//!   turns it into one.
//! - MACs are compared in constant time ([`KeyEngine::verify_state_mac`]).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashSet;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::keys::state::{RowEncoding, Unverified};
use crate::keys::{KeyEngine, KeyId, KeysError, ObjectId};
use crate::store::{GrantRecord, PolicyVersion, Roster, TokenRecord};

/// Prefix of a MAC made at init under the quorum secret (re-stamped at unseal).
pub const QUORUM_MAC_PREFIX: &str = "q:";

/// Rows remembered as verified (or refused) before the memory is cleared.
const MEMO_LIMIT: usize = 100_000;

/// A token row's canonical form (`revoked_at` is in it; a revoked row has no MAC).
pub fn token_row(t: &TokenRecord) -> RowEncoding {
    RowEncoding::new("tokens", t.state_seq)
        .text("id", &t.id)
        .bytes("token_hash", &t.hash.0)
        .text("principal", &t.principal)
        .list("roles", &t.roles)
        .int("created_at", t.created_at)
        .opt_int("expires_at", t.expires_at)
        .opt_int("revoked_at", t.revoked_at)
        .list("key_globs", &t.key_globs)
        .list("cidrs", &t.cidrs)
        .opt_text("bound_principal", t.bound_principal.as_deref())
        .text("description", &t.description)
}

/// A role grant's canonical form.
pub fn grant_row(g: &GrantRecord) -> RowEncoding {
    RowEncoding::new("role_grants", g.state_seq)
        .text("id", &g.id)
        .text("principal", &g.principal)
        .text("role", &g.role)
        .text("kind", &g.kind)
        .text("reason", &g.reason)
        .opt_text("request_id", g.request_id.as_deref())
        .int("created_at", g.created_at)
        .int("expires_at", g.expires_at)
}

/// An access-policy version's canonical form (its version is its sequence).
pub fn policy_row(p: &PolicyVersion) -> RowEncoding {
    RowEncoding::new("access_policies", p.seq)
        .text("text", &p.text)
        .opt_text("request_id", p.request_id.as_deref())
        .int("created_at", p.created_at)
}

/// The canonical form of "version `version` of key `key`, HSM object `hsm_id`, is
/// ENABLED at state sequence `seq`". Only ENABLED versions carry a MAC: every other state
/// grants nothing, so a version made usable by a database writer does not verify.
pub fn enabled_row(key: &KeyId, version: u32, hsm_id: &ObjectId, seq: i64) -> RowEncoding {
    RowEncoding::new("key_versions", seq)
        .text("key_id", &key.to_string())
        .int("version", i64::from(version))
        .text("hsm_id", &hsm_id.to_string())
        .text("state", "ENABLED")
}

/// The canonical form of "version `version` of key `key`, HSM object `hsm_id`, is
/// SCHEDULED_FOR_DESTRUCTION, due at `destroy_at`, at state sequence `seq`": what the
/// destroyer must verify before it destroys anything (a database writer cannot schedule
/// a destruction, nor move one earlier).
pub fn scheduled_row(
    key: &KeyId,
    version: u32,
    hsm_id: &ObjectId,
    destroy_at: i64,
    seq: i64,
) -> RowEncoding {
    RowEncoding::new("key_versions", seq)
        .text("key_id", &key.to_string())
        .int("version", i64::from(version))
        .text("hsm_id", &hsm_id.to_string())
        .text("state", "SCHEDULED_FOR_DESTRUCTION")
        .int("destroy_at", destroy_at)
}

/// The canonical form of "key `key` is kept until `retain_until`": the retention job
/// schedules a key's destruction only on a date that verifies.
pub fn retention_row(key: &KeyId, retain_until: i64) -> RowEncoding {
    RowEncoding::new("keys.retain_until", 1)
        .text("key_id", &key.to_string())
        .int("retain_until", retain_until)
}

/// The roster of TOTP enrolments (`state_rosters`, row `totp`).
pub const TOTP_ROSTER: &str = "totp";

/// A roster's canonical form.
pub fn roster_row(r: &Roster) -> RowEncoding {
    RowEncoding::new("state_rosters", r.state_seq)
        .text("name", &r.name)
        .list("members", &r.members)
}

/// The MAC of `row`, hex, to store with it.
pub async fn stamp(engine: &KeyEngine, row: RowEncoding) -> Result<String, KeysError> {
    Ok(hex::encode(engine.state_mac(row.into_bytes()).await?))
}

/// What [`Stamps::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Authentic.
    Good,
    /// Refused; `first`: the first time this row (with this MAC) was refused here, so
    /// the caller alerts once.
    Refused {
        /// Why.
        why: Unverified,
        /// First time.
        first: bool,
    },
}

/// What was verified, and what was refused, by SHA-256 of encoding ‖ MAC.
#[derive(Default)]
pub struct Stamps {
    good: Mutex<HashSet<[u8; 32]>>,
    bad: Mutex<HashSet<[u8; 32]>>,
}

fn memo_key(row: &[u8], mac: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((row.len() as u64).to_be_bytes());
    h.update(row);
    h.update(mac.as_bytes());
    h.finalize().into()
}

fn remember(set: &Mutex<HashSet<[u8; 32]>>, k: [u8; 32]) -> bool {
    match set.lock() {
        Ok(mut s) => {
            if s.len() >= MEMO_LIMIT {
                s.clear();
            }
            s.insert(k)
        }
        Err(_) => true,
    }
}

impl Stamps {
    /// Whether `what` (a refusal that has no row to memoise, e.g. a deleted one) is
    /// refused here for the first time.
    pub fn first_refusal(&self, what: &str) -> bool {
        remember(&self.bad, memo_key(what.as_bytes(), "absent"))
    }

    /// Checks `row` against its stored `mac`, asking the HSM only for a row not seen
    /// verified before.
    pub async fn check(
        &self,
        engine: &KeyEngine,
        row: RowEncoding,
        mac: Option<&str>,
    ) -> Result<Checked, KeysError> {
        let bytes = row.into_bytes();
        let mac = match mac {
            Some(m) if !m.starts_with(QUORUM_MAC_PREFIX) => m,
            _ => {
                let first = remember(&self.bad, memo_key(&bytes, mac.unwrap_or("")));
                return Ok(Checked::Refused {
                    why: Unverified::Unstamped,
                    first,
                });
            }
        };
        let k = memo_key(&bytes, mac);
        if self.good.lock().is_ok_and(|g| g.contains(&k)) {
            return Ok(Checked::Good);
        }
        if self.bad.lock().is_ok_and(|b| b.contains(&k)) {
            return Ok(Checked::Refused {
                why: Unverified::Forged,
                first: false,
            });
        }
        let authentic = match hex::decode(mac) {
            Ok(m) if m.len() == 32 => engine.verify_state_mac(bytes, &m).await?,
            _ => false,
        };
        if authentic {
            remember(&self.good, k);
            Ok(Checked::Good)
        } else {
            let first = remember(&self.bad, k);
            Ok(Checked::Refused {
                why: Unverified::Forged,
                first,
            })
        }
    }
}
