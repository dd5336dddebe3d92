//! [`KeyedLock`]: one holder at a time per key (a custodian, a principal) on this node.
//! It queues a burst of TOTP attempt reservations for one person in memory, so that they
//! do not each hold a database connection while waiting for that person's row lock (which
//! would starve the pool, and the audit writer with it). Correctness does not rest on
//! it: the store's reservation is atomic across nodes (ADR 14).
//!
//! Invariant: entries live only while a holder or a waiter uses them; the map never grows
//! with keys nobody is using.
//!
//! Must not import: tonic, prost, sqlx, cryptoki; nor any other service module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// A lock per key.
#[derive(Default)]
pub(super) struct KeyedLock {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLock {
    /// Waits until no one else holds `key` on this node, and holds it until the guard is
    /// dropped.
    pub(super) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            // A poisoned map still maps keys to live locks: use it as it stands.
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_none_across_keys() {
        let l = KeyedLock::default();
        let a = l.lock("a").await;
        // Another key is free.
        let _b = l.lock("b").await;
        // The same key waits until the first guard goes.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), l.lock("a")).await;
        assert!(waiting.is_err());
        drop(a);
        let _a2 = l.lock("a").await;
    }
}
