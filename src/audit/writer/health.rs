//! The writer's health, shared by [`super::AuditLog`] and the writer thread, and the bound
//! on the writer's store calls.
//!
//! Owns: whether the last store call of the writer succeeded, and when the store call
//! running now (if any) started.
//!
//! Invariants:
//! - Every store call of the writer ends within a bound: a commit, and the look for
//!   unresolved attempts before a batch, run through [`Health::bounded`] (the commit
//!   timeout), marked busy meanwhile, so health reports a call stuck past the timeout (a
//!   commit stuck in `fsync`, say) even before it returns; a new data key is bounded by
//!   [`within`] the commit timeout, and the look right after a failed commit by 250 ms.
//!   A call that outlasts its bound is dropped and reported `Unavailable`.
//! - Health turns bad after a failed store call and good again after a successful one,
//!   and each change is logged once (not once per batch of an outage).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::audit::AuditError;

/// The writer's health.
pub(super) struct Health {
    healthy: AtomicBool,
    /// While a store call of the writer runs: when it started (ms since `epoch`, plus 1);
    /// 0 otherwise.
    busy: AtomicU64,
    epoch: Instant,
}

impl Health {
    /// Healthy, nothing running.
    pub(super) fn new() -> Self {
        Health {
            healthy: AtomicBool::new(true),
            busy: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether the last store call succeeded and none has been running for longer than
    /// `timeout`.
    pub(super) fn is_healthy(&self, timeout: Duration) -> bool {
        let busy = self.busy.load(Ordering::Relaxed);
        let stuck =
            busy != 0 && ms_since(self.epoch).saturating_sub(busy - 1) > timeout.as_millis() as u64;
        self.healthy.load(Ordering::Relaxed) && !stuck
    }

    /// Health after a store call: healthy again after a success, failing (logged once
    /// per outage) after an error.
    pub(super) fn note_outcome(&self, err: Option<&AuditError>) {
        match err {
            None => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("audit log writable again");
                }
            }
            Some(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, source = ?std::error::Error::source(e), "audit log write failed: requests fail closed");
                }
            }
        }
    }

    /// Runs one of the writer's store calls, bounded by `limit` and marked busy
    /// meanwhile.
    pub(super) async fn bounded<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, AuditError>>,
    ) -> Result<T, AuditError> {
        self.busy.store(ms_since(self.epoch) + 1, Ordering::Relaxed);
        let r = within(limit, call).await;
        self.busy.store(0, Ordering::Relaxed);
        r
    }
}

/// `call`, or `Unavailable` once `limit` has passed (the call is dropped then).
pub(super) async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, AuditError>>,
) -> Result<T, AuditError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(AuditError::Unavailable),
    }
}

/// Milliseconds since `epoch`.
fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}
