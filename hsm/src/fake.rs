//! An in-memory [`Hsm`] for unit tests of the layers above (feature `fake`).
//!
//! It implements the same contract as the PKCS#11 implementation (the contract suite in
//! `hsm/tests/contract.rs` runs on both): AES-256-GCM with a 128-bit tag appended to the
//! ciphertext, HMAC-SHA256, randomness from the operating system, attributes of a
//! sensitive, never-extractable token object, and [`HsmError::Unavailable`] while an
//! outage is simulated with [`FakeHsm::set_unavailable`].
//!
//! # Invariants
//! - Compiled only with the `fake` feature, which the shipped binary never enables. Key
//!   material lives in process memory here, which is exactly what the real implementation
//!   forbids: this type exists for tests only.
//! - Key material is zeroized when a key is destroyed or the fake dropped; nothing here
//!   implements `Debug` over key material.
//! - Using a key for the other kind's operation fails like SoftHSM does
//!   (`CKR_KEY_FUNCTION_NOT_PERMITTED`), never as an authentication failure.
//!
//! Must not import the PKCS#11 implementation (it links no module) nor anything from the
//! rest of Arca.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{Hsm, HsmError, KeyAttributes, KeyKind, ObjectId, Result, GCM_IV_LEN, GCM_TAG_LEN};

struct FakeKey {
    kind: KeyKind,
    label: String,
    material: Zeroizing<[u8; 32]>,
}

/// An in-memory HSM. Thread-safe; cheap to create.
#[derive(Default)]
pub struct FakeHsm {
    keys: Mutex<HashMap<ObjectId, FakeKey>>,
    unavailable: AtomicBool,
    /// Forgets left to fail ([`FakeHsm::fail_forgets`]).
    forget_failures: AtomicU32,
    /// Forgets that succeeded.
    forgets: AtomicU32,
    /// Calls of `reset_sessions`.
    resets: AtomicU32,
}

impl std::fmt::Debug for FakeHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHsm")
            .field("keys", &self.lock().len())
            .field("unavailable", &self.unavailable.load(Ordering::SeqCst))
            .finish()
    }
}

impl FakeHsm {
    /// An empty, available fake.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates an outage (`true`): every call then fails with
    /// [`HsmError::Unavailable`], until `set_unavailable(false)`. Keys survive.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Inserts a key with known material, for tests that compare against a reference
    /// computation. Fails with [`HsmError::ObjectExists`] like `generate_key`.
    pub fn insert_key(
        &self,
        kind: KeyKind,
        id: &ObjectId,
        label: &str,
        material: [u8; 32],
    ) -> Result<()> {
        self.available()?;
        let mut keys = self.lock();
        if keys.contains_key(id) {
            return Err(HsmError::ObjectExists);
        }
        keys.insert(
            *id,
            FakeKey {
                kind,
                label: label.to_owned(),
                material: Zeroizing::new(material),
            },
        );
        Ok(())
    }

    /// Makes the next `n` calls of `forget_key` fail (as if the HSM did not answer).
    pub fn fail_forgets(&self, n: u32) {
        self.forget_failures.store(n, Ordering::SeqCst);
    }

    /// How many `forget_key` calls succeeded.
    pub fn forget_count(&self) -> u32 {
        self.forgets.load(Ordering::SeqCst)
    }

    /// How many times the sessions were torn down (`reset_sessions`).
    pub fn reset_count(&self) -> u32 {
        self.resets.load(Ordering::SeqCst)
    }

    /// Number of keys held.
    pub fn key_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectId, FakeKey>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn available(&self) -> Result<()> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(HsmError::Unavailable {
                function: "fake",
                detail: "simulated outage".into(),
            })
        } else {
            Ok(())
        }
    }

    /// Runs `f` on the material of key `id`, which must be of `kind`.
    fn with_key<T>(
        &self,
        id: &ObjectId,
        kind: KeyKind,
        function: &'static str,
        f: impl FnOnce(&[u8; 32]) -> Result<T>,
    ) -> Result<T> {
        self.available()?;
        let keys = self.lock();
        let key = keys.get(id).ok_or(HsmError::ObjectNotFound)?;
        if key.kind != kind {
            return Err(HsmError::Pkcs11 {
                function,
                detail: "CKR_KEY_FUNCTION_NOT_PERMITTED".into(),
            });
        }
        f(&key.material)
    }
}

fn os_random(out: &mut [u8]) -> Result<()> {
    getrandom::fill(out).map_err(|e| HsmError::Unavailable {
        function: "getrandom",
        detail: e.to_string(),
    })
}

impl Hsm for FakeHsm {
    fn generate_key(&self, kind: KeyKind, id: &ObjectId, label: &str) -> Result<()> {
        let mut material = Zeroizing::new([0u8; 32]);
        os_random(material.as_mut())?;
        self.insert_key(kind, id, label, *material)
    }

    fn key_exists(&self, id: &ObjectId) -> Result<bool> {
        self.available()?;
        Ok(self.lock().contains_key(id))
    }

    fn encrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        self.with_key(id, KeyKind::Aes256, "C_EncryptInit", |k| {
            let cipher = Aes256Gcm::new(k.into());
            let out = cipher
                .encrypt(
                    Nonce::from_slice(iv),
                    Payload {
                        msg: plaintext,
                        aad,
                    },
                )
                .map_err(|_| HsmError::Pkcs11 {
                    function: "C_Encrypt",
                    detail: "CKR_DATA_LEN_RANGE".into(),
                })?;
            debug_assert_eq!(out.len(), plaintext.len() + GCM_TAG_LEN);
            Ok(out)
        })
    }

    fn decrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.with_key(id, KeyKind::Aes256, "C_DecryptInit", |k| {
            let cipher = Aes256Gcm::new(k.into());
            cipher
                .decrypt(
                    Nonce::from_slice(iv),
                    Payload {
                        msg: ciphertext_and_tag,
                        aad,
                    },
                )
                .map(Zeroizing::new)
                .map_err(|_| HsmError::AuthenticationFailed)
        })
    }

    fn hmac_sha256(&self, id: &ObjectId, data: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        self.with_key(id, KeyKind::HmacSha256, "C_SignInit", |k| {
            let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(k).map_err(|_| {
                HsmError::Pkcs11 {
                    function: "C_SignInit",
                    detail: "CKR_KEY_SIZE_RANGE".into(),
                }
            })?;
            mac.update(data);
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(&mac.finalize().into_bytes());
            Ok(out)
        })
    }

    fn generate_random(&self, out: &mut [u8]) -> Result<()> {
        self.available()?;
        os_random(out)
    }

    fn destroy_key(&self, id: &ObjectId) -> Result<bool> {
        self.available()?;
        // Dropping the FakeKey zeroizes its material.
        Ok(self.lock().remove(id).is_some())
    }

    fn forget_key(&self, _id: &ObjectId) -> Result<()> {
        self.available()?;
        // No handles or session copies to drop; a simulated failure if one is armed.
        let armed = self
            .forget_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if armed.is_ok() {
            return Err(HsmError::Unavailable {
                function: "fake",
                detail: "simulated forget failure".into(),
            });
        }
        self.forgets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn reset_sessions(&self) -> Result<()> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn key_attributes(&self, id: &ObjectId) -> Result<KeyAttributes> {
        self.available()?;
        let keys = self.lock();
        let key = keys.get(id).ok_or(HsmError::ObjectNotFound)?;
        Ok(KeyAttributes {
            token: true,
            sensitive: true,
            extractable: false,
            always_sensitive: true,
            never_extractable: true,
            label: key.label.clone(),
        })
    }

    fn check(&self) -> Result<()> {
        self.available()
    }
}
