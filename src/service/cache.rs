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
//!   forged ([`KeyCache::forged`]) and alerted once.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::context::Context;
use super::error::Result;
use super::KEY_CACHE_TTL;
use crate::authz::stamp::{enabled_row, Checked};
use crate::keys::state::Unverified;
use crate::keys::{KeyId, KeyName, VersionState};
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

    fn fresh(&self, id: &KeyId) -> Option<(Arc<KeyRecord>, bool)> {
        let m = self.by_id.read().ok()?;
        let e = m.get(id)?;
        (e.at.elapsed() < KEY_CACHE_TTL).then(|| (Arc::clone(&e.rec), e.checked))
    }

    /// The key with id `id`, from the cache if fresh.
    pub(super) async fn by_id(
        &self,
        ctx: &Context,
        db: &dyn Store,
        id: &KeyId,
    ) -> Result<Arc<KeyRecord>> {
        if let Some((k, checked)) = self.fresh(id) {
            if checked {
                return Ok(k);
            }
            return self.check(ctx, k).await;
        }
        let rec = self.insert(db.key_by_id(id).await?);
        self.check(ctx, rec).await
    }

    /// The key named `name`, from the cache if fresh.
    pub(super) async fn by_name(
        &self,
        ctx: &Context,
        db: &dyn Store,
        name: &KeyName,
    ) -> Result<Arc<KeyRecord>> {
        let id = self.names.read().ok().and_then(|n| n.get(name).copied());
        if let Some((k, checked)) = id.and_then(|id| self.fresh(&id)) {
            if checked {
                return Ok(k);
            }
            return self.check(ctx, k).await;
        }
        let rec = self.insert(db.key_by_name(name).await?);
        self.check(ctx, rec).await
    }

    /// Checks every ENABLED version of `rec` against its MAC; a refused one is served as
    /// DISABLED and remembered as forged. Caches and returns the result.
    async fn check(&self, ctx: &Context, rec: Arc<KeyRecord>) -> Result<Arc<KeyRecord>> {
        let engine = ctx.engine()?;
        let mut out = KeyRecord::clone(&rec);
        for v in out.versions.iter_mut() {
            if v.state != VersionState::Enabled {
                continue;
            }
            let row = enabled_row(&rec.id, v.version, &v.hsm_id, v.state_seq);
            match ctx.stamps.check(&engine, row, v.mac.as_deref()).await? {
                Checked::Good => {
                    if let Ok(mut f) = self.forged.write() {
                        f.remove(&(rec.id, v.version));
                    }
                }
                Checked::Refused { why, first } => {
                    ctx.refuse_state(
                        "key_versions",
                        &format!("{}/{}", rec.id, v.version),
                        why,
                        first,
                    );
                    if let Ok(mut f) = self.forged.write() {
                        f.insert((rec.id, v.version), why);
                    }
                    v.state = VersionState::Disabled;
                }
            }
        }
        let arc = Arc::new(out);
        if let Ok(mut m) = self.by_id.write() {
            // Only over the entry it checked: a newer one put meanwhile is left alone.
            if let Some(e) = m.get_mut(&rec.id) {
                if Arc::ptr_eq(&e.rec, &rec) {
                    e.rec = Arc::clone(&arc);
                    e.checked = true;
                }
            }
        }
        Ok(arc)
    }
}
