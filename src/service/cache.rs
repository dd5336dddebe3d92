//! Short-lived cache of key metadata for the hot paths (wrap and unwrap).
//!
//! Invariants:
//! - An entry is trusted for at most [`KEY_CACHE_TTL`](super::KEY_CACHE_TTL); a state
//!   change made elsewhere (another node) takes effect within that time.
//! - A change made here replaces the entry at once ([`KeyCache::put`]).
//! - A miss reads the store handed in by the caller, which only a permit holder has
//!   (`Context::db`): the cache
//!   never reads on a caller's behalf before the caller was authorized.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::error::{Result, ServiceError};
use super::KEY_CACHE_TTL;
use crate::keys::{KeyId, KeyName};
use crate::store::{KeyRecord, Store};

/// Key records by id, and ids by name.
#[derive(Default)]
pub(super) struct KeyCache {
    by_id: RwLock<HashMap<KeyId, (Arc<KeyRecord>, Instant)>>,
    names: RwLock<HashMap<KeyName, KeyId>>,
}

impl KeyCache {
    /// Caches `rec` (the newest state, just read or written) and returns it.
    pub(super) fn put(&self, rec: KeyRecord) -> KeyRecord {
        let arc = Arc::new(rec.clone());
        if let Ok(mut n) = self.names.write() {
            n.insert(rec.name.clone(), rec.id);
        }
        if let Ok(mut m) = self.by_id.write() {
            m.insert(rec.id, (arc, Instant::now()));
        }
        rec
    }

    fn fresh(&self, id: &KeyId) -> Option<Arc<KeyRecord>> {
        let m = self.by_id.read().ok()?;
        let (rec, at) = m.get(id)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| Arc::clone(rec))
    }

    /// The key with id `id`, from the cache if fresh.
    pub(super) async fn by_id(&self, db: &dyn Store, id: &KeyId) -> Result<Arc<KeyRecord>> {
        if let Some(k) = self.fresh(id) {
            return Ok(k);
        }
        let rec = db.key_by_id(id).await?;
        self.put(rec);
        self.fresh(id).ok_or(ServiceError::internal("key cache"))
    }

    /// The key named `name`, from the cache if fresh.
    pub(super) async fn by_name(&self, db: &dyn Store, name: &KeyName) -> Result<Arc<KeyRecord>> {
        let id = self.names.read().ok().and_then(|n| n.get(name).copied());
        if let Some(k) = id.and_then(|id| self.fresh(&id)) {
            return Ok(k);
        }
        let rec = db.key_by_name(name).await?;
        let id = rec.id;
        self.put(rec);
        self.fresh(&id).ok_or(ServiceError::internal("key cache"))
    }
}
