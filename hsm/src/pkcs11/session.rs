//! One pooled session: a logged-in `cryptoki::Session`, the pool generation it was opened
//! in, and its cache of object handles (token objects and their session copies).
//!
//! # Invariants
//! - A [`PooledSession`] has one owner at a time (the pool, or the one thread that checked
//!   it out); `cryptoki::Session` is `Send` but not `Sync`, which the type system enforces.
//! - Handles in [`PooledSession::keys`] are valid only in this session and this
//!   generation: a reconnect builds new sessions with empty caches, never carrying a
//!   handle over.
//! - A [`CachedKey::copy`] is a `C_CopyObject` of the token key with `CKA_TOKEN = false`,
//!   made in this session; [`PooledSession::purge`] destroys it with the cache entry.
//! - The session is never closed here (sessions are opened "no close on drop" and die with
//!   `C_Finalize`, see `pool.rs`).
//!
//! Must not import anything from the rest of Arca, nor from the pool or the key-operation
//! files.

use std::collections::HashMap;

use cryptoki::error::Error as CkError;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::error::{describe, is_stale_handle};
use crate::ObjectId;

/// Cached handles of one key in one session.
#[derive(Clone, Copy)]
pub(super) struct CachedKey {
    /// The token object (`CKA_TOKEN = true`).
    pub(super) token: ObjectHandle,
    /// Its session copy, once one was made for AES-GCM.
    pub(super) copy: Option<ObjectHandle>,
}

/// A logged-in session with its handle cache.
pub(super) struct PooledSession {
    pub(super) session: Session,
    /// The pool generation this session belongs to.
    pub(super) generation: u64,
    pub(super) keys: HashMap<ObjectId, CachedKey>,
}

impl PooledSession {
    /// Freshly opened sessions of `generation`, with empty caches.
    pub(super) fn fresh(sessions: Vec<Session>, generation: u64) -> Vec<PooledSession> {
        sessions
            .into_iter()
            .map(|session| PooledSession {
                session,
                generation,
                keys: HashMap::new(),
            })
            .collect()
    }

    /// Drops the cache entry of `id` and destroys its session copy, if any (best effort:
    /// the copy may already be gone, and a dead session takes its copies with it).
    pub(super) fn purge(&mut self, id: &ObjectId) {
        if let Some(entry) = self.keys.remove(id) {
            if let Some(copy) = entry.copy {
                match self.session.destroy_object(copy) {
                    Ok(()) => {}
                    Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => {}
                    Err(e) => tracing::warn!(
                        key = %id,
                        error = %describe(&e),
                        "C_DestroyObject of a session key copy failed"
                    ),
                }
            }
        }
    }
}
