//! [`AuditLog`], the audit trail's entry point: what request handling and background jobs
//! call to reserve a place, submit a record and wait for it, and what health and the
//! queries read.
//!
//! Owns: the sending side of the writer's queue and the configuration; it shares the
//! health, the lost-record count, the keys-ready flag and the digest key with the writer
//! thread (`run`).
//!
//! Invariants:
//! - A call's record has its place before the call's handler runs
//!   ([`AuditLog::reserve`]); a call that finds no place is refused, and its record is
//!   counted as lost (and the count written later).
//! - [`AuditLog::submit`] returns `Ok` only with the seq of a committed record, and
//!   returns within the audit timeout.
//! - A writer that is not running (it failed to start, or stopped) makes the log
//!   unhealthy and fails every call closed.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::carry::count_lost;
use super::queue::{Reservation, Submission};
use super::run::{job_record, Shared, Writer};
use super::AuditConfig;
use crate::audit::alerts::{AlertEngine, Webhook};
use crate::audit::record::PendingRecord;
use crate::audit::{AuditError, AuditKeys};
use crate::clock::Clock;
use crate::store::AuditStore;

/// The audit trail's entry point.
pub struct AuditLog {
    tx: mpsc::Sender<Submission>,
    shared: Shared,
    clock: Arc<dyn Clock>,
    keys: Arc<dyn AuditKeys>,
    store: Arc<dyn AuditStore>,
    cfg: AuditConfig,
}

impl AuditLog {
    /// Starts the writer (and the checkpoint sink, and the webhook sender) on the
    /// current runtime.
    pub fn start(
        store: Arc<dyn AuditStore>,
        keys: Arc<dyn AuditKeys>,
        clock: Arc<dyn Clock>,
        cfg: AuditConfig,
        alerts: AlertEngine,
        webhook: Option<Webhook>,
    ) -> Arc<AuditLog> {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let (writer, shared) = Writer::new(
            rx,
            Arc::clone(&store),
            Arc::clone(&keys),
            Arc::clone(&clock),
            cfg.clone(),
            alerts,
            webhook,
        );
        let log = Arc::new(AuditLog {
            tx,
            shared,
            clock,
            keys,
            store,
            cfg,
        });
        writer.spawn(&log.shared.thread);
        log
    }

    /// Stops the writer: it takes no new record, writes those queued, and its thread
    /// ends; waits for that up to `wait`. The server calls it as it shuts down, so the
    /// writer's last HSM call (a seal) never runs while the process exits (when the
    /// PKCS#11 module is torn down under it).
    pub fn stop(&self, wait: std::time::Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let handle = self.shared.thread.lock().ok().and_then(|mut t| t.take());
        let Some(handle) = handle else { return };
        let start = std::time::Instant::now();
        while !handle.is_finished() && start.elapsed() < wait {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if handle.is_finished() {
            if handle.join().is_err() {
                tracing::error!("the audit writer thread panicked");
            }
        } else {
            tracing::warn!(?wait, "the audit writer did not stop in time");
        }
    }

    /// Whether the writer holds its HSM-derived keys (digest key and data key) for the
    /// open HSM.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// Whether the last batch committed, no store call of the writer has been running
    /// for longer than the timeout (a commit stuck in `fsync`, say), and the writer is
    /// running (a writer that never started or stopped fails every call closed, so it is
    /// not healthy).
    pub fn is_healthy(&self) -> bool {
        self.shared.health.is_healthy(self.cfg.timeout) && !self.tx.is_closed()
    }

    /// The store (for queries and verification).
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// The HSM side (for queries and verification).
    pub fn keys(&self) -> &Arc<dyn AuditKeys> {
        &self.keys
    }

    /// The writer's configuration.
    pub fn config(&self) -> &AuditConfig {
        &self.cfg
    }

    /// The clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The keyed digest of a canonical encryption context, as records keep it (`None`
    /// while the HSM is closed and the digest key not derived). The context itself never
    /// enters a record.
    pub fn context_digest(&self, canonical: &[u8]) -> Option<String> {
        let key = self.shared.digest.read().ok().and_then(|d| d.clone())?;
        Some(key.digest(canonical))
    }

    /// A place in the queue for a call's record, taken before the call's handler runs:
    /// `None` when the queue is full (the call must then be refused before it changes
    /// anything; its own record is counted as lost and the count written later).
    pub fn reserve(&self) -> Option<Reservation> {
        match self.tx.clone().try_reserve_owned() {
            Ok(p) => Some(Reservation(p)),
            Err(_) => {
                count_lost(&self.shared.lost, 1);
                None
            }
        }
    }

    /// Submits a record and waits until it is durable (or fails, or times out).
    pub async fn record(&self, rec: PendingRecord) -> Result<u64, AuditError> {
        let place = self.reserve().ok_or(AuditError::Unavailable)?;
        self.submit(place, rec).await
    }

    /// Submits a record in its reserved place and waits until it is durable (or fails,
    /// or times out).
    ///
    /// The wait is bounded by `timeout`, whatever the store does. When it ends, a record
    /// still queued is abandoned (the writer writes it saying the response was withheld);
    /// a record already in a batch stays there, and if that batch then commits, the
    /// writer finds this caller gone and writes an `audit.responses_withheld` record
    /// naming its seq. An answer that arrived before the wait ended is taken.
    pub async fn submit(
        &self,
        place: Reservation,
        mut rec: PendingRecord,
    ) -> Result<u64, AuditError> {
        rec.details.node.clone_from(&self.cfg.node);
        let (submission, wait) = Submission::waited(rec);
        place.0.send(submission);
        crate::metrics::global()
            .audit_queue_depth
            .store(self.depth(), Ordering::Relaxed);
        wait.until(self.cfg.timeout).await
    }

    /// Submits a record without waiting (background actions whose outcome does not go
    /// to a caller).
    pub fn record_nowait(&self, mut rec: PendingRecord) {
        rec.details.node.clone_from(&self.cfg.node);
        if self.tx.try_send(Submission::unwaited(rec)).is_err() {
            count_lost(&self.shared.lost, 1);
            tracing::error!("audit queue full: a background record was not written");
        }
    }

    /// A job record for a background action, now.
    pub fn job(
        &self,
        operation: &str,
        result: u32,
        key: Option<(&str, Option<u32>)>,
        detail: &str,
    ) {
        self.record_nowait(job_record(
            self.clock.now_ms(),
            &self.cfg.node,
            operation,
            result,
            key,
            detail,
        ));
    }

    fn depth(&self) -> i64 {
        (self.tx.max_capacity() - self.tx.capacity()) as i64
    }
}
