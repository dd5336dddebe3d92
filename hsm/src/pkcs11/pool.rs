//! The session pool: the initialised module, a fixed number of long-lived logged-in
//! sessions handed out one caller at a time, outage detection on a failed call, and
//! reconnection after an outage.
//!
//! # Invariants
//! - Each session has exactly one owner at a time: it is checked out of the pool
//!   (`Mutex<PoolState>` + `Condvar`), used by one thread through a [`SessionGuard`], and
//!   handed back when the guard drops.
//! - Sessions are never closed one by one while the pool lives (closing the last session
//!   of an application logs it out); they go away all together with `C_Finalize`, at a
//!   reconnect or when the [`SessionPool`] is dropped. Sessions are opened "no close on
//!   drop", so a stale session object can never close a newer session that happens to
//!   reuse its handle number.
//! - Every successful (re)connect bumps the pool generation and starts with fresh sessions
//!   and empty handle caches; a session of an older generation handed back is discarded.
//! - Outage: a failed call is classified by [`super::error::classify`]. An outage code (or
//!   `CKR_OPERATION_ACTIVE`) marks the HSM down, retiring the generation in force. An
//!   ambiguous code (`CKR_GENERAL_ERROR`, `CKR_FUNCTION_FAILED`) is settled by probing
//!   the session with `C_GetSessionInfo`: if the probe fails or the session is no longer
//!   logged in, the HSM is down; otherwise a `C_Decrypt` failure is
//!   [`HsmError::AuthenticationFailed`] and any other failure is [`HsmError::Pkcs11`].
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
//!   callers give up after [`SESSION_WAIT`] when no session is free, and reconnects and
//!   exclusive sections wait at most [`DRAIN_WAIT`] for sessions in use.
//! - An exclusive section ([`SessionPool::exclusive`]) holds every session at once, with
//!   no operation in flight; if the sessions are not handed back in time, the pool is torn
//!   down instead (marked down), so that nothing a section had to reach survives.
//! - A deliberate teardown ([`SessionPool::tear_down`], when a forget cannot be
//!   completed) goes the outage way: the generation is marked down at once, and the
//!   reconnect finalizes the old context before any new session is opened.
//! - The PIN is kept in [`AuthPin`] for reconnects and exposed only at `C_Login`.
//! - `Drop` never panics: failures are logged with `tracing`.
//!
//! Knows nothing of keys or of what a session is used for. Must not import anything from
//! the rest of Arca, nor from the key-operation files of [`crate::pkcs11`].

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::session::SessionState;

use super::connect::connect;
use super::error::{ckr_name, classify, describe, fn_name, Verdict};
use super::session::PooledSession;
use crate::{AuthPin, HsmError, Result};

/// How long a caller waits for a free session before giving up with
/// [`HsmError::Unavailable`] (all sessions busy: the HSM is hung or badly overloaded).
pub const SESSION_WAIT: Duration = Duration::from_secs(5);

/// How long `destroy_key`, `forget_key` and a reconnect wait for in-flight operations to
/// hand their sessions back.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// What the pool holds under its mutex.
struct PoolState {
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

/// What a thread blocked on the pool waits for.
#[derive(Clone, Copy)]
enum Signal {
    /// A session handed back, or the pool changed state (`idle_cv`).
    Idle,
    /// `checked_out` dropped to zero, or the HSM went down (`drain_cv`).
    Drain,
}

impl PoolState {
    /// The count of threads waiting for `signal`.
    fn waiters(&mut self, signal: Signal) -> &mut usize {
        match signal {
            Signal::Idle => &mut self.idle_waiters,
            Signal::Drain => &mut self.drain_waiters,
        }
    }
}

/// Rate limit of reconnect attempts.
struct ReconnectGate {
    last_attempt: Option<Instant>,
}

/// A pool of logged-in sessions on one token, with outage detection and reconnection.
pub(super) struct SessionPool {
    module: PathBuf,
    label: String,
    /// The user PIN, kept for reconnects; wiped (`None`) after the token refused it once,
    /// so a node never retries a refused login (a real HSM locks or zeroizes after a few).
    pin: Mutex<Option<AuthPin>>,
    sessions: usize,
    reconnect_interval: Duration,
    state: Mutex<PoolState>,
    /// Signalled when a session is handed back or the pool changes state.
    idle_cv: Condvar,
    /// Signalled when `checked_out` drops to zero.
    drain_cv: Condvar,
    gate: Mutex<ReconnectGate>,
}

/// A session checked out of the pool; handed back on drop.
pub(super) struct SessionGuard<'a> {
    pool: &'a SessionPool,
    inner: Option<PooledSession>,
}

impl SessionGuard<'_> {
    /// The session, owned by this guard until it drops.
    pub(super) fn get(&mut self) -> Result<&mut PooledSession> {
        self.inner.as_mut().ok_or(HsmError::Unavailable {
            function: "session pool",
            detail: "session already handed back".into(),
        })
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.inner.take() {
            self.pool.checkin(vec![s], false);
        }
    }
}

impl SessionPool {
    /// Connects (see [`connect`]) and pools `sessions` sessions, generation 1. The caller
    /// checks `sessions >= 1`.
    pub(super) fn open(
        module: PathBuf,
        label: String,
        pin: AuthPin,
        sessions: usize,
        reconnect_interval: Duration,
    ) -> Result<Self> {
        let (ctx, opened) = connect(&module, &label, &pin, sessions, false)?;
        let generation = 1;
        Ok(SessionPool {
            module,
            label,
            pin: Mutex::new(Some(pin)),
            sessions,
            reconnect_interval,
            state: Mutex::new(PoolState {
                ctx: Some(ctx),
                idle: PooledSession::fresh(opened, generation),
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

    /// Path of the PKCS#11 module.
    pub(super) fn module(&self) -> &Path {
        &self.module
    }

    /// Label of the token.
    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// Number of pooled sessions.
    pub(super) fn sessions(&self) -> usize {
        self.sessions
    }

    /// Number of successful connects so far (1 after `open`, +1 per reconnect).
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Whether the HSM is currently considered unavailable (a reconnect is pending).
    pub(super) fn is_down(&self) -> bool {
        self.lock().down
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one session out of the pool. Fails fast while the HSM is down, unless this
    /// caller gets to reconnect (rate-limited) and the reconnect succeeds.
    pub(super) fn checkout(&self) -> Result<SessionGuard<'_>> {
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
                                pool: self,
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
                    pool = self.wait(pool, Signal::Idle, deadline - now);
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

    /// Waits at most `timeout` for `signal`, counted among its waiters meanwhile.
    fn wait<'a>(
        &self,
        mut pool: MutexGuard<'a, PoolState>,
        signal: Signal,
        timeout: Duration,
    ) -> MutexGuard<'a, PoolState> {
        *pool.waiters(signal) += 1;
        let cv = match signal {
            Signal::Idle => &self.idle_cv,
            Signal::Drain => &self.drain_cv,
        };
        let mut pool = cv
            .wait_timeout(pool, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        *pool.waiters(signal) -= 1;
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
                pool = self.wait(pool, Signal::Drain, deadline - now);
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
        let connected = {
            let pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
            match pin.as_ref() {
                Some(pin) => connect(&self.module, &self.label, pin, self.sessions, true),
                None => {
                    return Err(HsmError::LoginRefused {
                        detail: "refused before; the PIN was wiped and no login is retried".into(),
                    })
                }
            }
        };
        match connected {
            Ok((ctx, sessions)) => {
                let mut pool = self.lock();
                pool.generation += 1;
                let generation = pool.generation;
                pool.idle = PooledSession::fresh(sessions, generation);
                pool.ctx = Some(ctx);
                pool.down = false;
                self.idle_cv.notify_all();
                tracing::info!(token = %self.label, generation, "HSM reconnected");
                Ok(())
            }
            Err(e @ HsmError::LoginRefused { .. }) => {
                // Wiped at once: never another try with it.
                self.pin.lock().unwrap_or_else(|p| p.into_inner()).take();
                tracing::error!(
                    alert = "hsm-login-refused",
                    token = %self.label,
                    error = %e,
                    "ALERT: the HSM refused the login on reconnect; the PIN is wiped and no \
                     login is retried"
                );
                Err(e)
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

    /// Tears the pool down on purpose (a forget that could not be completed): marks the
    /// generation in force down, so no call uses its sessions again (sessions in flight
    /// are discarded when handed back), then tries the reconnect, which `C_Finalize`s the
    /// old context (closing every session and its session objects) before opening fresh
    /// sessions. `Ok` once the old sessions are retired, even if the reconnect has to be
    /// retried later (by the next call, as after an outage).
    pub(super) fn tear_down(&self) -> Result<()> {
        let generation = self.generation();
        self.mark_down(generation, "session pool", "torn down on request");
        // Nobody waits for the rate limit here: the teardown is what had to happen.
        self.lock_gate_reset();
        if let Err(e) = self.try_reconnect() {
            tracing::warn!(token = %self.label, error = %e, "reconnect after a teardown pending");
        }
        Ok(())
    }

    /// Clears the reconnect rate limit (a deliberate teardown reconnects at once).
    fn lock_gate_reset(&self) {
        if let Ok(mut gate) = self.gate.try_lock() {
            gate.last_attempt = None;
        }
    }

    /// Runs `f` with every pooled session in hand (no operation in flight), then hands
    /// them back. Used where a change must reach every session's cache.
    pub(super) fn exclusive<T>(
        &self,
        f: impl FnOnce(&mut [PooledSession]) -> Result<T>,
    ) -> Result<T> {
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
                pool = self.wait(pool, Signal::Idle, deadline - now);
            }
            pool.exclusive = true;
            while pool.checked_out > 0 && !pool.down {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                pool = self.wait(pool, Signal::Drain, deadline - now);
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

    /// Turns a failed call on session `s` into an [`HsmError`], marking the HSM down when
    /// the failure means an outage (see the module docs). `site` names the call when the
    /// error does not; `decrypting`: the call was part of a `C_Decrypt`.
    pub(super) fn fail(
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
        match classify(rv, decrypting) {
            Verdict::Down => {
                self.mark_down(s.generation, function, &detail);
                HsmError::Unavailable { function, detail }
            }
            Verdict::AuthenticationFailed => HsmError::AuthenticationFailed,
            // A dead device, or (SoftHSM) a GCM tag mismatch. Ask the session.
            Verdict::Ambiguous => match s.session.get_session_info() {
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
            },
            Verdict::Refused => HsmError::Pkcs11 { function, detail },
        }
    }

    /// Liveness probe: a session from the pool (reconnecting first when down and allowed
    /// to) must still be logged in.
    pub(super) fn check(&self) -> Result<()> {
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

impl Drop for SessionPool {
    fn drop(&mut self) {
        let pool = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
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

/// The error of a call made while the HSM is down.
pub(super) fn down_error() -> HsmError {
    HsmError::Unavailable {
        function: "session pool",
        detail: "HSM down; reconnect pending".into(),
    }
}

fn logged_in(state: SessionState) -> bool {
    matches!(state, SessionState::RwUser | SessionState::RoUser)
}
