//! Per-principal rate limits, and per-role limits from the access policy
//! ([`RoleLimiter`]): a token bucket each (rate per second, burst). A request over the
//! limit is refused with the time until the next token, so the transport can answer
//! `RESOURCE_EXHAUSTED` with `retry-after`. One principal's traffic never spends another's
//! tokens.
//!
//! Time comes from a monotonic `Instant`: buckets refill by elapsed time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Rate and burst of one bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by principal name.
pub struct RateLimiter {
    limit: Option<Limit>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter applying `limit` to every principal (`None`: unlimited).
    pub fn new(limit: Option<Limit>) -> Self {
        RateLimiter {
            limit: limit.filter(|l| l.per_second > 0.0 && l.burst >= 1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `principal` at `now`; on refusal, how long until one is due.
    pub fn check(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() > 100_000 {
            // Idle principals' buckets are full anyway; forgetting them changes nothing.
            buckets.retain(|_, b| {
                now.duration_since(b.at).as_secs_f64() * limit.per_second < limit.burst
            });
        }
        let b = buckets.entry(principal.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second))
        }
    }
}

/// Per-role buckets: each (role, principal) pair has its own bucket at the role's limit
/// (from the access policy), so one principal's use of a role never spends another's.
#[derive(Default)]
pub struct RoleLimiter {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl RoleLimiter {
    /// Takes one token of `role`'s bucket for `principal` at `now`; on refusal, how long
    /// until one is due.
    pub fn check(
        &self,
        role: &str,
        principal: &str,
        limit: Limit,
        now: Instant,
    ) -> Result<(), Duration> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let b = buckets
            .entry((role.to_string(), principal.to_string()))
            .or_insert(Bucket {
                tokens: limit.burst,
                at: now,
            });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        // A policy change may lower the burst: never hold more than it allows.
        b.tokens = (b.tokens + elapsed * limit.per_second).min(limit.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_isolates_principals() {
        let rl = RateLimiter::new(Some(Limit {
            per_second: 10.0,
            burst: 3.0,
        }));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check("a", t0).is_ok());
        }
        let wait = rl.check("a", t0).err();
        assert!(wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_millis(100)));
        // Another principal is unaffected.
        assert!(rl.check("b", t0).is_ok());
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(rl.check("a", t1).is_ok());
        assert!(rl.check("a", t1).is_err());
        assert!(RateLimiter::new(None).check("a", t0).is_ok());
    }

    #[test]
    fn role_buckets_are_per_role_and_principal() {
        let rl = RoleLimiter::default();
        let lim = Limit {
            per_second: 1.0,
            burst: 2.0,
        };
        let t0 = Instant::now();
        assert!(rl.check("ops", "a", lim, t0).is_ok());
        assert!(rl.check("ops", "a", lim, t0).is_ok());
        assert!(rl.check("ops", "a", lim, t0).is_err());
        assert!(rl.check("ops", "b", lim, t0).is_ok());
        assert!(rl.check("other", "a", lim, t0).is_ok());
        assert!(rl
            .check("ops", "a", lim, t0 + Duration::from_secs(1))
            .is_ok());
    }
}
