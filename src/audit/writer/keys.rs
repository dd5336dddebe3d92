//! The writer's HSM-derived keys: the context [`DigestKey`] and the data keys that
//! encrypt record details, and how they follow the seal state.
//!
//! Owns: the digest key (shared with [`super::AuditLog`], which hands it to each
//! [`super::AuditLog::context_digest`]), the current data key and its use count, and whether the writer
//! has set these up for an open HSM.
//!
//! Invariants:
//! - Never in clear while the HSM is open: a batch of records gets no key only while the
//!   HSM is sealed ([`KeyState::batch_key`] refuses otherwise), so records wait and calls
//!   fail `UNAVAILABLE` until a data key exists.
//! - A data key is 32 bytes from the HSM's RNG, kept only in this memory and stored
//!   sealed under `arca:meta`; an HSM that cannot seal it gets a key derived from
//!   `arca:audit-mac` instead ([`DERIVED_DEK`]), and an `audit.derived_data_key` record
//!   says so. A new one is made every [`DEK_RECORDS`] encryptions (each counts, stored or
//!   not).
//! - After the HSM seals, the data key is kept for the audit timeout plus [`RETAIN_DEK`]
//!   (and while the carry holds records), so records of calls made while it was open are
//!   encrypted, not written in clear; the digest key is forgotten at once.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::health::within;
use super::AuditConfig;
use crate::audit::chain::DataKey;
use crate::audit::{AuditError, AuditKeys};
use crate::clock::Clock;
use crate::store::AuditStore;

/// Records encrypted under one data key before the writer makes a new one.
const DEK_RECORDS: u64 = 1 << 24;
/// How long after the HSM seals (beyond the audit timeout) the writer keeps its data key
/// for records of calls made before: a call's record is submitted when its handler ends,
/// and a handler waits at most the HSM timeout (5 s by default) for the HSM.
const RETAIN_DEK: Duration = Duration::from_secs(10);

/// Stored in place of a sealed data key that is derived from `arca:audit-mac` (a sealed
/// key starts with a version byte, 0x01, never with this text).
pub const DERIVED_DEK: &[u8] = b"derived:hmac-sha256:arca:audit-mac:v1";

/// What `arca:audit-mac` MACs to derive the data key `id` (34 bytes: no seal input, 40
/// bytes, nor the context-digest label has that length).
pub fn dek_derivation(id: &str) -> Vec<u8> {
    format!("arca-audit-dek-v1:{id}").into_bytes()
}

/// AAD of a sealed data key.
pub fn dek_aad(id: &str) -> Vec<u8> {
    format!("arca-audit-dek:{id}").into_bytes()
}

/// The key of context digests: derived in the HSM (`HMAC(arca:audit-mac, label)`), so
/// every node computes the same digest for the same context, and nobody without the HSM
/// can test a guessed context against a digest.
pub struct DigestKey(Zeroizing<[u8; 32]>);

impl DigestKey {
    const LABEL: &'static [u8] = b"arca-audit-context-digest-v1";

    /// HMAC-SHA256 of a canonical context, hex.
    pub fn digest(&self, canonical: &[u8]) -> String {
        match <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_ref()) {
            Ok(mut m) => {
                m.update(canonical);
                hex::encode(m.finalize().into_bytes())
            }
            Err(_) => String::new(),
        }
    }
}

/// The digest key as the handle and the writer share it (`None` while sealed).
pub(super) type SharedDigest = Arc<RwLock<Option<Arc<DigestKey>>>>;

/// The writer's keys and their state.
pub(super) struct KeyState {
    keys: Arc<dyn AuditKeys>,
    store: Arc<dyn AuditStore>,
    clock: Arc<dyn Clock>,
    /// How long a request waits for its record (the data key is kept that long and
    /// [`RETAIN_DEK`] more after a seal).
    timeout: Duration,
    /// The bound on making a data key.
    commit_timeout: Duration,
    digest: SharedDigest,
    /// Whether the digest key and a data key are set up for the open HSM.
    ready: Arc<AtomicBool>,
    dek: Option<DataKey>,
    dek_used: u64,
    /// Whether the HSM was open at the last [`KeyState::refresh`] that set the keys up.
    open: bool,
    /// After the HSM sealed: until when the data key stays (and longer while the carry
    /// holds records).
    retain_until: Option<Instant>,
}

/// The data key a batch is encrypted under (none while sealed), and its use count.
pub(super) struct BatchKey<'a> {
    pub(super) key: Option<&'a DataKey>,
    used: &'a mut u64,
    records: u64,
}

impl BatchKey<'_> {
    /// Counts the batch's encryptions against the key's bound (every encryption counts,
    /// stored or not; call it once the rows are built, before they reach the store).
    pub(super) fn count(&mut self) {
        *self.used += self.records;
    }
}

impl KeyState {
    /// No keys yet; the HSM is looked at on the first [`KeyState::refresh`].
    pub(super) fn new(
        keys: Arc<dyn AuditKeys>,
        store: Arc<dyn AuditStore>,
        clock: Arc<dyn Clock>,
        cfg: &AuditConfig,
    ) -> Self {
        KeyState {
            keys,
            store,
            clock,
            timeout: cfg.timeout,
            commit_timeout: cfg.commit_timeout,
            digest: Arc::new(RwLock::new(None)),
            ready: Arc::new(AtomicBool::new(false)),
            dek: None,
            dek_used: 0,
            open: false,
            retain_until: None,
        }
    }

    /// The digest key as shared with the handle.
    pub(super) fn shared_digest(&self) -> SharedDigest {
        Arc::clone(&self.digest)
    }

    /// The "keys ready" flag as shared with the handle.
    pub(super) fn shared_ready(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }

    /// Whether the keys are set up for an open HSM (as of the last refresh).
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// Whether the HSM opened since the last refresh.
    pub(super) fn opened_since(&self) -> bool {
        !self.open && self.keys.is_open()
    }

    /// The key for a batch of `records` records: `Unavailable` when there are records
    /// and no key while the HSM is open (a data key not made yet, or the HSM open but its
    /// system keys not set up).
    pub(super) fn batch_key(&mut self, records: usize) -> Result<BatchKey<'_>, AuditError> {
        let key = if self.open || self.retain_until.is_some() {
            self.dek.as_ref()
        } else {
            None
        };
        if key.is_none() && records > 0 && (self.open || self.keys.is_open()) {
            return Err(AuditError::Unavailable);
        }
        Ok(BatchKey {
            records: if key.is_some() { records as u64 } else { 0 },
            key,
            used: &mut self.dek_used,
        })
    }

    /// Follows the seal state: on unseal, makes `arca:audit-mac` if needed, derives the
    /// digest key and makes a data key; on seal, forgets the digest key, and the data key
    /// once it is no longer retained (`carry_empty`: the carry holds no record).
    ///
    /// Returns the id of a new data key that had to be derived (for the writer's
    /// `audit.derived_data_key` record).
    pub(super) async fn refresh(&mut self, carry_empty: bool) -> Option<String> {
        let open = self.keys.is_open();
        if !open {
            self.ready.store(false, Ordering::Relaxed);
            if self.open {
                self.open = false;
                // Records of calls made while the HSM was open may still be queued or
                // carried: they are encrypted under the data key kept for a while, not
                // written in clear.
                self.retain_until = Some(Instant::now() + self.timeout + RETAIN_DEK);
                if let Ok(mut d) = self.digest.write() {
                    *d = None;
                }
            }
            if self
                .retain_until
                .is_some_and(|t| Instant::now() >= t && carry_empty)
            {
                self.retain_until = None;
                self.dek = None;
            }
            return None;
        }
        self.retain_until = None;
        if !self.open {
            if let Err(e) = self.keys.ensure().await {
                tracing::error!(error = %e, "cannot make the HSM system key arca:audit-mac");
                return None;
            }
            match self.keys.mac(DigestKey::LABEL.to_vec()).await {
                Ok(k) => {
                    if let Ok(mut d) = self.digest.write() {
                        *d = Some(Arc::new(DigestKey(k)));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot derive the audit digest key");
                    return None;
                }
            }
            self.open = true;
        }
        let mut derived_id = None;
        if self.dek.is_none() || self.dek_used >= DEK_RECORDS {
            match within(self.commit_timeout, self.new_dek()).await {
                Ok((d, derived)) => {
                    if derived {
                        derived_id = Some(d.id.clone());
                    }
                    self.dek = Some(d);
                    self.dek_used = 0;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot make an audit data key");
                    if self.dek_used >= DEK_RECORDS {
                        // Spent: nothing more is encrypted under it (records wait).
                        self.dek = None;
                    }
                }
            }
        }
        self.ready.store(self.dek.is_some(), Ordering::Relaxed);
        derived_id
    }

    /// A new data key: 32 random bytes from the HSM, stored sealed under `arca:meta`. An
    /// HSM that cannot seal (one reached through a transport that does not carry
    /// AES-GCM parameters, such as some p11-kit remotings) but can MAC gets a key derived
    /// instead, `HMAC(arca:audit-mac, "arca-audit-dek-v1:" || id)`, recorded with the
    /// [`DERIVED_DEK`] mark in place of a sealed key: equally bound to a key that never
    /// leaves the HSM, so that records are never stored in clear while it is open.
    /// Returns the key and whether it was derived.
    async fn new_dek(&self) -> Result<(DataKey, bool), AuditError> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|_| AuditError::Hsm)?;
        let id = hex::encode(raw);
        let key = self.keys.random32().await?;
        let (key, stored, derived) = match self
            .keys
            .seal_meta(dek_aad(&id), Zeroizing::new(key.to_vec()))
            .await
        {
            Ok(sealed) => (key, sealed, false),
            Err(_) => {
                let derived = self.keys.mac(dek_derivation(&id)).await?;
                tracing::warn!(
                    "the HSM cannot seal the audit data key under arca:meta; it is derived from arca:audit-mac instead"
                );
                (derived, DERIVED_DEK.to_vec(), true)
            }
        };
        self.store
            .audit_insert_dek(&id, &stored, self.clock.now_ms())
            .await?;
        Ok((DataKey::new(id, key), derived))
    }
}
