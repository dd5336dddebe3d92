//! The writer thread and its loop: take what is queued, resolve what an earlier failure
//! left open, commit one batch, answer every waiter, then write down what happened (job
//! and alert records of the writer).
//!
//! Owns: the receiving side of the queue, the writer's parts ([`KeyState`], [`Sealer`],
//! [`Appender`], [`Carry`]) and the alert rules applied to committed records.
//!
//! Invariants:
//! - A waiter hears `Ok` only after the transaction holding its record committed (or was
//!   found committed); after a failure it hears `Unavailable`, and its record, kept in the
//!   carry, says the response was withheld and what the handler answered.
//! - A waiter that gave up before its record was taken has its record say so; one that
//!   gave up while its batch committed is named in an `audit.responses_withheld` record.
//! - The writer never waits for traffic to recover: an idle writer wakes every [`TICK`]
//!   to follow the seal state, store a waiting seal and retry a failed store.
//! - Alert rules see every stored record once: a committed batch's, and those of a batch
//!   found stored late.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::carry::{Carry, Held};
use super::commit::{Appender, Attempt};
use super::health::Health;
use super::keys::{KeyState, SharedDigest};
use super::queue::{withheld, withheld_detail, Submission};
use super::seal::Sealer;
use super::AuditConfig;
use crate::audit::alerts::{AlertEngine, Fired, Per, Webhook};
use crate::audit::checkpoint::CheckpointSink;
use crate::audit::record::{codes, Details, Kind, PendingRecord};
use crate::audit::{AuditError, AuditKeys};
use crate::clock::Clock;
use crate::store::AuditStore;

/// How often an idle writer looks at the seal state and retries a failed store; also
/// how long it looks, right after a failed commit, whether the commit happened.
const TICK: Duration = Duration::from_millis(250);

/// A job record of this node (a background action; `system` as its auth method).
pub(super) fn job_record(
    time_ms: i64,
    node: &str,
    operation: &str,
    result: u32,
    key: Option<(&str, Option<u32>)>,
    detail: &str,
) -> PendingRecord {
    PendingRecord {
        time_ms,
        kind: Kind::Job,
        operation: operation.to_string(),
        result,
        details: Details {
            node: node.to_string(),
            auth_method: "system".into(),
            key_name: key.map(|k| k.0.to_string()),
            key_version: key.and_then(|k| k.1),
            detail: (!detail.is_empty()).then(|| detail.to_string()),
            ..Details::default()
        },
    }
}

/// What [`super::AuditLog`] shares with the writer thread.
pub(super) struct Shared {
    pub(super) health: Arc<Health>,
    /// Records that found no place in the queue, not yet written down.
    pub(super) lost: Arc<AtomicU64>,
    /// Whether the writer holds its HSM-derived keys for the open HSM.
    pub(super) ready: Arc<AtomicBool>,
    pub(super) digest: SharedDigest,
    /// Asks the writer to stop: it closes its queue, writes what was queued and ends.
    pub(super) stop: Arc<AtomicBool>,
    /// The writer's thread, joined by [`AuditLog::stop`](super::AuditLog::stop).
    pub(super) thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The writer task.
pub(super) struct Writer {
    rx: mpsc::Receiver<Submission>,
    keys: Arc<dyn AuditKeys>,
    clock: Arc<dyn Clock>,
    cfg: AuditConfig,
    health: Arc<Health>,
    key_state: KeyState,
    sealer: Sealer,
    appender: Appender,
    carry: Carry,
    outage_noted: bool,
    alerts: AlertEngine,
    webhook: Option<Webhook>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// A writer reading `rx`, and what it shares with the handle. The checkpoint sink
    /// starts here, on the caller's runtime.
    pub(super) fn new(
        rx: mpsc::Receiver<Submission>,
        store: Arc<dyn AuditStore>,
        keys: Arc<dyn AuditKeys>,
        clock: Arc<dyn Clock>,
        cfg: AuditConfig,
        alerts: AlertEngine,
        webhook: Option<Webhook>,
    ) -> (Writer, Shared) {
        let health = Arc::new(Health::new());
        let lost = Arc::new(AtomicU64::new(0));
        let key_state = KeyState::new(
            Arc::clone(&keys),
            Arc::clone(&store),
            Arc::clone(&clock),
            &cfg,
        );
        let shared = Shared {
            health: Arc::clone(&health),
            lost: Arc::clone(&lost),
            ready: key_state.shared_ready(),
            digest: key_state.shared_digest(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Default::default(),
        };
        let writer = Writer {
            rx,
            sealer: Sealer::new(cfg.checkpoints.clone().map(CheckpointSink::start)),
            appender: Appender::new(store, Arc::clone(&health), cfg.commit_timeout),
            carry: Carry::new(lost),
            key_state,
            keys,
            clock,
            cfg,
            health,
            outage_noted: false,
            alerts,
            webhook,
            stop: Arc::clone(&shared.stop),
        };
        (writer, shared)
    }

    /// Runs the writer on a thread of its own, so its commits are not queued behind the
    /// requests on the server's runtime (the whole service waits on them). If the thread
    /// or its runtime cannot start, the queue closes: every record fails, so every call
    /// fails closed. The thread's handle goes into `thread`, for a stop to join.
    pub(super) fn spawn(self, thread: &std::sync::Mutex<Option<std::thread::JoinHandle<()>>>) {
        let spawned = std::thread::Builder::new()
            .name("arca-audit".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(self.run()),
                    Err(e) => tracing::error!(error = %e, "cannot start the audit writer runtime"),
                }
            });
        match spawned {
            Ok(handle) => {
                if let Ok(mut slot) = thread.lock() {
                    *slot = Some(handle);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot start the audit writer thread"),
        }
    }

    async fn run(mut self) {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                // No new records; what is queued is still written, then `recv` answers
                // `None` and the loop ends.
                self.rx.close();
            }
            let first = tokio::select! {
                s = self.rx.recv() => match s {
                    Some(s) => Some(s),
                    None => break,
                },
                _ = tokio::time::sleep(TICK) => None,
            };
            self.refresh().await;
            self.sealer
                .poll(
                    self.key_state.is_open(),
                    &self.keys,
                    self.clock.as_ref(),
                    &self.cfg.node,
                )
                .await;
            let mut batch: Vec<Submission> = first.into_iter().collect();
            while batch.len() < self.cfg.max_batch.max(1) {
                match self.rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            crate::metrics::global()
                .audit_queue_depth
                .store(self.rx.len() as i64, Ordering::Relaxed);
            let lost = self.carry.take_lost();
            if lost > 0 {
                self.note(
                    "audit.records_lost",
                    codes::DATA_LOSS,
                    &format!(
                        "count={lost}: records that found the audit queue full (calls refused before their handlers ran; background records not written)"
                    ),
                );
            }
            if batch.is_empty() && self.carry.is_empty() && !self.appender.has_unresolved() {
                if self.sealer.has_ready() {
                    // Idle: store the seal on its own (kept if that fails, so the next
                    // tick tries again and health recovers without traffic).
                    let stored = self
                        .appender
                        .commit_bounded(&[], &mut self.key_state, &mut self.sealer)
                        .await;
                    self.health.note_outcome(stored.as_ref().err());
                }
                continue;
            }
            // A waiter that gave up (its timeout) answered its caller UNAVAILABLE: its
            // record says so, whatever the handler did. The others hear this batch's
            // outcome.
            let mut taken = Vec::with_capacity(batch.len());
            for s in &mut batch {
                let late = s.done.as_ref().is_some_and(|d| !d.take());
                if late {
                    withheld(&mut s.rec, "audit record late");
                }
                taken.push(s.done.is_some() && !late);
            }
            if self.key_state.opened_since() {
                // Unsealed since this pass's look: set up the keys before building rows.
                self.refresh().await;
            }
            let started = Instant::now();
            // First find out whether a batch that failed earlier was stored after all,
            // since its records are in the carry.
            let mut outcome = if self.appender.has_unresolved() {
                match self.appender.resolve_bounded(&mut self.sealer).await {
                    Ok(Some(a)) => {
                        self.landed_late(&a);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            } else {
                Ok(())
            };
            let carried = self.carry.len();
            let mut records: Vec<Held> = self.carry.take();
            for s in &batch {
                records.push(Held {
                    ticket: self.carry.ticket(),
                    rec: s.rec.clone(),
                });
            }
            let mut first_seq = 0;
            let mut this_round = None;
            if outcome.is_ok() {
                let committed = self
                    .appender
                    .commit_bounded(&records, &mut self.key_state, &mut self.sealer)
                    .await;
                if committed.is_err() {
                    // Whatever reached the store may be there: find out before writing
                    // its records again.
                    this_round = self.appender.keep_unresolved();
                }
                outcome = committed.map(|f| first_seq = f);
            }
            let mut late = None;
            if outcome.is_err() && self.appender.has_unresolved() {
                // A commit can fail after it happened (a connection lost during COMMIT, a
                // timeout while the statement finishes): look before answering.
                if let Ok(Ok(Some(a))) =
                    tokio::time::timeout(TICK, self.appender.resolve(&mut self.sealer)).await
                {
                    if Some(a.id) == this_round {
                        outcome = Ok(());
                        first_seq = a.before.0 + 1;
                    } else {
                        late = Some(a);
                    }
                }
            }
            self.health.note_outcome(outcome.as_ref().err());
            match outcome {
                Ok(()) => self.committed(batch, taken, &records, carried, first_seq, started),
                Err(_) => self.failed(batch, records, carried),
            }
            if let Some(a) = late {
                self.landed_late(&a);
            }
        }
    }

    /// A batch committed at `first_seq` (its first `carried` records from the carry):
    /// every waiter hears its seq, and the records go through the alert rules.
    fn committed(
        &mut self,
        batch: Vec<Submission>,
        taken: Vec<bool>,
        records: &[Held],
        carried: usize,
        first_seq: u64,
        started: Instant,
    ) {
        let m = crate::metrics::global();
        m.audit_commit.observe(started.elapsed());
        m.audit_batches.fetch_add(1, Ordering::Relaxed);
        m.audit_records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.outage_noted = false;
        let mut gone = Vec::new();
        for (i, (s, taken)) in batch.into_iter().zip(taken).enumerate() {
            let seq = first_seq + (carried + i) as u64;
            if let Some(done) = s.done {
                if !done.answer(Ok(seq)) && taken {
                    // Its caller's time ran out while the batch committed.
                    gone.push(seq);
                }
            }
        }
        if !gone.is_empty() {
            self.note(
                "audit.responses_withheld",
                codes::UNAVAILABLE,
                &withheld_detail(&gone),
            );
        }
        self.alert_on(records);
    }

    /// A batch failed: its waiters hear `Unavailable`, and its records are kept, after
    /// the carry as it was (with anything resolving put there) and a note of the outage.
    fn failed(&mut self, batch: Vec<Submission>, mut records: Vec<Held>, carried: usize) {
        crate::metrics::global()
            .audit_failures
            .fetch_add(1, Ordering::Relaxed);
        self.carry.restore(records.drain(..carried).collect());
        if !self.outage_noted {
            self.outage_noted = true;
            self.note("audit.write_failed", codes::UNAVAILABLE, "");
        }
        for (s, mut held) in batch.into_iter().zip(records) {
            if let Some(done) = s.done {
                // The response is withheld: the record says so, and what the handler had
                // answered (it may have changed state).
                withheld(&mut held.rec, "audit write failed");
                let _ = done.answer(Err(AuditError::Unavailable));
            }
            self.carry.keep(held);
        }
    }

    /// Follows the seal state (see [`KeyState::refresh`]); a derived data key is noted.
    async fn refresh(&mut self) {
        if let Some(id) = self.key_state.refresh(self.carry.is_empty()).await {
            self.note(
                "audit.derived_data_key",
                codes::OK,
                &format!("data key {id}: the HSM could not seal it under arca:meta; derived from arca:audit-mac"),
            );
        }
    }

    /// An earlier batch, whose callers were refused, found stored: its records leave the
    /// carry, and a record says what happened.
    fn landed_late(&mut self, a: &Attempt) {
        let stored = self.carry.remove(&a.tickets);
        // They are in the log: the alert rules see them as they see every stored record.
        self.alert_on(&stored);
        self.note(
            "audit.late_commit",
            codes::UNAVAILABLE,
            &format!(
                "seq {}..={} were stored after their write was reported failed: the calls among them were answered UNAVAILABLE",
                a.before.0 + 1,
                a.last.0
            ),
        );
    }

    /// A job record of the writer, now, for the next batch.
    fn note(&mut self, operation: &str, result: u32, detail: &str) {
        let rec = self.job_record(operation, result, detail);
        self.carry.hold(rec);
    }

    fn job_record(&self, operation: &str, result: u32, detail: &str) -> PendingRecord {
        job_record(
            self.clock.now_ms(),
            &self.cfg.node,
            operation,
            result,
            None,
            detail,
        )
    }

    /// Runs stored records through the alert rules.
    fn alert_on(&mut self, records: &[Held]) {
        for r in records {
            for f in self.alerts.observe(&r.rec) {
                self.raise(f);
            }
        }
    }

    fn raise(&mut self, f: Fired) {
        let per = match f.per {
            Per::Principal => "principal",
            Per::Client => "client",
            Per::All => "all",
        };
        tracing::error!(
            rule = %f.rule,
            per,
            group = %f.group,
            count = f.count,
            window_seconds = f.window_seconds,
            "ALERT"
        );
        crate::metrics::global().alert(&f.rule);
        if let Some(w) = &self.webhook {
            w.send(&f, &self.cfg.node);
        }
        let mut rec = self.job_record(
            "alert",
            codes::OK,
            &format!(
                "rule={} per={per} count={} window={}s",
                f.rule, f.count, f.window_seconds
            ),
        );
        rec.kind = Kind::Alert;
        rec.time_ms = f.at_ms;
        match f.per {
            Per::Principal => rec.details.principal = f.group,
            Per::Client => rec.details.client = f.group,
            Per::All => {}
        }
        self.carry.hold(rec);
    }
}
