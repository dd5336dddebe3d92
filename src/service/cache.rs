//! Short-lived cache of key metadata for the hot paths (wrap and unwrap).
//!
//! Invariants:
//! - An entry is trusted for at most [`KEY_CACHE_TTL`](super::KEY_CACHE_TTL); a state
//!   change made elsewhere (another node) takes effect within that time.
//! - A change made here replaces the entry at once ([`KeyCache::put`]).
//! - A miss reads the store handed in by the caller, which only a permit holder has
//!   (`Context::db`): the cache never reads on a caller's behalf before the caller was
//!   authorized.
//! - No version counts as ENABLED unless the HSM's MAC says so (ADR 12): an entry is
//!   checked before it is served (memoised, so an unchanged row costs no HSM call), and
//!   an ENABLED row whose MAC does not verify is served as not usable, remembered as
//!   forged ([`KeyCache::forged`]) and alerted once (the check itself is
//!   `Context::checked_key`; this file keeps its verdicts).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::error::Result;
use super::KEY_CACHE_TTL;
use crate::keys::state::Unverified;
use crate::keys::{KeyId, KeyName};
use crate::store::{KeyRecord, Store};

struct Entry {
    rec: Arc<KeyRecord>,
    at: Instant,
    /// Whether its ENABLED versions were checked against their MACs.
    checked: bool,
}

/// Key records by id, and ids by name.
#[derive(Default)]
pub(super) struct KeyCache {
    by_id: RwLock<HashMap<KeyId, Entry>>,
    names: RwLock<HashMap<KeyName, KeyId>>,
    /// ENABLED rows refused, by (key, version), as last seen.
    forged: RwLock<HashMap<(KeyId, u32), Unverified>>,
}

impl KeyCache {
    /// Caches `rec` (the newest state, just read or written; checked before it is
    /// served) and returns it.
    pub(super) fn put(&self, rec: KeyRecord) -> KeyRecord {
        let out = rec.clone();
        self.insert(rec);
        out
    }

    fn insert(&self, rec: KeyRecord) -> Arc<KeyRecord> {
        let arc = Arc::new(rec);
        if let Ok(mut n) = self.names.write() {
            n.insert(arc.name.clone(), arc.id);
        }
        if let Ok(mut m) = self.by_id.write() {
            m.insert(
                arc.id,
                Entry {
                    rec: Arc::clone(&arc),
                    at: Instant::now(),
                    checked: false,
                },
            );
        }
        arc
    }

    /// Why version `version` of `key` was refused, if its row said ENABLED under a MAC
    /// that does not verify.
    pub(super) fn forged(&self, key: &KeyId, version: u32) -> Option<Unverified> {
        self.forged.read().ok()?.get(&(*key, version)).copied()
    }

    fn fresh(&self, id: &KeyId) -> Option<Seen> {
        let m = self.by_id.read().ok()?;
        let e = m.get(id)?;
        (e.at.elapsed() < KEY_CACHE_TTL).then(|| Seen {
            rec: Arc::clone(&e.rec),
            checked: e.checked,
        })
    }

    /// The key with id `id`, from the cache if fresh.
    pub(super) async fn by_id(&self, db: &dyn Store, id: &KeyId) -> Result<Seen> {
        if let Some(seen) = self.fresh(id) {
            return Ok(seen);
        }
        let rec = self.insert(db.key_by_id(id).await?);
        Ok(Seen {
            rec,
            checked: false,
        })
    }

    /// The key named `name`, from the cache if fresh.
    pub(super) async fn by_name(&self, db: &dyn Store, name: &KeyName) -> Result<Seen> {
        let id = self.names.read().ok().and_then(|n| n.get(name).copied());
        if let Some(seen) = id.and_then(|id| self.fresh(&id)) {
            return Ok(seen);
        }
        let rec = self.insert(db.key_by_name(name).await?);
        Ok(Seen {
            rec,
            checked: false,
        })
    }

    /// Records the check of `seen`: `served` (with refused versions made unusable) and
    /// the refused versions. Replaces the entry only if it is still the one checked.
    pub(super) fn checked(
        &self,
        seen: &Arc<KeyRecord>,
        served: KeyRecord,
        verdicts: &[(u32, Option<Unverified>)],
    ) -> Arc<KeyRecord> {
        if let Ok(mut f) = self.forged.write() {
            for (v, why) in verdicts {
                match why {
                    Some(why) => f.insert((served.id, *v), *why),
                    None => f.remove(&(served.id, *v)),
                };
            }
        }
        let arc = Arc::new(served);
        if let Ok(mut m) = self.by_id.write() {
            if let Some(e) = m.get_mut(&arc.id) {
                if Arc::ptr_eq(&e.rec, seen) {
                    e.rec = Arc::clone(&arc);
                    e.checked = true;
                }
            }
        }
        arc
    }
}

/// A cached key record, and whether its ENABLED versions were checked.
pub(super) struct Seen {
    pub(super) rec: Arc<KeyRecord>,
    pub(super) checked: bool,
}
