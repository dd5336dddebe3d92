//! Finding key objects by `CKA_ID` and caching their handles per session, with the
//! optional session copies of AES keys; [`Pkcs11Hsm::with_key`] runs one operation with
//! a key's handle.
//!
//! # Invariants
//! - Objects are always found by `CKA_ID`, and a token object by `CKA_TOKEN = true` as
//!   well, so a session copy (which shares the `CKA_ID`) is never mistaken for the token
//!   object. Two token objects with one `CKA_ID` are refused rather than one of them
//!   picked.
//! - A handle is used only in the session whose cache holds it (see `session.rs`).
//! - With `session_key_copies`, the first GCM use of an AES key in a session makes a
//!   `C_CopyObject` of the token key with `CKA_TOKEN = false` (it stays sensitive and
//!   non-extractable); every other use takes the token object.
//! - A stale handle (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`) drops the cache
//!   entry and retries the lookup once; an object that is gone is
//!   [`HsmError::ObjectNotFound`].
//!
//! Must not import anything from the rest of Arca.

use std::time::Duration;

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::device::Pkcs11Hsm;
use super::error::is_stale_handle;
use super::session::{CachedKey, PooledSession};
use crate::{HsmError, ObjectId, Result};

/// What a key handle is wanted for (decides whether a session copy is used).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Usage {
    /// AES-GCM encrypt/decrypt: the session copy when copies are on.
    Gcm,
    /// Anything else: the token object itself.
    Token,
}

/// The search template of the secret key objects with this `CKA_ID`: the token object
/// (`token = true`) or session objects, i.e. copies (`token = false`).
pub(super) fn key_template(id: &ObjectId, token: bool) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(token),
        Attribute::Id(id.0.to_vec()),
    ]
}

impl Pkcs11Hsm {
    /// Finds the token object with this `CKA_ID` (never a session copy).
    ///
    /// SoftHSM's `C_CopyObject` first copies every attribute of the original, `CKA_TOKEN
    /// = true` included, and applies the template (`CKA_TOKEN = false`) after: a search
    /// by another session in between sees the copy in the making as a second token
    /// object (observed with four sessions copying one key at once). So two matches are
    /// looked for again, a few times, before they count as two token objects sharing
    /// one `CKA_ID`, which is refused rather than one of them picked.
    pub(super) fn find_token_object(
        &self,
        s: &PooledSession,
        id: &ObjectId,
    ) -> Result<Option<ObjectHandle>> {
        const LOOKS: u32 = 4;
        let template = key_template(id, true);
        let mut look = 1;
        loop {
            match s.session.find_objects(&template) {
                Ok(found) => match found.as_slice() {
                    [] => return Ok(None),
                    [one] => return Ok(Some(*one)),
                    _ if look < LOOKS => {
                        look += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    more => {
                        return Err(HsmError::Pkcs11 {
                            function: "C_FindObjects",
                            detail: format!("{} token objects share CKA_ID {id}", more.len()),
                        })
                    }
                },
                Err(e) => return Err(self.pool.fail(s, e, "C_FindObjects", false)),
            }
        }
    }

    /// Every session object (copy) with this `CKA_ID` this process can see. Session
    /// objects are visible to every session of the application, so one session suffices.
    pub(super) fn find_session_copies(
        &self,
        s: &PooledSession,
        id: &ObjectId,
    ) -> Result<Vec<ObjectHandle>> {
        s.session
            .find_objects(&key_template(id, false))
            .map_err(|e| self.pool.fail(s, e, "C_FindObjects", false))
    }

    /// The handle to use for `id` in session `s`, from the cache or found (and copied)
    /// now. `Ok(None)`: a handle turned out stale while copying.
    fn handle_for(
        &self,
        s: &mut PooledSession,
        id: &ObjectId,
        usage: Usage,
    ) -> Result<Option<ObjectHandle>> {
        let want_copy = usage == Usage::Gcm && self.copies;
        let entry = match s.keys.get(id) {
            Some(entry) => *entry,
            None => {
                let token = self
                    .find_token_object(s, id)?
                    .ok_or(HsmError::ObjectNotFound)?;
                let entry = CachedKey { token, copy: None };
                s.keys.insert(*id, entry);
                entry
            }
        };
        if !want_copy {
            return Ok(Some(entry.token));
        }
        if let Some(copy) = entry.copy {
            return Ok(Some(copy));
        }
        match s
            .session
            .copy_object(entry.token, &[Attribute::Token(false)])
        {
            Ok(copy) => {
                s.keys.insert(
                    *id,
                    CachedKey {
                        token: entry.token,
                        copy: Some(copy),
                    },
                );
                Ok(Some(copy))
            }
            Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => Ok(None),
            Err(e) => Err(self.pool.fail(s, e, "C_CopyObject", false)),
        }
    }

    /// Runs `op` with the handle of key `id`, retrying once with a fresh lookup if the
    /// cached handle went stale. `site` and `decrypting` go to `SessionPool::fail`, which
    /// classifies a failure of `op`.
    pub(super) fn with_key<T>(
        &self,
        id: &ObjectId,
        usage: Usage,
        site: &'static str,
        decrypting: bool,
        mut op: impl FnMut(&Session, ObjectHandle) -> cryptoki::error::Result<T>,
    ) -> Result<T> {
        let mut guard = self.pool.checkout()?;
        let s = guard.get()?;
        for _attempt in 0..2 {
            let Some(handle) = self.handle_for(s, id, usage)? else {
                s.purge(id);
                continue;
            };
            match op(&s.session, handle) {
                Ok(v) => return Ok(v),
                Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => {
                    tracing::debug!(key = %id, "stale PKCS#11 handle; looking the key up again");
                    s.purge(id);
                }
                Err(e) => return Err(self.pool.fail(s, e, site, decrypting)),
            }
        }
        Err(HsmError::ObjectNotFound)
    }
}
