//! [`AuditSlot`]: what a request's handlers learn for its record (principal, key, context
//! digest).
//!
//! Owns: one request's facts until its record is made.
//!
//! Invariants:
//! - The encryption context enters only as its keyed digest ([`super::DigestKey`]); a
//!   slot made while the HSM is sealed keeps no context at all.
//! - [`AuditSlot::fill`] takes the facts out: a slot fills one record.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::{Arc, Mutex};

use super::keys::DigestKey;
use crate::audit::record::Details;

#[derive(Default)]
struct SlotState {
    principal: String,
    auth_method: String,
    key_name: Option<String>,
    key_version: Option<u32>,
    context_digest: Option<String>,
}

/// What a request's handlers learn for its record (principal, key, context digest).
/// Cloned into the request extensions by the transport; filled by authentication and the
/// handlers; read once when the response is ready.
#[derive(Clone)]
pub struct AuditSlot {
    state: Arc<Mutex<SlotState>>,
    digest: Option<Arc<DigestKey>>,
}

impl AuditSlot {
    /// An empty slot; contexts are digested under `digest` (none while sealed).
    pub(super) fn new(digest: Option<Arc<DigestKey>>) -> Self {
        AuditSlot {
            state: Arc::new(Mutex::new(SlotState::default())),
            digest,
        }
    }

    /// Whether context digests can be made (the HSM is open and the key derived).
    pub fn can_digest(&self) -> bool {
        self.digest.is_some()
    }

    /// The authenticated principal and how it authenticated.
    pub fn principal(&self, name: &str, method: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.principal = name.to_string();
            s.auth_method = method.to_string();
        }
    }

    /// The key (and version) the call is about.
    pub fn key(&self, name: &str, version: Option<u32>) {
        if let Ok(mut s) = self.state.lock() {
            if !name.is_empty() {
                s.key_name = Some(name.to_string());
            }
            if version.is_some() {
                s.key_version = version;
            }
        }
    }

    /// The canonical encryption context: only its keyed digest is kept.
    pub fn context(&self, canonical: &[u8]) {
        if let (Some(d), Ok(mut s)) = (&self.digest, self.state.lock()) {
            s.context_digest = Some(d.digest(canonical));
        }
    }

    /// Fills `details` from the slot.
    pub fn fill(&self, details: &mut Details) {
        if let Ok(mut s) = self.state.lock() {
            if !s.principal.is_empty() {
                details.principal = std::mem::take(&mut s.principal);
                details.auth_method = std::mem::take(&mut s.auth_method);
            }
            details.key_name = s.key_name.take();
            details.key_version = s.key_version.take();
            details.context_digest = s.context_digest.take();
        }
    }
}
