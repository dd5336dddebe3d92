//! The PKCS#11 implementation of [`Hsm`], on `cryptoki`.
//!
//! Owns: loading the module, `C_Initialize`/`C_Finalize`, selecting the token by label, a
//! pool of long-lived logged-in sessions, per-session object-handle caches (and optional
//! session copies of AES keys), classification of PKCS#11 return values, and reconnection
//! after an outage. Nothing outside this module sees a `cryptoki` type.
//!
//! # Invariants
//! - **One live [`Pkcs11Hsm`] per module per process.** `C_Initialize` is process-global
//!   for a given module: a second `Pkcs11Hsm` (or a [`crate::softhsm`] helper) on the same
//!   module while one is live fails with [`HsmError::Module`] ("already initialised"), and
//!   dropping a `Pkcs11Hsm` calls `C_Finalize`, which would pull the rug from under any
//!   other user of the module in this process.
//! - The token is found **by label**, on every (re)connect; slot ids are never stored
//!   across a reconnect (SoftHSM renumbers slots, network HSMs re-enumerate them).
//! - Each session has exactly one owner at a time: it is checked out of the pool
//!   (`Mutex<Pool>` + `Condvar`), used by one thread, and returned. `cryptoki::Session` is
//!   `Send` but not `Sync`, which the type system enforces.
//! - Sessions are never closed one by one while the pool lives (closing the last session
//!   of an application logs it out); they go away all together with `C_Finalize`, at a
//!   reconnect or when the `Pkcs11Hsm` is dropped. Sessions are opened "no close on drop",
//!   so a stale session object can never close a newer session that happens to reuse its
//!   handle number.
//! - Object handles live only in the cache of the session that found them and are never
//!   reused across a reconnect (every reconnect bumps the pool generation and starts with
//!   empty caches). Objects are always found again by `CKA_ID` (token objects only:
//!   `CKA_TOKEN = true`, so session copies, which share the `CKA_ID`, are never mistaken
//!   for the token object).
//! - With `session_key_copies`, the first GCM use of an AES key in a session makes a
//!   `C_CopyObject` of the token key with `CKA_TOKEN = false` (it stays sensitive and
//!   non-extractable). [`Hsm::destroy_key`] and [`Hsm::forget_key`] first collect **every**
//!   pooled session (no operation in flight), destroy the copies and drop the cached
//!   handles in each, then (`destroy_key` only) destroy the token object, then sweep any
//!   session object left with that `CKA_ID`. If the sessions cannot be collected in time, the pool
//!   is torn down instead (marked down), which destroys all copies with `C_Finalize`.
//! - A stale handle (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`) drops the cache
//!   entry and retries the lookup once; an object that is gone is
//!   [`HsmError::ObjectNotFound`].
//! - Outage: `CKR_DEVICE_REMOVED`, `CKR_DEVICE_ERROR`, `CKR_SESSION_HANDLE_INVALID`,
//!   `CKR_SESSION_CLOSED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`,
//!   `CKR_SLOT_ID_INVALID`, `CKR_CRYPTOKI_NOT_INITIALIZED` and `CKR_USER_NOT_LOGGED_IN`
//!   mark the HSM down (the pool generation in force is retired); so does `CKR_OPERATION_ACTIVE` (a wedged session
//!   cannot be closed alone). `CKR_GENERAL_ERROR` and `CKR_FUNCTION_FAILED` are
//!   ambiguous (SoftHSM returns `CKR_GENERAL_ERROR` from `C_Decrypt` for a GCM tag
//!   mismatch): the session is probed with `C_GetSessionInfo`; if the probe fails, the HSM
//!   is down, otherwise a `C_Decrypt` failure is [`HsmError::AuthenticationFailed`] and any
//!   other failure is [`HsmError::Pkcs11`]. So a forged ciphertext can never take the HSM
//!   "down".
//! - While down, every call fails fast with [`HsmError::Unavailable`] without waiting,
//!   except that at most one caller per `reconnect_interval` (a `try_lock`, nobody waits
//!   for it) reconnects: waits (bounded) until no session is in use, `C_Finalize`s and
//!   drops the old context, loads and `C_Initialize`s the module afresh (p11-kit's client
//!   only sees a restarted server after a full finalize/initialize: before that even
//!   `C_GetSlotList` keeps returning `CKR_DEVICE_ERROR`), finds the token by label, opens
//!   the sessions and logs in. `C_Finalize` is never called while a PKCS#11 call is in
//!   flight.
//! - Through p11-kit (`p11-kit-client.so` + `p11-kit server`), observed with Debian 12's
//!   p11-kit 0.24.1: a dead server makes every function return `CKR_DEVICE_ERROR` within
//!   microseconds; with the server still down, a fresh `C_Initialize` succeeds and shows
//!   no slot (so the reconnect ends in "token not found", quickly); and p11-kit 0.24's RPC
//!   cannot carry `CK_GCM_PARAMS` (`C_EncryptInit` with `CKM_AES_GCM` answers
//!   `CKR_MECHANISM_INVALID`), so GCM needs a newer p11-kit or a direct module.
//! - A call stuck inside the module (a hung network HSM) cannot be interrupted: other
//!   callers give up after [`SESSION_WAIT`] when no session is free, and reconnects,
//!   `destroy_key` and `forget_key` wait at most [`DRAIN_WAIT`] for sessions in use.
//! - `generate_key` refuses an existing `CKA_ID` (checked just before `C_GenerateKey`;
//!   ids are random 128-bit values, and a lookup that finds two token objects with one
//!   `CKA_ID` fails rather than pick one).
//! - Errors name the PKCS#11 function that failed. The PIN is kept in a `SecretString`,
//!   exposed only at `C_Login`, and appears in no error, log line or `Debug` output.
//! - `Drop` never panics: failures are logged with `tracing`.
//!
//! Must not import anything from the rest of Arca (this crate has no dependency on it).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use zeroize::Zeroizing;

/// The PIN type, also reachable here for callers that configure [`Pkcs11Config`].
pub use crate::AuthPin;
use crate::{Hsm, HsmError, KeyAttributes, KeyKind, ObjectId, Result, GCM_IV_LEN, GCM_TAG_LEN};

/// How long a caller waits for a free session before giving up with
/// [`HsmError::Unavailable`] (all sessions busy: the HSM is hung or badly overloaded).
pub const SESSION_WAIT: Duration = Duration::from_secs(5);

/// How long `destroy_key`, `forget_key` and a reconnect wait for in-flight operations to
/// hand their sessions back.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Configuration of [`Pkcs11Hsm`]. `Debug` redacts the PIN; no `Clone` (the PIN would
/// be copied), build one per `open`.
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, `p11-kit-client.so`, a vendor's).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token (the token is always selected by label, never by slot).
    pub token_label: String,
    /// The user PIN (`C_Login` as `CKU_USER`).
    pub pin: AuthPin,
    /// Number of pooled sessions, at least 1. On SoftHSM more than one thread costs
    /// throughput (its internal locks); a network HSM gains from several.
    pub sessions: usize,
    /// Use session copies (`CKA_TOKEN = false`) of AES keys for GCM (about 2x faster on
    /// SoftHSM, which re-reads token key files on every operation).
    pub session_key_copies: bool,
    /// Minimum time between two reconnect attempts while the HSM is down.
    pub reconnect_interval: Duration,
}

impl Pkcs11Config {
    /// A configuration with one session, session copies on, and a one-second reconnect
    /// interval.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: AuthPin) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            sessions: 1,
            session_key_copies: true,
            reconnect_interval: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"[REDACTED]")
            .field("sessions", &self.sessions)
            .field("session_key_copies", &self.session_key_copies)
            .field("reconnect_interval", &self.reconnect_interval)
            .finish()
    }
}

/// What a key handle is wanted for (decides whether a session copy is used).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Usage {
    /// AES-GCM encrypt/decrypt: the session copy when copies are on.
    Gcm,
    /// Anything else: the token object itself.
    Token,
}

/// Cached handles of one key in one session.
#[derive(Clone, Copy)]
struct CachedKey {
    token: ObjectHandle,
    copy: Option<ObjectHandle>,
}

/// A logged-in session with its handle cache.
struct PooledSession {
    session: Session,
    generation: u64,
    keys: HashMap<ObjectId, CachedKey>,
}

impl PooledSession {
    /// Drops the cache entry of `id` and destroys its session copy, if any (best effort:
    /// the copy may already be gone, and a dead session takes its copies with it).
    fn purge(&mut self, id: &ObjectId) {
        if let Some(entry) = self.keys.remove(id) {
            if let Some(copy) = entry.copy {
                match self.session.destroy_object(copy) {
                    Ok(()) => {}
                    Err(CkError::Pkcs11(
                        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                        _,
                    )) => {}
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

/// The session pool. Guarded by `Pkcs11Hsm::pool`.
struct Pool {
    /// The initialised module; `None` between a failed reconnect and the next one.
    ctx: Option<Pkcs11>,
    idle: Vec<PooledSession>,
    /// Sessions currently owned by a caller (or by an exclusive section).
    checked_out: usize,
    /// Bumped at every successful (re)connect; sessions of an older generation are
    /// discarded when handed back.
    generation: u64,
    /// The HSM is unavailable: calls fail fast until a reconnect succeeds.
    down: bool,
    /// An exclusive section (destroy/forget) is collecting or holding all sessions.
    exclusive: bool,
    /// Threads blocked on `idle_cv` / `drain_cv` (so the hot path signals only when
    /// somebody waits: a condvar notification is a system call).
    idle_waiters: usize,
    drain_waiters: usize,
}

/// Rate limit of reconnect attempts.
struct ReconnectGate {
    last_attempt: Option<Instant>,
}

/// An [`Hsm`] on a PKCS#11 token, with a session pool and automatic reconnection.
///
/// Only one `Pkcs11Hsm` per module may be live in a process at a time (see the module
/// docs). For SoftHSM, `SOFTHSM2_CONF` must be set in the environment before
/// [`Pkcs11Hsm::open`] (SoftHSM reads it in `C_Initialize`).
pub struct Pkcs11Hsm {
    module: PathBuf,
    label: String,
    pin: AuthPin,
    sessions: usize,
    copies: bool,
    reconnect_interval: Duration,
    pool: Mutex<Pool>,
    /// Signalled when a session is handed back or the pool changes state.
    idle_cv: Condvar,
    /// Signalled when `checked_out` drops to zero.
    drain_cv: Condvar,
    gate: Mutex<ReconnectGate>,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.module)
            .field("token_label", &self.label)
            .field("sessions", &self.sessions)
            .field("session_key_copies", &self.copies)
            .finish_non_exhaustive()
    }
}

/// A session checked out of the pool; handed back on drop.
struct SessionGuard<'a> {
    hsm: &'a Pkcs11Hsm,
    inner: Option<PooledSession>,
}

impl SessionGuard<'_> {
    fn get(&mut self) -> Result<&mut PooledSession> {
        self.inner.as_mut().ok_or(HsmError::Unavailable {
            function: "session pool",
            detail: "session already handed back".into(),
        })
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.inner.take() {
            self.hsm.checkin(vec![s], false);
        }
    }
}

impl Pkcs11Hsm {
    /// Loads the module, `C_Initialize`s it (OS locking), finds the token by label, opens
    /// `cfg.sessions` read-write sessions and logs in as the user once.
    ///
    /// Fails with [`HsmError::Module`] (module cannot be loaded or initialised, or is
    /// already initialised in this process), [`HsmError::TokenNotFound`],
    /// [`HsmError::LoginRefused`], or [`HsmError::InvalidInput`] (`sessions == 0`).
    pub fn open(cfg: Pkcs11Config) -> Result<Self> {
        if cfg.sessions == 0 {
            return Err(HsmError::InvalidInput("sessions must be at least 1"));
        }
        let (ctx, sessions) =
            connect(&cfg.module, &cfg.token_label, &cfg.pin, cfg.sessions, false)?;
        let generation = 1;
        let idle = sessions
            .into_iter()
            .map(|session| PooledSession {
                session,
                generation,
                keys: HashMap::new(),
            })
            .collect();
        tracing::info!(
            module = %cfg.module.display(),
            token = %cfg.token_label,
            sessions = cfg.sessions,
            session_key_copies = cfg.session_key_copies,
            "PKCS#11 token opened"
        );
        Ok(Pkcs11Hsm {
            module: cfg.module,
            label: cfg.token_label,
            pin: cfg.pin,
            sessions: cfg.sessions,
            copies: cfg.session_key_copies,
            reconnect_interval: cfg.reconnect_interval,
            pool: Mutex::new(Pool {
                ctx: Some(ctx),
                idle,
                checked_out: 0,
                generation,
                down: false,
                exclusive: false,
                idle_waiters: 0,
                drain_waiters: 0,
            }),
            idle_cv: Condvar::new(),
            drain_cv: Condvar::new(),
            gate: Mutex::new(ReconnectGate { last_attempt: None }),
        })
    }

    /// Number of successful connects so far (1 after `open`, +1 per reconnect).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Whether the HSM is currently considered unavailable (a reconnect is pending).
    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    /// Diagnostic: how many session objects (copies) with this `CKA_ID` this process can
    /// see on the token. Session objects are visible to every session of the application,
    /// so one session suffices. After [`Hsm::destroy_key`] or [`Hsm::forget_key`] this is 0.
    pub fn session_copy_count(&self, id: &ObjectId) -> Result<usize> {
        let mut guard = self.checkout()?;
        let s = guard.get()?;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(false),
            Attribute::Id(id.0.to_vec()),
        ];
        match s.session.find_objects(&template) {
            Ok(found) => Ok(found.len()),
            Err(e) => Err(self.fail(s, e, "C_FindObjects", false)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one session out of the pool. Fails fast while the HSM is down, unless this
    /// caller gets to reconnect (rate-limited) and the reconnect succeeds.
    fn checkout(&self) -> Result<SessionGuard<'_>> {
        let mut reconnected = false;
        loop {
            {
                let mut pool = self.lock();
                let deadline = Instant::now() + SESSION_WAIT;
                while !pool.down {
                    if !pool.exclusive {
                        if let Some(s) = pool.idle.pop() {
                            pool.checked_out += 1;
                            return Ok(SessionGuard {
                                hsm: self,
                                inner: Some(s),
                            });
                        }
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(HsmError::Unavailable {
                            function: "session pool",
                            detail: format!(
                                "no free session within {}s (HSM hung or overloaded)",
                                SESSION_WAIT.as_secs()
                            ),
                        });
                    }
                    pool = self.wait_idle(pool, deadline - now);
                }
            }
            if reconnected {
                return Err(down_error());
            }
            self.try_reconnect()?;
            reconnected = true;
        }
    }

    /// Hands sessions back. Sessions of a retired generation, or any while down, are
    /// discarded without `C_CloseSession` (they die with `C_Finalize`).
    fn checkin(&self, sessions: Vec<PooledSession>, end_exclusive: bool) {
        let mut pool = self.lock();
        pool.checked_out = pool.checked_out.saturating_sub(sessions.len());
        if end_exclusive {
            pool.exclusive = false;
        }
        let current = pool.generation;
        let keep = !pool.down;
        let mut returned = 0;
        for s in sessions {
            if keep && s.generation == current {
                pool.idle.push(s);
                returned += 1;
            }
        }
        if pool.checked_out == 0 && pool.drain_waiters > 0 {
            self.drain_cv.notify_all();
        }
        if pool.idle_waiters > 0 {
            if end_exclusive || returned > 1 {
                self.idle_cv.notify_all();
            } else if returned == 1 {
                self.idle_cv.notify_one();
            }
        }
    }

    /// Waits on `idle_cv` (a session handed back, or the pool changed state).
    fn wait_idle<'a>(
        &self,
        mut pool: MutexGuard<'a, Pool>,
        timeout: Duration,
    ) -> MutexGuard<'a, Pool> {
        pool.idle_waiters += 1;
        let mut pool = self
            .idle_cv
            .wait_timeout(pool, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        pool.idle_waiters -= 1;
        pool
    }

    /// Waits on `drain_cv` (`checked_out` dropped to zero, or the HSM went down).
    fn wait_drain<'a>(
        &self,
        mut pool: MutexGuard<'a, Pool>,
        timeout: Duration,
    ) -> MutexGuard<'a, Pool> {
        pool.drain_waiters += 1;
        let mut pool = self
            .drain_cv
            .wait_timeout(pool, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        pool.drain_waiters -= 1;
        pool
    }

    /// Marks the HSM down, if `generation` is still the one in force.
    fn mark_down(&self, generation: u64, function: &'static str, detail: &str) {
        let mut pool = self.lock();
        if pool.generation != generation || pool.down {
            return;
        }
        pool.down = true;
        pool.idle.clear();
        tracing::warn!(
            function,
            detail,
            token = %self.label,
            "HSM unavailable; calls fail until a reconnect succeeds"
        );
        self.idle_cv.notify_all();
        self.drain_cv.notify_all();
    }

    /// Reconnects if this caller is the one allowed to now: nobody else is reconnecting
    /// and the last attempt is at least `reconnect_interval` old. Never waits for another
    /// caller's attempt.
    fn try_reconnect(&self) -> Result<()> {
        let mut gate = match self.gate.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(HsmError::Unavailable {
                    function: "reconnect",
                    detail: "HSM down; another caller is reconnecting".into(),
                })
            }
        };
        if let Some(last) = gate.last_attempt {
            if last.elapsed() < self.reconnect_interval {
                return Err(down_error());
            }
        }
        let old_ctx = {
            let mut pool = self.lock();
            if !pool.down {
                return Ok(());
            }
            gate.last_attempt = Some(Instant::now());
            let deadline = Instant::now() + DRAIN_WAIT;
            while pool.checked_out > 0 {
                let now = Instant::now();
                if now >= deadline {
                    return Err(HsmError::Unavailable {
                        function: "reconnect",
                        detail: "HSM down; PKCS#11 calls still in flight".into(),
                    });
                }
                pool = self.wait_drain(pool, deadline - now);
            }
            pool.idle.clear();
            pool.ctx.take()
        };
        // No session of the old context exists any more: finalizing is safe.
        if let Some(ctx) = old_ctx {
            if let Err(e) = ctx.finalize() {
                tracing::debug!(error = %describe(&e), "C_Finalize of the lost PKCS#11 context failed");
            }
        }
        match connect(&self.module, &self.label, &self.pin, self.sessions, true) {
            Ok((ctx, sessions)) => {
                let mut pool = self.lock();
                pool.generation += 1;
                let generation = pool.generation;
                pool.idle = sessions
                    .into_iter()
                    .map(|session| PooledSession {
                        session,
                        generation,
                        keys: HashMap::new(),
                    })
                    .collect();
                pool.ctx = Some(ctx);
                pool.down = false;
                self.idle_cv.notify_all();
                tracing::info!(token = %self.label, generation, "HSM reconnected");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(token = %self.label, error = %e, "HSM reconnect failed");
                Err(match e {
                    e @ HsmError::Unavailable { .. } => e,
                    other => HsmError::Unavailable {
                        function: "reconnect",
                        detail: other.to_string(),
                    },
                })
            }
        }
    }

    /// Classifies a failed call on session `s` (see the module docs).
    fn fail(
        &self,
        s: &PooledSession,
        e: CkError,
        site: &'static str,
        decrypting: bool,
    ) -> HsmError {
        let (rv, function) = match e {
            CkError::Pkcs11(rv, f) => (rv, fn_name(f, site)),
            other => {
                return HsmError::Pkcs11 {
                    function: site,
                    detail: other.to_string(),
                }
            }
        };
        let detail = ckr_name(rv);
        if is_outage(rv) {
            self.mark_down(s.generation, function, &detail);
            return HsmError::Unavailable { function, detail };
        }
        if rv == RvError::OperationActive {
            // A half-finished operation wedged this session; it cannot be closed alone
            // (it may be the last one), so the whole pool is rebuilt.
            self.mark_down(s.generation, function, &detail);
            return HsmError::Unavailable { function, detail };
        }
        if decrypting
            && matches!(
                rv,
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange
            )
        {
            return HsmError::AuthenticationFailed;
        }
        if matches!(rv, RvError::GeneralError | RvError::FunctionFailed) {
            // Ambiguous: a dead device, or (SoftHSM) a GCM tag mismatch. Ask the session.
            return match s.session.get_session_info() {
                Ok(info) if logged_in(info.session_state()) => {
                    if decrypting && function == "C_Decrypt" {
                        HsmError::AuthenticationFailed
                    } else {
                        HsmError::Pkcs11 { function, detail }
                    }
                }
                Ok(_) => {
                    self.mark_down(s.generation, function, "session no longer logged in");
                    HsmError::Unavailable {
                        function,
                        detail: format!("{detail}; session no longer logged in"),
                    }
                }
                Err(probe) => {
                    let probe = describe(&probe);
                    self.mark_down(s.generation, function, &probe);
                    HsmError::Unavailable {
                        function,
                        detail: format!("{detail}; session probe: {probe}"),
                    }
                }
            };
        }
        HsmError::Pkcs11 { function, detail }
    }

    /// Finds the token object with this `CKA_ID` (never a session copy).
    ///
    /// SoftHSM's `C_CopyObject` first copies every attribute of the original, `CKA_TOKEN
    /// = true` included, and applies the template (`CKA_TOKEN = false`) after: a search
    /// by another session in between sees the copy in the making as a second token
    /// object (observed with four sessions copying one key at once). So two matches are
    /// looked for again, a few times, before they count as two token objects sharing
    /// one `CKA_ID`, which is refused rather than one of them picked.
    fn find_token_object(&self, s: &PooledSession, id: &ObjectId) -> Result<Option<ObjectHandle>> {
        const LOOKS: u32 = 4;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Id(id.0.to_vec()),
        ];
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
                Err(e) => return Err(self.fail(s, e, "C_FindObjects", false)),
            }
        }
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
            Err(e) => Err(self.fail(s, e, "C_CopyObject", false)),
        }
    }

    /// Runs `op` with the handle of key `id`, retrying once with a fresh lookup if the
    /// cached handle went stale.
    fn with_key<T>(
        &self,
        id: &ObjectId,
        usage: Usage,
        site: &'static str,
        decrypting: bool,
        mut op: impl FnMut(&Session, ObjectHandle) -> cryptoki::error::Result<T>,
    ) -> Result<T> {
        let mut guard = self.checkout()?;
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
                Err(e) => return Err(self.fail(s, e, site, decrypting)),
            }
        }
        Err(HsmError::ObjectNotFound)
    }

    /// Runs `f` with every pooled session in hand (no operation in flight), then hands
    /// them back. Used where a change must reach every session's cache.
    fn exclusive<T>(&self, f: impl FnOnce(&mut [PooledSession]) -> Result<T>) -> Result<T> {
        let mut sessions = {
            let mut pool = self.lock();
            let deadline = Instant::now() + DRAIN_WAIT;
            // Wait for any other exclusive section to finish, then claim the pool.
            loop {
                if pool.down {
                    return Err(down_error());
                }
                if !pool.exclusive {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(HsmError::Unavailable {
                        function: "session pool",
                        detail: "timed out waiting for another destroy/forget".into(),
                    });
                }
                pool = self.wait_idle(pool, deadline - now);
            }
            pool.exclusive = true;
            while pool.checked_out > 0 && !pool.down {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                pool = self.wait_drain(pool, deadline - now);
            }
            if pool.down || pool.checked_out > 0 {
                let timed_out = !pool.down;
                pool.exclusive = false;
                self.idle_cv.notify_all();
                drop(pool);
                if timed_out {
                    // Cannot reach every session's cache: tear the pool down instead, so
                    // that no stale handle or copy survives (C_Finalize at reconnect).
                    let generation = self.generation();
                    self.mark_down(
                        generation,
                        "session pool",
                        "sessions not handed back in time",
                    );
                }
                return Err(HsmError::Unavailable {
                    function: "session pool",
                    detail: if timed_out {
                        "sessions not handed back in time; pool torn down".into()
                    } else {
                        "HSM down".into()
                    },
                });
            }
            let sessions = std::mem::take(&mut pool.idle);
            pool.checked_out += sessions.len();
            sessions
        };
        let result = f(&mut sessions);
        self.checkin(sessions, true);
        result
    }

    /// Destroys every session object with this `CKA_ID` still visible (copies the caches
    /// lost track of). Returns how many were destroyed.
    fn sweep_copies(&self, s: &PooledSession, id: &ObjectId) -> Result<usize> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(false),
            Attribute::Id(id.0.to_vec()),
        ];
        let found = s
            .session
            .find_objects(&template)
            .map_err(|e| self.fail(s, e, "C_FindObjects", false))?;
        for h in &found {
            match s.session.destroy_object(*h) {
                Ok(()) => {}
                Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => {}
                Err(e) => return Err(self.fail(s, e, "C_DestroyObject", false)),
            }
        }
        Ok(found.len())
    }
}

impl Drop for Pkcs11Hsm {
    fn drop(&mut self) {
        let pool = self.pool.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Sessions first (no C_CloseSession: C_Finalize closes them all, and their
        // session key copies with them), then the context.
        pool.idle.clear();
        if let Some(ctx) = pool.ctx.take() {
            match ctx.finalize() {
                Ok(()) => tracing::debug!(token = %self.label, "PKCS#11 context finalized"),
                Err(e) => tracing::warn!(error = %describe(&e), "C_Finalize failed"),
            }
        }
    }
}

impl Hsm for Pkcs11Hsm {
    fn generate_key(&self, kind: KeyKind, id: &ObjectId, label: &str) -> Result<()> {
        let mut guard = self.checkout()?;
        let s = guard.get()?;
        if self.find_token_object(s, id)?.is_some() {
            return Err(HsmError::ObjectExists);
        }
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::ValueLen(Ulong::new(32)),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Id(id.0.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let mechanism = match kind {
            KeyKind::Aes256 => {
                template.extend([
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                ]);
                Mechanism::AesKeyGen
            }
            KeyKind::HmacSha256 => {
                template.extend([
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                ]);
                Mechanism::GenericSecretKeyGen
            }
        };
        match s.session.generate_key(&mechanism, &template) {
            Ok(token) => {
                s.keys.insert(*id, CachedKey { token, copy: None });
                tracing::info!(key = %id, ?kind, "HSM key generated");
                Ok(())
            }
            Err(e) => Err(self.fail(s, e, "C_GenerateKey", false)),
        }
    }

    fn key_exists(&self, id: &ObjectId) -> Result<bool> {
        let mut guard = self.checkout()?;
        let s = guard.get()?;
        let exists = self.find_token_object(s, id)?.is_some();
        if !exists {
            // Whatever this session still holds for it is stale.
            s.purge(id);
        }
        Ok(exists)
    }

    fn encrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let out = self.with_key(id, Usage::Gcm, "C_Encrypt", false, |session, key| {
            let mut iv = *iv;
            let params = GcmParams::new(&mut iv, aad, gcm_tag_bits())?;
            session.encrypt(&Mechanism::AesGcm(params), key, plaintext)
        })?;
        if out.len() != plaintext.len() + GCM_TAG_LEN {
            return Err(HsmError::Pkcs11 {
                function: "C_Encrypt",
                detail: format!(
                    "unexpected output length {} for {} bytes of plaintext",
                    out.len(),
                    plaintext.len()
                ),
            });
        }
        Ok(out)
    }

    fn decrypt_aes_gcm(
        &self,
        id: &ObjectId,
        iv: &[u8; GCM_IV_LEN],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        self.with_key(id, Usage::Gcm, "C_Decrypt", true, |session, key| {
            let mut iv = *iv;
            let params = GcmParams::new(&mut iv, aad, gcm_tag_bits())?;
            session
                .decrypt(&Mechanism::AesGcm(params), key, ciphertext_and_tag)
                .map(Zeroizing::new)
        })
    }

    fn hmac_sha256(&self, id: &ObjectId, data: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let mac =
            Zeroizing::new(
                self.with_key(id, Usage::Token, "C_Sign", false, |session, key| {
                    session.sign(&Mechanism::Sha256Hmac, key, data)
                })?,
            );
        if mac.len() != 32 {
            return Err(HsmError::Pkcs11 {
                function: "C_Sign",
                detail: format!("HMAC-SHA256 of {} bytes", mac.len()),
            });
        }
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac);
        Ok(out)
    }

    fn generate_random(&self, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let mut guard = self.checkout()?;
        let s = guard.get()?;
        s.session
            .generate_random_slice(out)
            .map_err(|e| self.fail(s, e, "C_GenerateRandom", false))
    }

    fn destroy_key(&self, id: &ObjectId) -> Result<bool> {
        let destroyed = self.exclusive(|sessions| {
            for s in sessions.iter_mut() {
                s.purge(id);
            }
            let Some(s) = sessions.first() else {
                return Err(down_error());
            };
            let existed = match self.find_token_object(s, id)? {
                Some(handle) => match s.session.destroy_object(handle) {
                    Ok(()) => true,
                    Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => false,
                    Err(e) => return Err(self.fail(s, e, "C_DestroyObject", false)),
                },
                None => false,
            };
            let swept = self.sweep_copies(s, id)?;
            if swept > 0 {
                tracing::warn!(key = %id, swept, "destroyed untracked session copies");
            }
            Ok(existed)
        })?;
        tracing::info!(key = %id, destroyed, "HSM key destroyed");
        Ok(destroyed)
    }

    fn forget_key(&self, id: &ObjectId) {
        let result = self.exclusive(|sessions| {
            for s in sessions.iter_mut() {
                s.purge(id);
            }
            match sessions.first() {
                Some(s) => self.sweep_copies(s, id).map(|_| ()),
                None => Ok(()),
            }
        });
        match result {
            Ok(()) => tracing::debug!(key = %id, "HSM key handles forgotten"),
            // Down: the sessions, their caches and copies die at the reconnect anyway.
            Err(e) => tracing::warn!(key = %id, error = %e, "forget_key incomplete"),
        }
    }

    fn key_attributes(&self, id: &ObjectId) -> Result<KeyAttributes> {
        let attrs = self.with_key(
            id,
            Usage::Token,
            "C_GetAttributeValue",
            false,
            |session, key| {
                session.get_attributes(
                    key,
                    &[
                        AttributeType::Token,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::AlwaysSensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::Label,
                    ],
                )
            },
        )?;
        let missing = |name: &str| HsmError::Pkcs11 {
            function: "C_GetAttributeValue",
            detail: format!("{name} not returned"),
        };
        let (mut token, mut sensitive, mut extractable) = (None, None, None);
        let (mut always_sensitive, mut never_extractable, mut label) = (None, None, None);
        for a in attrs {
            match a {
                Attribute::Token(v) => token = Some(v),
                Attribute::Sensitive(v) => sensitive = Some(v),
                Attribute::Extractable(v) => extractable = Some(v),
                Attribute::AlwaysSensitive(v) => always_sensitive = Some(v),
                Attribute::NeverExtractable(v) => never_extractable = Some(v),
                Attribute::Label(v) => label = Some(String::from_utf8_lossy(&v).into_owned()),
                _ => {}
            }
        }
        Ok(KeyAttributes {
            token: token.ok_or_else(|| missing("CKA_TOKEN"))?,
            sensitive: sensitive.ok_or_else(|| missing("CKA_SENSITIVE"))?,
            extractable: extractable.ok_or_else(|| missing("CKA_EXTRACTABLE"))?,
            always_sensitive: always_sensitive.ok_or_else(|| missing("CKA_ALWAYS_SENSITIVE"))?,
            never_extractable: never_extractable.ok_or_else(|| missing("CKA_NEVER_EXTRACTABLE"))?,
            label: label.unwrap_or_default(),
        })
    }

    fn check(&self) -> Result<()> {
        let mut guard = self.checkout()?;
        let s = guard.get()?;
        match s.session.get_session_info() {
            Ok(info) if logged_in(info.session_state()) => Ok(()),
            Ok(_) => {
                self.mark_down(
                    s.generation,
                    "C_GetSessionInfo",
                    "session no longer logged in",
                );
                Err(HsmError::Unavailable {
                    function: "C_GetSessionInfo",
                    detail: "session no longer logged in".into(),
                })
            }
            Err(e) => Err(self.fail(s, e, "C_GetSessionInfo", false)),
        }
    }
}

/// Loads and initialises the module, finds the token, opens `n` sessions and logs in.
/// On failure the module is finalized again, so a later attempt in this process works.
///
/// `reconnecting`: this `Pkcs11Hsm` owns the module and has just finalized its own
/// context; if the module still says "already initialised" (the `C_Finalize` of the lost
/// context failed), finalize once more and retry. At start-up the same answer means
/// another user of the module in this process, whose context must not be touched.
fn connect(
    module: &Path,
    label: &str,
    pin: &AuthPin,
    n: usize,
    reconnecting: bool,
) -> Result<(Pkcs11, Vec<Session>)> {
    let ctx = match try_initialize(module) {
        Ok(ctx) => ctx,
        Err(InitFailure::AlreadyInitialized(stale)) if reconnecting => {
            tracing::warn!("module still initialised after C_Finalize; finalizing again");
            if let Err(e) = stale.finalize() {
                tracing::debug!(error = %describe(&e), "C_Finalize of a stale initialisation");
            }
            initialize(module)?
        }
        Err(InitFailure::AlreadyInitialized(_)) => return Err(already_initialized(module)),
        Err(InitFailure::Other(e)) => return Err(e),
    };
    match open_sessions(&ctx, label, pin, n) {
        Ok(sessions) => Ok((ctx, sessions)),
        Err(e) => {
            if let Err(fe) = ctx.finalize() {
                tracing::debug!(error = %describe(&fe), "C_Finalize after a failed connect");
            }
            Err(e)
        }
    }
}

/// `Pkcs11::new` + `C_Initialize` with OS locking. Shared with [`crate::softhsm`].
pub(crate) fn initialize(module: &Path) -> Result<Pkcs11> {
    try_initialize(module).map_err(|failure| match failure {
        InitFailure::AlreadyInitialized(_) => already_initialized(module),
        InitFailure::Other(e) => e,
    })
}

fn already_initialized(module: &Path) -> HsmError {
    HsmError::Module {
        path: module.display().to_string(),
        detail: "C_Initialize: CKR_CRYPTOKI_ALREADY_INITIALIZED (only one Pkcs11Hsm per module \
                 may be live in a process)"
            .into(),
    }
}

enum InitFailure {
    /// `CKR_CRYPTOKI_ALREADY_INITIALIZED`, with the (loaded, not initialised by us) module.
    AlreadyInitialized(Pkcs11),
    Other(HsmError),
}

fn try_initialize(module: &Path) -> std::result::Result<Pkcs11, InitFailure> {
    let module_err = |detail: String| {
        InitFailure::Other(HsmError::Module {
            path: module.display().to_string(),
            detail,
        })
    };
    let ctx = Pkcs11::new(module).map_err(|e| module_err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(ctx),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            Err(InitFailure::AlreadyInitialized(ctx))
        }
        Err(CkError::Pkcs11(rv, _)) if is_outage(rv) => {
            Err(InitFailure::Other(HsmError::Unavailable {
                function: "C_Initialize",
                detail: ckr_name(rv),
            }))
        }
        Err(e) => Err(module_err(format!("C_Initialize: {}", describe(&e)))),
    }
}

/// Finds the initialised token labelled `label`. Exactly one must exist.
pub(crate) fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| plain_error(e, "C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        match ctx.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label() == label => found.push(slot),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%slot, error = %describe(&e), "C_GetTokenInfo failed; skipping slot")
            }
        }
    }
    match found.as_slice() {
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
        }),
        [one] => Ok(*one),
        more => Err(HsmError::Pkcs11 {
            function: "C_GetTokenInfo",
            detail: format!("{} tokens labelled {label:?}", more.len()),
        }),
    }
}

fn open_sessions(ctx: &Pkcs11, label: &str, pin: &AuthPin, n: usize) -> Result<Vec<Session>> {
    let slot = find_slot(ctx, label)?;
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(
            ctx.open_rw_session_no_drop(slot)
                .map_err(|e| plain_error(e, "C_OpenSession"))?,
        );
    }
    if let Some(first) = sessions.first() {
        login(first, UserType::User, pin)?;
    }
    Ok(sessions)
}

/// `C_Login`; `CKR_USER_ALREADY_LOGGED_IN` is success. Shared with [`crate::softhsm`].
pub(crate) fn login(session: &Session, user: UserType, pin: &AuthPin) -> Result<()> {
    match session.login(user, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::UserPinNotInitialized
            | RvError::UserTypeInvalid),
            _,
        )) => Err(HsmError::LoginRefused {
            detail: ckr_name(rv),
        }),
        Err(e) => Err(plain_error(e, "C_Login")),
    }
}

/// Maps an error outside a pooled session (start-up, reconnect, SoftHSM helpers): outage
/// codes become [`HsmError::Unavailable`], anything else [`HsmError::Pkcs11`].
pub(crate) fn plain_error(e: CkError, site: &'static str) -> HsmError {
    match e {
        CkError::Pkcs11(rv, f) if is_outage(rv) => HsmError::Unavailable {
            function: fn_name(f, site),
            detail: ckr_name(rv),
        },
        CkError::Pkcs11(rv, f) => HsmError::Pkcs11 {
            function: fn_name(f, site),
            detail: ckr_name(rv),
        },
        other => HsmError::Pkcs11 {
            function: site,
            detail: other.to_string(),
        },
    }
}

/// Return values that mean the device, token, session or login went away. Observed:
/// p11-kit's client returns `CKR_DEVICE_ERROR` from every function (including
/// `C_GetSlotList`) once its server is gone. `CKR_GENERAL_ERROR` and
/// `CKR_FUNCTION_FAILED` are not in this list: they are confirmed by a session probe
/// first (see the module docs).
fn is_outage(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
    )
}

fn is_stale_handle(rv: RvError) -> bool {
    matches!(rv, RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
}

fn logged_in(state: SessionState) -> bool {
    matches!(state, SessionState::RwUser | SessionState::RoUser)
}

fn down_error() -> HsmError {
    HsmError::Unavailable {
        function: "session pool",
        detail: "HSM down; reconnect pending".into(),
    }
}

fn gcm_tag_bits() -> Ulong {
    // cryptoki's GcmParams takes the tag length in bits.
    Ulong::new((GCM_TAG_LEN * 8) as _)
}

/// `CKR_*` name of a return value (`DeviceError` -> `CKR_DEVICE_ERROR`).
pub(crate) fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:08x})"),
        RvError::UnknownErrorCode(v) => format!("CKR_UNKNOWN(0x{v:08x})"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

/// A cryptoki error as "C_Function: CKR_NAME" (or its own text for non-PKCS#11 errors).
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{}: {}", fn_name(*f, "PKCS#11"), ckr_name(*rv)),
        other => other.to_string(),
    }
}

/// The C name of a cryptoki [`Function`]; `fallback` for functions Arca never calls.
pub(crate) fn fn_name(f: Function, fallback: &'static str) -> &'static str {
    match f {
        Function::Initialize => "C_Initialize",
        Function::Finalize => "C_Finalize",
        Function::GetSlotList => "C_GetSlotList",
        Function::GetSlotInfo => "C_GetSlotInfo",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::InitToken => "C_InitToken",
        Function::InitPIN => "C_InitPIN",
        Function::SetPIN => "C_SetPIN",
        Function::OpenSession => "C_OpenSession",
        Function::CloseSession => "C_CloseSession",
        Function::CloseAllSessions => "C_CloseAllSessions",
        Function::GetSessionInfo => "C_GetSessionInfo",
        Function::Login => "C_Login",
        Function::Logout => "C_Logout",
        Function::CopyObject => "C_CopyObject",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsFinal => "C_FindObjectsFinal",
        Function::EncryptInit => "C_EncryptInit",
        Function::Encrypt => "C_Encrypt",
        Function::DecryptInit => "C_DecryptInit",
        Function::Decrypt => "C_Decrypt",
        Function::SignInit => "C_SignInit",
        Function::Sign => "C_Sign",
        Function::GenerateKey => "C_GenerateKey",
        Function::GenerateRandom => "C_GenerateRandom",
        _ => fallback,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(RvError::DeviceError), "CKR_DEVICE_ERROR");
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            ckr_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
        for rv in [
            RvError::DeviceRemoved,
            RvError::DeviceError,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::TokenNotPresent,
            RvError::TokenNotRecognized,
            RvError::SlotIdInvalid,
            RvError::CryptokiNotInitialized,
            RvError::UserNotLoggedIn,
        ] {
            assert!(is_outage(rv), "{rv:?}");
        }
        assert!(!is_outage(RvError::GeneralError));
        assert!(!is_outage(RvError::EncryptedDataInvalid));
    }

    #[test]
    fn config_debug_redacts_pin() {
        let cfg = Pkcs11Config::new("/x.so", "t", AuthPin::from("1234-secret"));
        let s = format!("{cfg:?}");
        assert!(!s.contains("1234-secret"), "{s}");
        assert!(s.contains("REDACTED"));
    }
}
