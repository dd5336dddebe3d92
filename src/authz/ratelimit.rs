//! Rate limits: one per principal ([`RateLimiter`], the server's `--rate-limit`) and one
//! per (role, principal) at the limit the access policy gives the role ([`RoleLimiter`]).
//! A refused call gets the wait until its next permitted call, which the transport turns
//! into `RESOURCE_EXHAUSTED` with `retry-after`.
//!
//! Both run on the `governor` crate's GCRA (generic cell rate algorithm: a token bucket
//! kept as one "theoretical arrival time" per key in an atomic integer), through one shared
//! core, `Buckets`, so the two limiters cannot drift apart again.
//!
//! Time is a parameter (STYLE habit 5): every check takes the caller's `now`, as it did
//! before governor. Governor reads time from its `Clock` and measures it from the instant
//! a limiter was built, so each check builds a light governor limiter view over the shared
//! state store whose clock reads exactly the caller's `now`, and the store view
//! (`Shifted`) keeps each key's state as an offset from the `Buckets`' own origin. The
//! arithmetic is all governor's; tests step time by adding to an `Instant`, never by
//! sleeping.
//!
//! Governor's features: `default-features = false, features = ["std"]`. `std` gives the
//! `Instant` clock types and a keyed store under a `parking_lot` mutex (cannot be
//! poisoned; parks rather than spins) over std's SipHash map. New to the build with it:
//! governor, `futures-timer` and governor's small `nonzero_ext`, `portable-atomic`,
//! `spinning_top` and `web-time`; `parking_lot`, `futures-util` and `hashbrown` were there
//! already. Without `std` governor is `no_std`: its map sits behind a spinlock (poor when
//! tokio workers contend on two cores) and only `futures-timer` would be saved. Left out:
//! `dashmap` (a sharded map; one short critical section per call does not need it),
//! `quanta` (a TSC clock; the caller already holds the time) and `jitter` (`rand` and
//! `getrandom`, for `until_ready_with_jitter`, which Arca does not call).
//!
//! Invariants:
//! - **Never fails open.** Nothing here skips a check: governor's store lock cannot be
//!   poisoned, and a poisoned role map is used as it stands (it only ever holds whole
//!   entries). A limit that makes no sense (rate not above 0, burst below 1, NaN) refuses
//!   every call rather than allowing them; the policy loader and the CLI never build one.
//! - **One principal's traffic never spends another's** tokens, nor another role's.
//! - **Memory stays bounded** by the principals active within one refill window. Every
//!   `SWEEP_EVERY` calls a limiter looks at its map and, if it has grown past twice what
//!   was live at the last sweep (at least `SWEEP_ABOVE` keys), or holds more than
//!   `SWEEP_ABOVE` and was last swept `SWEEP_INTERVAL` ago, drops the keys whose bucket
//!   is full again (governor's `retain_recent`). Such a key answers exactly as one never
//!   seen, so eviction changes no answer; nothing clears live buckets. Every
//!   `ROLE_SWEEP_EVERY` calls the role limiter sweeps every role and forgets roles left
//!   with no key.
//! - A burst is whole calls: a fractional `burst` is rounded down (at least 1). A role
//!   whose limit changes (a new policy) starts its buckets afresh at the new limit.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{HashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::Quota;

/// Rate and burst of one bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Calls allowed per second, on average.
    pub per_second: f64,
    /// How many calls may come at once (bucket size; rounded down to whole calls).
    pub burst: f64,
}

/// How often (in calls) a limiter looks at the size of its map.
const SWEEP_EVERY: u64 = 1024;
/// Below this many keys a map is never swept.
const SWEEP_ABOVE: usize = 10_000;
/// A map above [`SWEEP_ABOVE`] is swept at least this often (of the callers' time), even
/// when it has not grown.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often (in calls) [`RoleLimiter`] sweeps every role, dropping roles left idle.
const ROLE_SWEEP_EVERY: u64 = 64 * SWEEP_EVERY;
/// The longest period between two calls a limit can ask for (slower rates are clamped).
const MAX_PERIOD_NS: u64 = 365 * 86_400 * 1_000_000_000;
/// Ceiling of every time value governor computes (period × burst, time since origin):
/// 2^62 ns, about 146 years, so no sum of them overflows a `u64`.
const MAX_NS: u64 = 1 << 62;
/// The wait answered to every call under a limit that makes no sense.
const UNUSABLE_LIMIT_WAIT: Duration = Duration::from_secs(1);

impl Limit {
    /// The governor quota: one call every `1 / per_second` seconds, `burst` at once.
    /// `None` when the limit makes no sense (rate not above 0, burst below 1, NaN).
    /// Extreme values are clamped so that no time arithmetic can overflow.
    fn quota(self) -> Option<Quota> {
        if !(self.per_second > 0.0 && self.burst >= 1.0) {
            return None;
        }
        // `as` saturates (an infinite rate gives 0, then 1 ns); ceil keeps the rate at or
        // under the one asked for.
        let period_ns = ((1e9 / self.per_second).ceil() as u64).clamp(1, MAX_PERIOD_NS);
        let max_burst = (MAX_NS / period_ns).min(u64::from(u32::MAX));
        let burst = (self.burst.floor() as u64).clamp(1, max_burst);
        let burst = NonZeroU32::new(u32::try_from(burst).ok()?)?;
        Some(Quota::with_period(Duration::from_nanos(period_ns))?.allow_burst(burst))
    }
}

/// A governor clock that reads the caller's `now`.
struct Fixed(Instant);

impl Clock for Fixed {
    type Instant = Instant;

    fn now(&self) -> Instant {
        self.0
    }
}

/// A view of a [`Buckets`] store for one check at `off` after its origin: the store keeps
/// each key's theoretical arrival time as an offset from the origin; governor, whose
/// limiter view starts at the check's `now`, sees them relative to `now`. A time already
/// past reads as `now`, which GCRA treats the same (a full bucket).
struct Shifted<'a> {
    store: &'a HashMapStateStore<String>,
    off: Nanos,
}

impl StateStore for Shifted<'_> {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let off = self.off;
        self.store.measure_and_replace(key, |at| {
            let (out, next) = f(at.map(|at| at.saturating_sub(off)))?;
            Ok((out, next + off))
        })
    }
}

/// The buckets of one limit, by principal: the one implementation behind both limiters.
struct Buckets {
    quota: Quota,
    /// The instant its stored times are measured from (the first check's `now`).
    origin: Instant,
    store: HashMapStateStore<String>,
    /// Calls so far, to schedule sweeps.
    calls: AtomicU64,
    /// Sweep when the map holds more keys than this...
    sweep_above: AtomicUsize,
    /// ...or holds more than [`SWEEP_ABOVE`] at this offset (ns) or later.
    sweep_at: AtomicU64,
}

impl Buckets {
    fn new(quota: Quota, origin: Instant) -> Self {
        Buckets {
            quota,
            origin,
            store: HashMapStateStore::default(),
            calls: AtomicU64::new(0),
            sweep_above: AtomicUsize::new(SWEEP_ABOVE),
            sweep_at: AtomicU64::new(0),
        }
    }

    /// `now` as an offset from the origin (0 before it; capped, see [`MAX_NS`]).
    fn offset(&self, now: Instant) -> Nanos {
        let ns = now.saturating_duration_since(self.origin).as_nanos();
        Nanos::from(u64::try_from(ns).unwrap_or(MAX_NS).min(MAX_NS))
    }

    /// Takes one call from `principal`'s bucket at `now`; on refusal, the wait until
    /// its next permitted call (never zero).
    fn check(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let off = self.offset(now);
        if self.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep_if_due(off);
        }
        let view = governor::RateLimiter::<String, _, _, NoOpMiddleware<Instant>>::new(
            self.quota,
            Shifted {
                store: &self.store,
                off,
            },
            // The view's clock reads the same instant as `off` (a `now` before the
            // origin reads as the origin); the wait is still measured from `now`.
            Fixed(now.max(self.origin)),
        );
        view.check_key(&principal.to_owned())
            .map_err(|refused| refused.wait_time_from(now).max(Duration::from_nanos(1)))
    }

    /// Sweeps when the map has grown past its mark, or is large and was last swept
    /// [`SWEEP_INTERVAL`] ago. The mark then becomes twice what is left, so a crowd of
    /// live principals is not rescanned on every round.
    fn sweep_if_due(&self, off: Nanos) {
        let len = self.store.len();
        let grown = len > self.sweep_above.load(Ordering::Relaxed);
        let due = len > SWEEP_ABOVE && off.as_u64() >= self.sweep_at.load(Ordering::Relaxed);
        if !(grown || due) {
            return;
        }
        let live = self.evict_idle(off);
        self.sweep_above
            .store(live.saturating_mul(2).max(SWEEP_ABOVE), Ordering::Relaxed);
        let next = off + Nanos::from(SWEEP_INTERVAL);
        self.sweep_at.store(next.as_u64(), Ordering::Relaxed);
    }

    /// Drops the keys whose bucket has been full for a whole period at `off` (governor's
    /// `retain_recent` rule: they answer as a key never seen would); how many remain.
    fn evict_idle(&self, off: Nanos) -> usize {
        let period = Nanos::from(self.quota.replenish_interval());
        self.store.retain_recent(off.saturating_sub(period));
        self.store.shrink_to_fit();
        self.store.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.store.len()
    }
}

/// The global per-principal limit (`--rate-limit`, `--rate-burst`).
pub struct RateLimiter {
    limit: Option<Limit>,
    /// Built at the first check (its `now` is the origin).
    buckets: OnceLock<Option<Buckets>>,
}

impl RateLimiter {
    /// A limiter applying `limit` to every principal (`None`: unlimited).
    pub fn new(limit: Option<Limit>) -> Self {
        RateLimiter {
            limit,
            buckets: OnceLock::new(),
        }
    }

    /// Takes one call from `principal`'s bucket at `now`; on refusal, how long until its
    /// next permitted call.
    pub fn check(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        match self
            .buckets
            .get_or_init(|| limit.quota().map(|q| Buckets::new(q, now)))
        {
            Some(b) => b.check(principal, now),
            None => Err(UNUSABLE_LIMIT_WAIT),
        }
    }
}

/// Per-role limits: each (role, principal) pair has its own bucket at the role's limit
/// (from the access policy), so one principal's use of a role never spends another's.
#[derive(Default)]
pub struct RoleLimiter {
    /// By role name. Entries are only ever inserted or replaced whole, so a map left by a
    /// panicking holder is still sound and is used as it stands.
    roles: RwLock<HashMap<String, Buckets>>,
    /// Calls so far, to schedule the sweep of every role.
    calls: AtomicU64,
}

impl RoleLimiter {
    /// Takes one call from `role`'s bucket for `principal` at `now`, under `limit` (the
    /// role's limit in the policy in force); on refusal, how long until its next
    /// permitted call.
    pub fn check(
        &self,
        role: &str,
        principal: &str,
        limit: Limit,
        now: Instant,
    ) -> Result<(), Duration> {
        let Some(quota) = limit.quota() else {
            return Err(UNUSABLE_LIMIT_WAIT);
        };
        if self.calls.fetch_add(1, Ordering::Relaxed) % ROLE_SWEEP_EVERY == ROLE_SWEEP_EVERY - 1 {
            self.sweep(now);
        }
        {
            let roles = self.roles.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(b) = roles.get(role).filter(|b| b.quota == quota) {
                return b.check(principal, now);
            }
        }
        let mut roles = self.roles.write().unwrap_or_else(PoisonError::into_inner);
        let b = roles
            .entry(role.to_owned())
            .or_insert_with(|| Buckets::new(quota, now));
        if b.quota != quota {
            *b = Buckets::new(quota, now);
        }
        b.check(principal, now)
    }

    /// Evicts idle principals of every role and forgets roles left with none (a role the
    /// policy no longer has, or no longer limits, stops holding memory).
    fn sweep(&self, now: Instant) {
        let mut roles = self.roles.write().unwrap_or_else(PoisonError::into_inner);
        roles.retain(|_, b| b.evict_idle(b.offset(now)) > 0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limit(per_second: f64, burst: f64) -> Limit {
        Limit { per_second, burst }
    }

    /// How many calls `check` allows in a row at one instant (stops at `cap`).
    fn allowed_now(check: impl Fn() -> Result<(), Duration>, cap: usize) -> usize {
        (0..cap).take_while(|_| check().is_ok()).count()
    }

    #[test]
    fn a_burst_then_calls_come_at_the_refill_rate_and_the_bucket_caps_at_the_burst() {
        let rl = RateLimiter::new(Some(limit(10.0, 3.0)));
        let t0 = Instant::now();
        assert_eq!(allowed_now(|| rl.check("a", t0), 10), 3);
        // The answer is the wait until the next permitted call: one period, 100 ms.
        assert_eq!(rl.check("a", t0), Err(100 * MS));
        assert_eq!(rl.check("a", t0 + 99 * MS), Err(MS));
        let t1 = t0 + 100 * MS;
        assert_eq!(allowed_now(|| rl.check("a", t1), 10), 1);
        assert_eq!(rl.check("a", t1), Err(100 * MS));
        // Ten seconds idle refill the bucket to its burst, not to 100 calls.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(allowed_now(|| rl.check("a", t2), 200), 3);
        // A steady caller at the rate is never refused.
        for i in 1..=50 {
            assert!(rl.check("a", t2 + i * 100 * MS).is_ok(), "call {i}");
        }
    }

    #[test]
    fn principals_are_isolated_and_no_limit_allows_everything() {
        let rl = RateLimiter::new(Some(limit(1.0, 2.0)));
        let t0 = Instant::now();
        assert_eq!(allowed_now(|| rl.check("a", t0), 10), 2);
        assert_eq!(allowed_now(|| rl.check("b", t0), 10), 2);
        let unlimited = RateLimiter::new(None);
        assert_eq!(allowed_now(|| unlimited.check("a", t0), 1000), 1000);
    }

    #[test]
    fn a_fractional_burst_is_whole_calls_and_a_slow_rate_waits_long() {
        let rl = RateLimiter::new(Some(limit(0.5, 2.5)));
        let t0 = Instant::now();
        assert_eq!(allowed_now(|| rl.check("a", t0), 10), 2);
        assert_eq!(rl.check("a", t0), Err(Duration::from_secs(2)));
    }

    #[test]
    fn a_limit_that_makes_no_sense_refuses_rather_than_allows() {
        let t0 = Instant::now();
        for bad in [
            limit(0.0, 5.0),
            limit(-1.0, 5.0),
            limit(f64::NAN, 5.0),
            limit(5.0, 0.5),
            limit(5.0, f64::NAN),
        ] {
            let rl = RateLimiter::new(Some(bad));
            assert_eq!(rl.check("a", t0), Err(UNUSABLE_LIMIT_WAIT), "{bad:?}");
            let roles = RoleLimiter::default();
            assert_eq!(
                roles.check("r", "a", bad, t0),
                Err(UNUSABLE_LIMIT_WAIT),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn extreme_limits_neither_panic_nor_fail_open() {
        let t0 = Instant::now();
        for (l, first_burst) in [
            (limit(f64::INFINITY, 1.0), 1),
            (limit(1e300, 3.0), 3),
            (limit(1e-300, 1.0), 1),
            (limit(1e-300, f64::INFINITY), 146),
            (limit(1.0, 1e12), 1000),
        ] {
            let rl = RateLimiter::new(Some(l));
            assert_eq!(
                allowed_now(|| rl.check("a", t0), 1000),
                first_burst,
                "{l:?}"
            );
            let later = t0 + Duration::from_secs(100 * 365 * 86_400);
            assert!(rl.check("a", later).is_ok(), "{l:?}");
        }
    }

    #[test]
    fn a_time_before_the_first_call_counts_as_the_first_call() {
        let t0 = Instant::now();
        let rl = RateLimiter::new(Some(limit(1.0, 1.0)));
        assert!(rl.check("a", t0 + Duration::from_secs(5)).is_ok());
        assert_eq!(rl.check("a", t0), Err(Duration::from_secs(6)));
    }

    #[test]
    fn idle_principals_are_evicted_and_live_ones_are_kept() {
        let rl = RateLimiter::new(Some(limit(10.0, 2.0)));
        let t0 = Instant::now();
        let crowd = SWEEP_ABOVE + 1000;
        for i in 0..crowd {
            assert!(rl.check(&format!("p{i}"), t0).is_ok());
        }
        let t1 = t0 + SWEEP_INTERVAL + Duration::from_secs(1);
        assert_eq!(allowed_now(|| rl.check("hot", t1), 10), 2);
        let b = rl.buckets.get().unwrap().as_ref().unwrap();
        assert_eq!(b.len(), crowd + 1);
        // The next scheduled sweep (at most SWEEP_EVERY calls away, and SWEEP_INTERVAL
        // after the last) drops the crowd, whose buckets are full again, and keeps the one
        // that is not.
        for _ in 0..SWEEP_EVERY {
            let _ = rl.check("hot", t1);
        }
        assert_eq!(b.len(), 1);
        assert_eq!(rl.check("hot", t1), Err(100 * MS));
        // Evicted principals answer as fresh ones: a full burst.
        assert_eq!(allowed_now(|| rl.check("p0", t1), 10), 2);
        assert_eq!(b.sweep_above.load(Ordering::Relaxed), SWEEP_ABOVE);
    }

    #[test]
    fn a_crowd_of_live_principals_keeps_its_buckets() {
        // Everyone calls at one instant, so nobody is idle: a sweep must not forget any
        // bucket (forgetting one would hand its principal a fresh burst).
        let rl = RateLimiter::new(Some(limit(1.0, 1.0)));
        let t0 = Instant::now();
        assert!(rl.check("a", t0).is_ok());
        for i in 0..(SWEEP_ABOVE as u64 + 2 * SWEEP_EVERY) {
            let _ = rl.check(&format!("p{i}"), t0);
        }
        assert!(rl.check("a", t0).is_err());
        let b = rl.buckets.get().unwrap().as_ref().unwrap();
        // The sweep mark rose above the live count, so it does not rescan on every round.
        assert!(b.sweep_above.load(Ordering::Relaxed) > b.len());
    }

    #[test]
    fn role_buckets_are_per_role_and_principal() {
        let rl = RoleLimiter::default();
        let lim = limit(1.0, 2.0);
        let t0 = Instant::now();
        assert_eq!(allowed_now(|| rl.check("ops", "a", lim, t0), 10), 2);
        assert_eq!(rl.check("ops", "a", lim, t0), Err(Duration::from_secs(1)));
        assert_eq!(allowed_now(|| rl.check("ops", "b", lim, t0), 10), 2);
        assert_eq!(allowed_now(|| rl.check("other", "a", lim, t0), 10), 2);
        assert!(rl
            .check("ops", "a", lim, t0 + Duration::from_secs(1))
            .is_ok());
    }

    #[test]
    fn many_other_principals_do_not_refill_a_role_bucket() {
        // Before governor, past 100,000 (role, principal) pairs every role's buckets
        // were cleared, handing every principal a fresh burst.
        let rl = RoleLimiter::default();
        let lim = limit(1.0, 1.0);
        let t0 = Instant::now();
        assert!(rl.check("ops", "a", lim, t0).is_ok());
        for i in 0..100_001 {
            let _ = rl.check("ops", &format!("p{i}"), lim, t0);
        }
        assert_eq!(rl.check("ops", "a", lim, t0), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_role_whose_limit_changes_starts_afresh_at_the_new_limit() {
        let rl = RoleLimiter::default();
        let t0 = Instant::now();
        assert_eq!(
            allowed_now(|| rl.check("ops", "a", limit(1.0, 2.0), t0), 10),
            2
        );
        assert_eq!(
            allowed_now(|| rl.check("ops", "a", limit(1.0, 5.0), t0), 10),
            5
        );
        assert_eq!(
            rl.check("ops", "a", limit(1.0, 5.0), t0),
            Err(Duration::from_secs(1))
        );
    }

    #[test]
    fn roles_left_idle_are_forgotten() {
        let rl = RoleLimiter::default();
        let lim = limit(10.0, 1.0);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(rl.check("gone", &format!("p{i}"), lim, t0).is_ok());
        }
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..ROLE_SWEEP_EVERY {
            let _ = rl.check("ops", "a", lim, t1);
        }
        let roles = rl.roles.read().unwrap();
        assert!(!roles.contains_key("gone"));
        assert_eq!(roles.get("ops").map(Buckets::len), Some(1));
    }

    #[test]
    fn a_poisoned_role_map_still_limits() {
        let rl = RoleLimiter::default();
        let lim = limit(1.0, 1.0);
        let t0 = Instant::now();
        assert!(rl.check("ops", "a", lim, t0).is_ok());
        let poisoner = std::thread::scope(|s| {
            s.spawn(|| {
                let _held = rl.roles.write();
                panic!("a holder of the role map panics");
            })
            .join()
        });
        assert!(poisoner.is_err());
        assert!(rl.roles.is_poisoned());
        // Before governor a poisoned lock let every call through.
        assert_eq!(rl.check("ops", "a", lim, t0), Err(Duration::from_secs(1)));
        assert!(rl.check("ops", "b", lim, t0).is_ok());
    }
}
