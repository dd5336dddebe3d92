//! [`KeyEngine`]: runs HSM operations on dedicated worker threads and implements the
//! cryptographic side of envelope encryption (generate, wrap, unwrap, rewrap).
//!
//! Invariants:
//! - PKCS#11 calls never run on an async executor thread: each goes to one of `workers`
//!   threads through a bounded queue, and the caller awaits the answer with a timeout, so
//!   a stuck HSM fails requests with `HsmUnavailable` instead of hanging them.
//! - Rewrap decrypts and re-encrypts inside one job: the plaintext never crosses back to
//!   the async side.
//! - IVs and data keys come from the HSM's RNG, in the same job as the encryption.
//! - Any HSM authentication failure on unwrap is reported as the single
//!   [`KeysError::InvalidWrappedKey`].
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_hsm::{Hsm, HsmError, KeyAttributes, KeyKind, ObjectId as HsmObjectId, GCM_IV_LEN};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

mod audit_mac;
mod meta;
mod state_mac;

pub use audit_mac::{AUDIT_MAC_KEY_ID, AUDIT_MAC_KEY_LABEL};
pub use meta::{META_KEY_ID, META_KEY_LABEL};
pub use state_mac::{STATE_MAC_KEY_ID, STATE_MAC_KEY_LABEL};

use super::wrapped::check_plaintext_len;
use super::{version_label, KeyId, KeysError, ObjectId, WrappedKey};
use crate::secret::{Plaintext, DATA_KEY_LEN};

type Job = Box<dyn FnOnce(&dyn Hsm) + Send + 'static>;

/// Tuning of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Worker threads (one HSM call in flight each). SoftHSM is fastest with 1; network
    /// HSMs want more.
    pub workers: usize,
    /// Jobs that may wait for a worker.
    pub queue_depth: usize,
    /// How long a caller waits for the HSM (queueing included) before `HsmUnavailable`.
    pub op_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 1,
            queue_depth: 4096,
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// The HSM side of Arca's key operations.
///
/// Dropping the engine closes the queue and joins the workers, so the HSM (and its
/// PKCS#11 module) is released before the process exits, never under a running call.
pub struct KeyEngine {
    tx: Option<mpsc::Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The HSM itself, for the one call that must not wait for a worker
    /// ([`Self::reset_sessions`]).
    hsm: Arc<dyn Hsm>,
    available: Arc<AtomicBool>,
    /// Set once the HSM refused the login (on a reconnect): the engine is then useless
    /// and the service seals itself (`service::Context::engine`).
    refused: Arc<AtomicBool>,
    op_timeout: Duration,
}

impl KeyEngine {
    /// Starts the worker threads. They stop when the engine is dropped.
    pub fn start(hsm: Arc<dyn Hsm>, cfg: &EngineConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>(cfg.queue_depth.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(cfg.workers.max(1));
        for i in 0..cfg.workers.max(1) {
            let rx = Arc::clone(&rx);
            let hsm = Arc::clone(&hsm);
            let handle = std::thread::Builder::new()
                .name(format!("arca-hsm-{i}"))
                .spawn(move || loop {
                    // Holding the lock while waiting is fine: idle workers queue on it.
                    let job = match rx.lock() {
                        Ok(mut guard) => guard.blocking_recv(),
                        Err(_) => None,
                    };
                    match job {
                        Some(job) => {
                            let in_use = &crate::metrics::global().hsm_sessions_in_use;
                            in_use.fetch_add(1, Ordering::Relaxed);
                            // A panic inside a job (in the PKCS#11 module's bindings, say)
                            // fails that call only: its caller sees its reply channel
                            // dropped, and this worker goes on serving.
                            let hsm = hsm.as_ref();
                            let done =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                                    job(hsm)
                                }));
                            in_use.fetch_sub(1, Ordering::Relaxed);
                            if done.is_err() {
                                tracing::error!("an HSM call panicked; the call failed");
                            }
                        }
                        None => break,
                    }
                })?;
            workers.push(handle);
        }
        Ok(KeyEngine {
            tx: Some(tx),
            workers,
            hsm,
            available: Arc::new(AtomicBool::new(true)),
            refused: Arc::new(AtomicBool::new(false)),
            op_timeout: cfg.op_timeout,
        })
    }

    /// Whether the HSM refused the login (the PIN was wiped; no call will succeed).
    pub fn login_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether the last HSM call found the HSM reachable.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Runs `f` on a worker thread and awaits its result.
    async fn run<R, F>(&self, f: F) -> Result<R, KeysError>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Hsm) -> Result<R, KeysError> + Send + 'static,
    {
        self.run_or_undo(f, |_, _| {}).await
    }

    /// Runs `f` on a worker thread and awaits its result. A job whose caller has already
    /// given up (timed out) is skipped; if the caller gives up while `f` runs, `undo`
    /// gets the result on the worker thread (e.g. to destroy an object nobody will record).
    async fn run_or_undo<R, F, U>(&self, f: F, undo: U) -> Result<R, KeysError>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Hsm) -> Result<R, KeysError> + Send + 'static,
        U: FnOnce(&dyn Hsm, R) + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<R, KeysError>>();
        let available = Arc::clone(&self.available);
        let refused = Arc::clone(&self.refused);
        let job: Job = Box::new(move |hsm| {
            if reply_tx.is_closed() {
                return;
            }
            let result = f(hsm);
            let down = matches!(
                result,
                Err(KeysError::HsmUnavailable(_) | KeysError::LoginRefused)
            );
            available.store(!down, Ordering::Relaxed);
            if matches!(result, Err(KeysError::LoginRefused)) {
                refused.store(true, Ordering::Relaxed);
            }
            // A result nobody waits for is undone; any plaintext in it is zeroized on drop.
            if let Err(Ok(orphan)) = reply_tx.send(result) {
                undo(hsm, orphan);
            }
        });
        let call = async {
            self.tx
                .as_ref()
                .ok_or(KeysError::HsmUnavailable(None))?
                .send(job)
                .await
                .map_err(|_| KeysError::HsmUnavailable(None))?;
            reply_rx
                .await
                .map_err(|_| KeysError::HsmUnavailable(None))?
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.op_timeout, call).await;
        let m = crate::metrics::global();
        m.hsm_latency.observe(started.elapsed());
        if !matches!(result, Ok(Ok(_)) | Ok(Err(KeysError::InvalidWrappedKey))) {
            m.hsm_errors.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.op_timeout.as_millis() as u64,
                    "HSM call timed out"
                );
                Err(KeysError::HsmUnavailable(None))
            }
        }
    }

    /// Random bytes from the HSM.
    pub async fn random<const N: usize>(&self) -> Result<[u8; N], KeysError> {
        self.run(|hsm| {
            let mut out = [0u8; N];
            hsm.generate_random(&mut out).map_err(hsm_err)?;
            Ok(out)
        })
        .await
    }

    /// Creates the HSM object of a key version (AES-256, non-extractable) under a fresh
    /// random `CKA_ID`, and returns that id.
    pub async fn create_version_object(
        &self,
        key: KeyId,
        version: u32,
    ) -> Result<ObjectId, KeysError> {
        self.run_or_undo(
            move |hsm| {
                let mut id = [0u8; 16];
                hsm.generate_random(&mut id).map_err(hsm_err)?;
                let id = HsmObjectId(id);
                hsm.generate_key(KeyKind::Aes256, &id, &version_label(&key, version))
                    .map_err(hsm_err)?;
                Ok(ObjectId::from(id))
            },
            |hsm, id| {
                if let Err(e) = hsm.destroy_key(&HsmObjectId::from(id)) {
                    tracing::warn!(error = %e, "could not remove an HSM object created for a caller that gave up");
                }
            },
        )
        .await
    }

    /// Generates a data key from the HSM's RNG and wraps it under `object`.
    pub async fn generate_data_key(
        &self,
        key: KeyId,
        version: u32,
        object: ObjectId,
        canonical_context: Vec<u8>,
    ) -> Result<(Plaintext, WrappedKey), KeysError> {
        let object = HsmObjectId::from(object);
        self.run(move |hsm| {
            let mut rnd = Zeroizing::new([0u8; DATA_KEY_LEN + GCM_IV_LEN]);
            hsm.generate_random(rnd.as_mut()).map_err(hsm_err)?;
            let plaintext = Plaintext::from_slice(&rnd[..DATA_KEY_LEN]);
            let mut iv = [0u8; GCM_IV_LEN];
            iv.copy_from_slice(&rnd[DATA_KEY_LEN..]);
            let wrapped = encrypt(
                hsm,
                key,
                version,
                &object,
                iv,
                &canonical_context,
                &plaintext,
            )?;
            Ok((plaintext, wrapped))
        })
        .await
    }

    /// Wraps caller-supplied key material (16 to 64 bytes) under `object`.
    pub async fn wrap(
        &self,
        key: KeyId,
        version: u32,
        object: ObjectId,
        plaintext: Plaintext,
        canonical_context: Vec<u8>,
    ) -> Result<WrappedKey, KeysError> {
        check_plaintext_len(plaintext.len())?;
        let object = HsmObjectId::from(object);
        self.run(move |hsm| {
            let mut iv = [0u8; GCM_IV_LEN];
            hsm.generate_random(&mut iv).map_err(hsm_err)?;
            encrypt(
                hsm,
                key,
                version,
                &object,
                iv,
                &canonical_context,
                &plaintext,
            )
        })
        .await
    }

    /// Unwraps `wrapped` with the version's HSM object `object`.
    pub async fn unwrap(
        &self,
        wrapped: WrappedKey,
        object: ObjectId,
        canonical_context: Vec<u8>,
    ) -> Result<Plaintext, KeysError> {
        let object = HsmObjectId::from(object);
        self.run(move |hsm| decrypt(hsm, &wrapped, &object, &canonical_context))
            .await
    }

    /// Unwraps `wrapped` and wraps the result under `to_object` (the primary version) in
    /// one job: the plaintext stays on the worker thread.
    #[allow(clippy::too_many_arguments)]
    pub async fn rewrap(
        &self,
        wrapped: WrappedKey,
        from_object: ObjectId,
        to_version: u32,
        to_object: ObjectId,
        canonical_context: Vec<u8>,
    ) -> Result<WrappedKey, KeysError> {
        let (from_object, to_object) =
            (HsmObjectId::from(from_object), HsmObjectId::from(to_object));
        self.run(move |hsm| {
            let plaintext = decrypt(hsm, &wrapped, &from_object, &canonical_context)?;
            let mut iv = [0u8; GCM_IV_LEN];
            hsm.generate_random(&mut iv).map_err(hsm_err)?;
            encrypt(
                hsm,
                wrapped.key_id,
                to_version,
                &to_object,
                iv,
                &canonical_context,
                &plaintext,
            )
        })
        .await
    }

    /// Destroys a version's HSM object (and every session copy in this process).
    pub async fn destroy_object(&self, object: ObjectId) -> Result<bool, KeysError> {
        let object = HsmObjectId::from(object);
        self.run(move |hsm| hsm.destroy_key(&object).map_err(hsm_err))
            .await
    }

    /// Drops every handle and session copy of an object this process holds (after
    /// another node destroyed it). `Ok` only when the HSM confirmed that no copy is left
    /// in any pooled session (one exclusive section covers every worker's session).
    pub async fn forget_object(&self, object: ObjectId) -> Result<(), KeysError> {
        let object = HsmObjectId::from(object);
        self.run(move |hsm| hsm.forget_key(&object).map_err(hsm_err))
            .await
    }

    /// Tears down every HSM session of this process (no session copy or handle survives)
    /// and reconnects as after an outage: the last resort when a forget cannot be
    /// completed.
    ///
    /// Not queued behind the workers (they may be the ones stuck in a hung HSM): it runs
    /// on a blocking thread of its own. The old sessions are retired before the call
    /// returns `Ok`, even when the reconnect has to wait for the HSM.
    pub async fn reset_sessions(&self) -> Result<(), KeysError> {
        let hsm = Arc::clone(&self.hsm);
        tokio::task::spawn_blocking(move || hsm.reset_sessions().map_err(hsm_err))
            .await
            .map_err(|_| KeysError::HsmUnavailable(None))?
    }

    /// Whether `object` is the HSM object Arca made for `version` of `key` (its label
    /// names them; a database row cannot change a label). `None`: no such object.
    pub async fn object_is_version(
        &self,
        object: ObjectId,
        key: KeyId,
        version: u32,
    ) -> Result<Option<bool>, KeysError> {
        let id = HsmObjectId::from(object);
        self.run(move |hsm| match hsm.key_attributes(&id) {
            Ok(a) => Ok(Some(a.label == version_label(&key, version))),
            Err(arca_hsm::HsmError::ObjectNotFound) => Ok(None),
            Err(e) => Err(hsm_err(e)),
        })
        .await
    }

    /// Reads back an HSM object's security attributes.
    pub async fn object_attributes(&self, object: ObjectId) -> Result<KeyAttributes, KeysError> {
        let object = HsmObjectId::from(object);
        self.run(move |hsm| hsm.key_attributes(&object).map_err(hsm_err))
            .await
    }

    /// Probes the HSM (and lets it reconnect); updates [`Self::is_available`].
    pub async fn check(&self) -> Result<(), KeysError> {
        self.run(|hsm| hsm.check().map_err(hsm_err)).await
    }
}

impl Drop for KeyEngine {
    fn drop(&mut self) {
        // Closing the queue ends each worker after its current job.
        self.tx.take();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("an HSM worker thread panicked");
            }
        }
    }
}

fn encrypt(
    hsm: &dyn Hsm,
    key: KeyId,
    version: u32,
    object: &HsmObjectId,
    iv: [u8; GCM_IV_LEN],
    canonical_context: &[u8],
    plaintext: &Plaintext,
) -> Result<WrappedKey, KeysError> {
    let aad = WrappedKey::aad(&key, version, canonical_context);
    let ciphertext = hsm
        .encrypt_aes_gcm(object, &iv, &aad, plaintext.expose())
        .map_err(hsm_err)?;
    Ok(WrappedKey {
        key_id: key,
        version,
        iv,
        ciphertext,
    })
}

fn decrypt(
    hsm: &dyn Hsm,
    wrapped: &WrappedKey,
    object: &HsmObjectId,
    canonical_context: &[u8],
) -> Result<Plaintext, KeysError> {
    let aad = WrappedKey::aad(&wrapped.key_id, wrapped.version, canonical_context);
    match hsm.decrypt_aes_gcm(object, &wrapped.iv, &aad, &wrapped.ciphertext) {
        Ok(pt) => Ok(Plaintext::new(pt)),
        Err(HsmError::AuthenticationFailed) => Err(KeysError::InvalidWrappedKey),
        Err(e) => Err(hsm_err(e)),
    }
}

fn hsm_err(e: HsmError) -> KeysError {
    match e {
        HsmError::Unavailable { .. } => KeysError::HsmUnavailable(Some(e)),
        HsmError::ObjectNotFound => KeysError::HsmObjectMissing,
        HsmError::LoginRefused { .. } => KeysError::LoginRefused,
        other => KeysError::Hsm(other),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use arca_hsm::fake::FakeHsm;

    fn engine() -> (Arc<FakeHsm>, KeyEngine) {
        let hsm = Arc::new(FakeHsm::new());
        let engine = KeyEngine::start(hsm.clone(), &EngineConfig::default()).unwrap();
        (hsm, engine)
    }

    #[tokio::test]
    async fn generate_unwrap_rewrap() {
        let (_hsm, e) = engine();
        let key = KeyId([1; 16]);
        let v1 = e.create_version_object(key, 1).await.unwrap();
        let v2 = e.create_version_object(key, 2).await.unwrap();
        let ctx = b"ctx".to_vec();
        let (pt, w) = e.generate_data_key(key, 1, v1, ctx.clone()).await.unwrap();
        assert_eq!(pt.len(), 32);
        let back = e.unwrap(w.clone(), v1, ctx.clone()).await.unwrap();
        assert_eq!(back.expose(), pt.expose());
        assert!(matches!(
            e.unwrap(w.clone(), v1, b"other".to_vec()).await,
            Err(KeysError::InvalidWrappedKey)
        ));
        let w2 = e.rewrap(w, v1, 2, v2, ctx.clone()).await.unwrap();
        assert_eq!(w2.version, 2);
        assert_eq!(e.unwrap(w2, v2, ctx).await.unwrap().expose(), pt.expose());
    }

    #[tokio::test]
    async fn outage_is_unavailable_and_tracked() {
        let (hsm, e) = engine();
        let key = KeyId([2; 16]);
        let v1 = e.create_version_object(key, 1).await.unwrap();
        hsm.set_unavailable(true);
        assert!(matches!(
            e.generate_data_key(key, 1, v1, vec![]).await,
            Err(KeysError::HsmUnavailable(_))
        ));
        assert!(!e.is_available());
        hsm.set_unavailable(false);
        e.check().await.unwrap();
        assert!(e.is_available());
    }

    #[tokio::test]
    async fn wrap_checks_length() {
        let (_hsm, e) = engine();
        let key = KeyId([3; 16]);
        let v1 = e.create_version_object(key, 1).await.unwrap();
        for n in [0usize, 15, 65] {
            assert!(matches!(
                e.wrap(key, 1, v1, Plaintext::from_slice(&vec![1; n]), vec![])
                    .await,
                Err(KeysError::InvalidPlaintextLength)
            ));
        }
        let w = e
            .wrap(key, 1, v1, Plaintext::from_slice(&[7; 64]), vec![])
            .await
            .unwrap();
        assert_eq!(e.unwrap(w, v1, vec![]).await.unwrap().expose(), &[7; 64]);
    }
}
