//! [`AuditLog`]: the group-commit writer, and [`AuditSlot`], the per-request details.
//!
//! Requests submit a record and await its durability ([`AuditLog::record`], bounded by
//! the configured timeout). One task takes whatever is queued (up to `max_batch`),
//! numbers, encrypts and chains it in one store transaction, then answers every waiter.
//! So the cost of a commit (an fsync, a PostgreSQL round trip) is shared by every request
//! that arrived while the previous batch was committing.
//!
//! Sealing runs beside the commits, not in them: after a commit the head is sealed by
//! the HSM (one HMAC; at most one in flight, since each seal covers the whole chain up to
//! its head), and the seal is stored with the next batch, or on its own when the writer
//! is idle, then appended to the checkpoint file. A request therefore never waits behind
//! the HSM queue for its record, and a seal trails the head by about one batch.
//!
//! Invariants:
//! - A waiter hears `Ok` only after the transaction holding its record committed.
//! - A call's record has its place in the queue before the call's handler runs
//!   ([`AuditLog::reserve`]): a full queue refuses the call before it can change anything.
//!   Records that find no place (a refused call's own, a background action's) are counted
//!   and the count is written as an `audit.records_lost` record when the writer can.
//! - The writer never hangs a request: a caller waits at most its timeout, whatever the
//!   store does (a commit stuck in `fsync` included); on PostgreSQL a batch that takes
//!   longer than the commit timeout is dropped (its transaction rolls back) and reported
//!   failed; every other store call of the writer is bounded by the commit timeout too.
//!   A SQLite append runs synchronously on this thread to its end (SQLite's busy timeout
//!   bounds its wait for the lock), and health reports the writer stuck while a commit
//!   outlasts the timeout.
//! - The log says what callers heard: a record whose caller gave up while it was queued
//!   says the response was withheld; when a batch commits after some of its callers gave
//!   up, an `audit.responses_withheld` record names their seqs.
//! - Nothing is stored twice: a batch whose commit failed or timed out is an unresolved
//!   [`Attempt`]; before its records are written again, the writer reads the head and the
//!   attempt's last row. Found there, the attempt is taken as stored (its records leave
//!   the carry) and an `audit.late_commit` record says so; otherwise it can no longer be
//!   stored once the head has moved past the head it was built on (its head update is
//!   conditional on that head), and while the head is still there, the next batch is
//!   built on the same head, so at most one of the two commits.
//! - Records of a failed batch are kept (with result `UNAVAILABLE`, since their requests
//!   were refused) and written when the store recovers, after an `audit.write_failed`
//!   job record; while the store keeps failing, the writer retries every 250 ms, so it
//!   reports healthy again without waiting for traffic.
//! - Details are encrypted under a data key made in the HSM whenever the HSM is open (no
//!   record is stored in clear while it is open); the data key lives only in this task's
//!   memory and sealed in `audit_deks`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use super::alerts::{AlertEngine, Fired, Per, Webhook};
use super::chain::{build_rows, seal_input, DataKey};
use super::checkpoint::{Checkpoint, CheckpointSink};
use super::record::{codes, Details, Kind, PendingRecord};
use super::{AuditError, AuditKeys};
use crate::clock::Clock;
use crate::store::{AuditAppend, AuditSeal, AuditStore, BoxFuture, StoreError};

/// Records encrypted under one data key before the writer makes a new one.
const DEK_RECORDS: u64 = 1 << 24;
/// Records of failed batches kept for writing after recovery.
const MAX_CARRY: usize = 100_000;
/// How often an idle writer looks at the seal state and retries a failed store.
const TICK: Duration = Duration::from_millis(250);
/// How long after the HSM seals (beyond the audit timeout) the writer keeps its data key
/// for records of calls made before: a call's record is submitted when its handler ends,
/// and a handler waits at most the HSM timeout (5 s by default) for the HSM.
const RETAIN_DEK: Duration = Duration::from_secs(10);

/// Tuning of the audit writer.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// This node's name in records.
    pub node: String,
    /// How long a request waits for its record to be durable.
    pub timeout: Duration,
    /// How long one batch commit may take.
    pub commit_timeout: Duration,
    /// Records per batch at most.
    pub max_batch: usize,
    /// Places for records: a call holds one from [`AuditLog::reserve`] until the writer
    /// takes its record.
    pub queue: usize,
    /// The checkpoint file.
    pub checkpoints: Option<std::path::PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            node: "arca".into(),
            timeout: Duration::from_secs(2),
            commit_timeout: Duration::from_secs(2),
            max_batch: 256,
            queue: 65_536,
            checkpoints: None,
        }
    }
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

struct Submission {
    rec: PendingRecord,
    /// The waiter: its answer channel and the claim it shares with the writer.
    done: Option<Waiter>,
}

/// A caller waiting for its record. Exactly one of caller and writer moves `claim` out of
/// [`QUEUED`]: the writer to [`TAKEN`] when it puts the record in a batch (the record then
/// says what that batch's outcome tells the caller), the caller to [`ABANDONED`] when its
/// wait ends first (the record then says the response was withheld).
struct Waiter {
    answer: oneshot::Sender<Result<u64, AuditError>>,
    claim: Arc<AtomicU8>,
}

impl Waiter {
    /// Claims the record for a batch; false if its caller has already given up.
    fn take(&self) -> bool {
        self.claim
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && !self.answer.is_closed()
    }
}

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// The audit trail's entry point.
pub struct AuditLog {
    tx: mpsc::Sender<Submission>,
    healthy: Arc<AtomicBool>,
    /// Records that found no place in the queue, not yet written down.
    lost: Arc<AtomicU64>,
    /// While a store call of the writer runs: when it started (ms since `epoch`, plus 1);
    /// 0 otherwise.
    busy: Arc<AtomicU64>,
    epoch: Instant,
    ready: Arc<AtomicBool>,
    digest: Arc<RwLock<Option<Arc<DigestKey>>>>,
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
        let log = Arc::new(AuditLog {
            tx,
            healthy: Arc::new(AtomicBool::new(true)),
            lost: Arc::new(AtomicU64::new(0)),
            busy: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            ready: Arc::new(AtomicBool::new(false)),
            digest: Arc::new(RwLock::new(None)),
            clock: Arc::clone(&clock),
            keys: Arc::clone(&keys),
            store: Arc::clone(&store),
            cfg: cfg.clone(),
        });
        let task = Writer {
            rx,
            store,
            keys,
            clock,
            healthy: Arc::clone(&log.healthy),
            lost: Arc::clone(&log.lost),
            busy: Arc::clone(&log.busy),
            epoch: log.epoch,
            keys_ready: Arc::clone(&log.ready),
            digest: Arc::clone(&log.digest),
            sink: cfg.checkpoints.clone().map(CheckpointSink::start),
            cfg,
            dek: None,
            dek_used: 0,
            open: false,
            carry: Vec::new(),
            next_ticket: 0,
            unresolved: Vec::new(),
            in_flight: Arc::new(Mutex::new(None)),
            attempts: 0,
            retain_until: None,
            outage_noted: false,
            alerts,
            webhook,
            unsealed: None,
            sealing: None,
            ready: None,
            head: None,
        };
        // The writer runs on a thread of its own, so its commits are not queued behind
        // the requests on the server's runtime (the whole service waits on them).
        let spawned = std::thread::Builder::new()
            .name("arca-audit".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(task.run()),
                    Err(e) => tracing::error!(error = %e, "cannot start the audit writer runtime"),
                }
            });
        if let Err(e) = spawned {
            // No writer: every record fails, so every call fails closed.
            tracing::error!(error = %e, "cannot start the audit writer thread");
        }
        log
    }

    /// Whether the writer holds its HSM-derived keys (digest key and data key) for the
    /// open HSM.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Whether the last batch committed, no store call of the writer has been running
    /// for longer than the timeout (a commit stuck in `fsync`, say), and the writer is
    /// running (a writer that never started or stopped fails every call closed, so it is
    /// not healthy).
    pub fn is_healthy(&self) -> bool {
        let busy = self.busy.load(Ordering::Relaxed);
        let stuck = busy != 0
            && ms_since(self.epoch).saturating_sub(busy - 1) > self.cfg.timeout.as_millis() as u64;
        self.healthy.load(Ordering::Relaxed) && !stuck && !self.tx.is_closed()
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
    /// while the HSM is closed and the digest key not derived).
    pub fn context_digest(&self, canonical: &[u8]) -> Option<String> {
        let key = self.digest.read().ok().and_then(|d| d.clone())?;
        Some(key.digest(canonical))
    }

    /// A fresh per-request slot.
    pub fn slot(&self) -> AuditSlot {
        AuditSlot {
            state: Arc::new(Mutex::new(SlotState::default())),
            digest: self.digest.read().ok().and_then(|d| d.clone()),
        }
    }

    /// A place in the queue for a call's record, taken before the call's handler runs:
    /// `None` when the queue is full (the call must then be refused before it changes
    /// anything; its own record is counted as lost and the count written later).
    pub fn reserve(&self) -> Option<Reservation> {
        match self.tx.clone().try_reserve_owned() {
            Ok(p) => Some(Reservation(p)),
            Err(_) => {
                count_lost(&self.lost, 1);
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
        let (answer, mut wait) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(QUEUED));
        place.0.send(Submission {
            rec,
            done: Some(Waiter {
                answer,
                claim: Arc::clone(&claim),
            }),
        });
        crate::metrics::global()
            .audit_queue_depth
            .store(self.depth(), Ordering::Relaxed);
        match tokio::time::timeout(self.cfg.timeout, &mut wait).await {
            Ok(Ok(r)) => return r,
            Ok(Err(_)) => return Err(AuditError::Unavailable),
            Err(_) => {}
        }
        // Time is up. Still queued: abandoned. In a batch: the channel is closed first,
        // so the writer's answer either came before (and is taken here) or fails (and
        // the writer records the response as withheld).
        let _ = claim.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        wait.close();
        match wait.try_recv() {
            Ok(r) => r,
            Err(_) => Err(AuditError::Unavailable),
        }
    }

    /// Submits a record without waiting (background actions whose outcome does not go
    /// to a caller).
    pub fn record_nowait(&self, mut rec: PendingRecord) {
        rec.details.node.clone_from(&self.cfg.node);
        if self.tx.try_send(Submission { rec, done: None }).is_err() {
            count_lost(&self.lost, 1);
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
        self.record_nowait(PendingRecord {
            time_ms: self.clock.now_ms(),
            kind: Kind::Job,
            operation: operation.to_string(),
            result,
            details: Details {
                auth_method: "system".into(),
                key_name: key.map(|k| k.0.to_string()),
                key_version: key.and_then(|k| k.1),
                detail: (!detail.is_empty()).then(|| detail.to_string()),
                ..Details::default()
            },
        });
    }

    fn depth(&self) -> i64 {
        (self.tx.max_capacity() - self.tx.capacity()) as i64
    }
}

/// A call's place in the audit queue ([`AuditLog::reserve`]).
pub struct Reservation(mpsc::OwnedPermit<Submission>);

/// Counts `n` records that found no place (written later as `audit.records_lost`).
fn count_lost(lost: &AtomicU64, n: u64) {
    lost.fetch_add(n, Ordering::Relaxed);
    crate::metrics::global()
        .audit_records_lost
        .fetch_add(n, Ordering::Relaxed);
}

/// Milliseconds since `epoch`.
fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis().min(u128::from(u64::MAX)) as u64
}

/// A record waiting in the writer under the writer's own number for it (its ticket; its
/// seq is known only once a batch holding it commits).
struct Held {
    ticket: u64,
    rec: PendingRecord,
}

/// A batch whose commit failed or timed out: it may have been stored all the same (a
/// connection lost during `COMMIT`, a transaction the server finished after the writer
/// gave up on it).
struct Attempt {
    /// Which attempt (the writer's count of them).
    id: u64,
    /// The head it was built on: its head update is conditional on it.
    before: (u64, [u8; 32]),
    /// Its last row.
    last: (u64, [u8; 32]),
    /// Its records.
    tickets: Vec<u64>,
}

#[derive(Default)]
struct SlotState {
    principal: String,
    auth_method: String,
    key_name: Option<String>,
    key_version: Option<u32>,
    context_digest: Option<String>,
}

/// What a request's handlers learn for its record (principal, key, context digest).
/// Cloned into the request extensions by the transport; filled by authentication and the
/// handlers; read once when the response is ready.
#[derive(Clone)]
pub struct AuditSlot {
    state: Arc<Mutex<SlotState>>,
    digest: Option<Arc<DigestKey>>,
}

impl AuditSlot {
    /// Whether context digests can be made (the HSM is open and the key derived).
    pub fn can_digest(&self) -> bool {
        self.digest.is_some()
    }

    /// The authenticated principal and how it authenticated.
    pub fn principal(&self, name: &str, method: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.principal = name.to_string();
            s.auth_method = method.to_string();
        }
    }

    /// The key (and version) the call is about.
    pub fn key(&self, name: &str, version: Option<u32>) {
        if let Ok(mut s) = self.state.lock() {
            if !name.is_empty() {
                s.key_name = Some(name.to_string());
            }
            if version.is_some() {
                s.key_version = version;
            }
        }
    }

    /// The canonical encryption context: only its keyed digest is kept.
    pub fn context(&self, canonical: &[u8]) {
        if let (Some(d), Ok(mut s)) = (&self.digest, self.state.lock()) {
            s.context_digest = Some(d.digest(canonical));
        }
    }

    /// Fills `details` from the slot.
    pub fn fill(&self, details: &mut Details) {
        if let Ok(mut s) = self.state.lock() {
            if !s.principal.is_empty() {
                details.principal = std::mem::take(&mut s.principal);
                details.auth_method = std::mem::take(&mut s.auth_method);
            }
            details.key_name = s.key_name.take();
            details.key_version = s.key_version.take();
            details.context_digest = s.context_digest.take();
        }
    }
}

struct Writer {
    rx: mpsc::Receiver<Submission>,
    keys_ready: Arc<AtomicBool>,
    store: Arc<dyn AuditStore>,
    keys: Arc<dyn AuditKeys>,
    clock: Arc<dyn Clock>,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    busy: Arc<AtomicU64>,
    epoch: Instant,
    digest: Arc<RwLock<Option<Arc<DigestKey>>>>,
    sink: Option<CheckpointSink>,
    cfg: AuditConfig,
    dek: Option<DataKey>,
    dek_used: u64,
    open: bool,
    /// Records not yet stored: those of failed batches, and job records of the writer.
    carry: Vec<Held>,
    next_ticket: u64,
    /// Failed batches that may have been stored all the same, all built on one head.
    unresolved: Vec<Attempt>,
    /// The batch being committed, once its rows are built (see [`Writer::commit`]).
    in_flight: Arc<Mutex<Option<Attempt>>>,
    /// Commit attempts made.
    attempts: u64,
    /// After the HSM sealed: until when the data key stays (and longer while the carry
    /// holds records).
    retain_until: Option<Instant>,
    outage_noted: bool,
    alerts: AlertEngine,
    webhook: Option<Webhook>,
    /// The newest committed head no seal has been started for.
    unsealed: Option<(u64, [u8; 32])>,
    /// The HMAC in flight.
    sealing: Option<tokio::task::JoinHandle<Option<AuditSeal>>>,
    /// A seal computed and not yet stored.
    ready: Option<AuditSeal>,
    /// The head this writer committed last (`None` until the first commit, and after a
    /// failure).
    head: Option<(u64, [u8; 32])>,
}

impl Writer {
    /// Collects a finished seal, and starts sealing the newest head if none is in flight.
    async fn poll_seal(&mut self) {
        if self.sealing.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = self.sealing.take() {
                if let Ok(Some(s)) = t.await {
                    if self.ready.as_ref().is_none_or(|r| r.seq < s.seq) {
                        self.ready = Some(s);
                    }
                }
            }
        }
        if self.sealing.is_none() && self.open {
            if let Some((seq, head)) = self.unsealed.take() {
                let keys = Arc::clone(&self.keys);
                let node = self.cfg.node.clone();
                let now = self.clock.now_ms();
                self.sealing = Some(tokio::spawn(async move {
                    match keys.mac(seal_input(&head, seq)).await {
                        Ok(mac) => Some(AuditSeal {
                            seq,
                            head,
                            seal: *mac,
                            node,
                            time_ms: now,
                        }),
                        Err(e) => {
                            tracing::warn!(error = %e, "audit head not sealed (a later seal covers it)");
                            None
                        }
                    }
                }));
            }
        }
    }

    async fn run(mut self) {
        loop {
            let first = tokio::select! {
                s = self.rx.recv() => match s {
                    Some(s) => Some(s),
                    None => break,
                },
                _ = tokio::time::sleep(TICK) => None,
            };
            self.refresh().await;
            self.poll_seal().await;
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
            // Left counted while the carry is full, so the note keeps the whole count.
            let lost = if self.carry.len() < MAX_CARRY {
                self.lost.swap(0, Ordering::Relaxed)
            } else {
                0
            };
            if lost > 0 {
                let note = self.job_record(
                    "audit.records_lost",
                    codes::DATA_LOSS,
                    &format!(
                        "count={lost}: records that found the audit queue full (calls refused before their handlers ran; background records not written)"
                    ),
                );
                self.hold(note);
            }
            if batch.is_empty() && self.carry.is_empty() && self.unresolved.is_empty() {
                if self.ready.is_some() {
                    // Idle: store the seal on its own (kept if that fails, so the next
                    // tick tries again and health recovers without traffic).
                    let stored = self.commit_bounded(&[]).await;
                    self.note_outcome(stored.as_ref().err());
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
            if !self.open && self.keys.is_open() {
                // Unsealed since this pass's look: set up the keys before building rows.
                self.refresh().await;
            }
            let started = Instant::now();
            // First find out whether a batch that failed earlier was stored after all,
            // since its records are in the carry.
            let mut outcome = if self.unresolved.is_empty() {
                Ok(())
            } else {
                match self.bounded(Self::resolve).await {
                    Ok(Some(a)) => {
                        self.landed_late(&a);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            let carried = self.carry.len();
            let mut records: Vec<Held> = std::mem::take(&mut self.carry);
            for s in &batch {
                records.push(Held {
                    ticket: self.ticket(),
                    rec: s.rec.clone(),
                });
            }
            let mut first_seq = 0;
            let mut this_round = None;
            if outcome.is_ok() {
                let committed = self.commit_bounded(&records).await;
                if committed.is_err() {
                    // Whatever reached the store may be there: find out before writing
                    // its records again.
                    let attempt = self.in_flight.lock().ok().and_then(|mut a| a.take());
                    this_round = attempt.as_ref().map(|a| a.id);
                    self.unresolved.extend(attempt);
                }
                outcome = committed.map(|f| first_seq = f);
            }
            let mut late = None;
            if outcome.is_err() && !self.unresolved.is_empty() {
                // A commit can fail after it happened (a connection lost during COMMIT, a
                // timeout while the statement finishes): look before answering.
                if let Ok(Ok(Some(a))) = tokio::time::timeout(TICK, self.resolve()).await {
                    if Some(a.id) == this_round {
                        outcome = Ok(());
                        first_seq = a.before.0 + 1;
                    } else {
                        late = Some(a);
                    }
                }
            }
            let m = crate::metrics::global();
            self.note_outcome(outcome.as_ref().err());
            match outcome {
                Ok(()) => {
                    m.audit_commit.observe(started.elapsed());
                    m.audit_batches.fetch_add(1, Ordering::Relaxed);
                    m.audit_records
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    self.outage_noted = false;
                    let mut gone = Vec::new();
                    for (i, (s, taken)) in batch.into_iter().zip(taken).enumerate() {
                        let seq = first_seq + (carried + i) as u64;
                        if let Some(done) = s.done {
                            if done.answer.send(Ok(seq)).is_err() && taken {
                                // Its caller's time ran out while the batch committed.
                                gone.push(seq);
                            }
                        }
                    }
                    if !gone.is_empty() {
                        let note = self.job_record(
                            "audit.responses_withheld",
                            codes::UNAVAILABLE,
                            &withheld_detail(&gone),
                        );
                        self.hold(note);
                    }
                    for r in &records {
                        for f in self.alerts.observe(&r.rec) {
                            self.raise(f);
                        }
                    }
                }
                Err(_) => {
                    m.audit_failures.fetch_add(1, Ordering::Relaxed);
                    // The carry as it was (with anything resolving put there), then a
                    // note of the outage, then this batch's records, refused.
                    let mut kept: Vec<Held> = records.drain(..carried).collect();
                    kept.append(&mut self.carry);
                    self.carry = kept;
                    if !self.outage_noted {
                        self.outage_noted = true;
                        let note = self.job_record("audit.write_failed", codes::UNAVAILABLE, "");
                        self.hold(note);
                    }
                    for (s, mut held) in batch.into_iter().zip(records) {
                        if let Some(done) = s.done {
                            // The response is withheld: the record says so, and what the
                            // handler had answered (it may have changed state).
                            withheld(&mut held.rec, "audit write failed");
                            let _ = done.answer.send(Err(AuditError::Unavailable));
                        }
                        self.keep(held);
                    }
                }
            }
            if let Some(a) = late {
                self.landed_late(&a);
            }
        }
    }

    /// Runs one of the writer's store calls, bounded by the commit timeout and marked
    /// busy meanwhile (health reports a call stuck past the timeout).
    async fn bounded<'a, T, F>(&'a mut self, call: F) -> Result<T, AuditError>
    where
        F: FnOnce(&'a mut Self) -> BoxFuture<'a, Result<T, AuditError>>,
    {
        let limit = self.cfg.commit_timeout;
        let busy = Arc::clone(&self.busy);
        busy.store(ms_since(self.epoch) + 1, Ordering::Relaxed);
        let r = match tokio::time::timeout(limit, call(self)).await {
            Ok(r) => r,
            Err(_) => Err(AuditError::Unavailable),
        };
        busy.store(0, Ordering::Relaxed);
        r
    }

    /// Health after a store call: healthy again after a success, failing (logged once
    /// per outage) after an error.
    fn note_outcome(&self, err: Option<&AuditError>) {
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

    fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// Puts a job record of the writer in the carry.
    fn hold(&mut self, rec: PendingRecord) {
        let ticket = self.ticket();
        self.keep(Held { ticket, rec });
    }

    /// Keeps a record for the next batch, unless the carry is full (then it is counted
    /// as lost, and the count written later).
    fn keep(&mut self, held: Held) {
        if self.carry.len() < MAX_CARRY {
            self.carry.push(held);
        } else {
            count_lost(&self.lost, 1);
        }
    }

    fn job_record(&self, operation: &str, result: u32, detail: &str) -> PendingRecord {
        PendingRecord {
            time_ms: self.clock.now_ms(),
            kind: Kind::Job,
            operation: operation.to_string(),
            result,
            details: Details {
                node: self.cfg.node.clone(),
                auth_method: "system".into(),
                detail: (!detail.is_empty()).then(|| detail.to_string()),
                ..Details::default()
            },
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
        self.hold(rec);
    }

    /// Follows the seal state: on unseal, makes `arca:audit-mac` if needed, derives the
    /// digest key and makes a data key; on seal, forgets both.
    async fn refresh(&mut self) {
        let open = self.keys.is_open();
        if !open {
            self.keys_ready.store(false, Ordering::Relaxed);
            if self.open {
                self.open = false;
                // Records of calls made while the HSM was open may still be queued or
                // carried: they are encrypted under the data key kept for a while, not
                // written in clear.
                self.retain_until = Some(Instant::now() + self.cfg.timeout + RETAIN_DEK);
                if let Ok(mut d) = self.digest.write() {
                    *d = None;
                }
            }
            if self
                .retain_until
                .is_some_and(|t| Instant::now() >= t && self.carry.is_empty())
            {
                self.retain_until = None;
                self.dek = None;
            }
            return;
        }
        self.retain_until = None;
        if !self.open {
            if let Err(e) = self.keys.ensure().await {
                tracing::error!(error = %e, "cannot make the HSM system key arca:audit-mac");
                return;
            }
            match self.keys.mac(DigestKey::LABEL.to_vec()).await {
                Ok(k) => {
                    if let Ok(mut d) = self.digest.write() {
                        *d = Some(Arc::new(DigestKey(k)));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot derive the audit digest key");
                    return;
                }
            }
            self.open = true;
        }
        if self.dek.is_none() || self.dek_used >= DEK_RECORDS {
            let made = match tokio::time::timeout(self.cfg.commit_timeout, self.new_dek()).await {
                Ok(r) => r,
                Err(_) => Err(AuditError::Unavailable),
            };
            match made {
                Ok((d, derived)) => {
                    if derived {
                        let note = self.job_record(
                            "audit.derived_data_key",
                            codes::OK,
                            &format!("data key {}: the HSM could not seal it under arca:meta; derived from arca:audit-mac", d.id),
                        );
                        self.hold(note);
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
        self.keys_ready.store(self.dek.is_some(), Ordering::Relaxed);
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

    /// [`Writer::commit`], bounded like every store call; the seal it took is put back
    /// if it fails (a commit dropped by the timeout cannot do that itself).
    async fn commit_bounded(&mut self, records: &[Held]) -> Result<u64, AuditError> {
        let seal = self.ready.clone();
        let r = self.bounded(|w| Box::pin(w.commit(records))).await;
        if r.is_err() && self.ready.is_none() {
            self.ready = seal;
        }
        r
    }

    /// Finds out what became of the unresolved attempts, and returns the one stored, if
    /// any. First the head, then the attempts' last rows: an attempt stored before the
    /// head was read is visible then. One found stored: every other attempt is void (all
    /// were built on one head). None found: those built on another head than the current
    /// one are void; those built on it may still commit (a PostgreSQL transaction the
    /// writer gave up on), and the next batch, built on the same head, races them safely:
    /// only one of them can move the head.
    fn resolve(&mut self) -> BoxFuture<'_, Result<Option<Attempt>, AuditError>> {
        Box::pin(async move {
            let head = self.store.audit_head().await?;
            let mut stored = None;
            // Newest first: while sealed, rows are not encrypted, so an older attempt of the
            // same records at the same seqs has the same rows as a newer one.
            for (i, a) in self.unresolved.iter().enumerate().rev() {
                if head.0 < a.last.0 {
                    continue;
                }
                match self.store.audit_row(a.last.0).await {
                    Ok(row) if row.hash == a.last.1 => {
                        stored = Some(i);
                        break;
                    }
                    Ok(_) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.head = Some(head);
            let Some(i) = stored else {
                self.unresolved.retain(|a| a.before == head);
                return Ok(None);
            };
            let a = self.unresolved.swap_remove(i);
            self.unresolved.clear();
            self.unsealed = Some(a.last);
            tracing::warn!(
                first_seq = a.before.0 + 1,
                last_seq = a.last.0,
                "an audit batch reported as failed was stored; not written again"
            );
            Ok(Some(a))
        })
    }

    /// An earlier batch, whose callers were refused, found stored: its records leave the
    /// carry, and a record says what happened.
    fn landed_late(&mut self, a: &Attempt) {
        let done: std::collections::HashSet<u64> = a.tickets.iter().copied().collect();
        let (stored, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.carry)
            .into_iter()
            .partition(|h| done.contains(&h.ticket));
        self.carry = kept;
        // They are in the log: the alert rules see them as they see every stored record.
        for h in &stored {
            for f in self.alerts.observe(&h.rec) {
                self.raise(f);
            }
        }
        let note = self.job_record(
            "audit.late_commit",
            codes::UNAVAILABLE,
            &format!(
                "seq {}..={} were stored after their write was reported failed: the calls among them were answered UNAVAILABLE",
                a.before.0 + 1,
                a.last.0
            ),
        );
        self.hold(note);
    }

    /// Appends `records` (and the ready seal, if any) in one transaction; returns the
    /// first seq.
    ///
    /// Fast path: built on the head this writer committed last, before the transaction
    /// (one round trip on SQLite). Locking path, when the head is unknown or another
    /// writer moved it: the store takes the head inside the transaction and the batch is
    /// built on it there. Either way the attempt is noted in `in_flight` before it can
    /// reach the store, so a failure (or the timeout dropping this future) leaves it to
    /// be resolved. While attempts are unresolved the locking path is not taken: a moved
    /// head may be one of them having landed, and a batch built on it would hold their
    /// records a second time.
    async fn commit(&mut self, records: &[Held]) -> Result<u64, AuditError> {
        let dek = if self.open || self.retain_until.is_some() {
            self.dek.as_ref()
        } else {
            None
        };
        // Never in clear while the HSM is open (a data key not made yet, or the HSM
        // open but its system keys not set up).
        if dek.is_none() && !records.is_empty() && (self.open || self.keys.is_open()) {
            return Err(AuditError::Unavailable);
        }
        self.attempts += 1;
        let attempt = self.attempts;
        // Every encryption counts against the data key's bound, stored or not.
        let encrypted = if dek.is_some() {
            records.len() as u64
        } else {
            0
        };
        let tickets: Vec<u64> = records.iter().map(|r| r.ticket).collect();
        let seal = self.ready.take();
        let fast = match self.head {
            Some(h) => match build_rows(h.0, h.1, records.iter().map(|r| &r.rec), dek) {
                Ok(rows) => {
                    self.dek_used += encrypted;
                    note_attempt(&self.in_flight, attempt, h, &rows, &tickets);
                    let batch = AuditAppend {
                        rows,
                        seal: seal.clone(),
                    };
                    match self.store.audit_append_at(h, batch).await {
                        Ok(nh) => Some(Ok(nh)),
                        Err(StoreError::AlreadyExists | StoreError::Conflict(_)) => {
                            // Refused whole: nothing of it was stored.
                            clear_attempt(&self.in_flight);
                            if self.unresolved.is_empty() {
                                None
                            } else {
                                Some(Err(AuditError::Unavailable))
                            }
                        }
                        Err(e) => Some(Err(e.into())),
                    }
                }
                Err(e) => Some(Err(e)),
            },
            None if self.unresolved.is_empty() => None,
            None => Some(Err(AuditError::Unavailable)),
        };
        let appended = match fast {
            Some(r) => r,
            None => {
                self.dek_used += encrypted;
                let in_flight = Arc::clone(&self.in_flight);
                let carried = seal.clone();
                let tickets = &tickets;
                let build =
                    move |seq: u64,
                          prev: [u8; 32]|
                          -> BoxFuture<'_, Result<AuditAppend, StoreError>> {
                        let seal = carried.clone();
                        let in_flight = Arc::clone(&in_flight);
                        Box::pin(async move {
                            let rows = build_rows(seq, prev, records.iter().map(|r| &r.rec), dek)
                                .map_err(|_| StoreError::Corrupt("audit batch"))?;
                            note_attempt(&in_flight, attempt, (seq, prev), &rows, tickets);
                            Ok(AuditAppend { rows, seal })
                        })
                    };
                self.store
                    .audit_append(&build)
                    .await
                    .map_err(AuditError::from)
            }
        };
        let (last_seq, last_hash) = match appended {
            Ok(h) => h,
            Err(e) => {
                // (`commit_bounded` puts the seal back.)
                self.head = None;
                return Err(e);
            }
        };
        clear_attempt(&self.in_flight);
        self.head = Some((last_seq, last_hash));
        if !records.is_empty() {
            // Rows stored on the head every unresolved attempt was built on: they are
            // void now. (A seal alone does not move the head.)
            self.unresolved.clear();
            self.unsealed = Some((last_seq, last_hash));
        }
        if let (Some(sink), Some(s)) = (&self.sink, seal) {
            sink.push(Checkpoint {
                seq: s.seq,
                head: hex::encode(s.head),
                seal: hex::encode(s.seal),
                time: crate::clock::rfc3339(s.time_ms),
            });
        }
        Ok(last_seq + 1 - records.len() as u64)
    }
}

/// Notes an attempt about to reach the store (none for a batch of no rows).
fn note_attempt(
    slot: &Mutex<Option<Attempt>>,
    id: u64,
    before: (u64, [u8; 32]),
    rows: &[crate::store::AuditRow],
    tickets: &[u64],
) {
    if let (Some(last), Ok(mut s)) = (rows.last(), slot.lock()) {
        *s = Some(Attempt {
            id,
            before,
            last: (last.seq, last.hash),
            tickets: tickets.to_vec(),
        });
    }
}

fn clear_attempt(slot: &Mutex<Option<Attempt>>) {
    if let Ok(mut s) = slot.lock() {
        *s = None;
    }
}

/// The detail of an `audit.responses_withheld` record.
fn withheld_detail(seqs: &[u64]) -> String {
    // Every seq, as ranges (`12-15,18`): a batch's seqs are consecutive, so this stays short.
    let mut ranges: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        ranges.push(if i == j {
            seqs[i].to_string()
        } else {
            format!("{}-{}", seqs[i], seqs[j])
        });
        i = j + 1;
    }
    format!(
        "the callers of seq {} gave up before their records were durable: their responses were withheld (UNAVAILABLE)",
        ranges.join(",")
    )
}

/// Marks `rec` as a call whose response was withheld (the caller got `UNAVAILABLE`),
/// keeping the handler's own result in the detail. Idempotent.
fn withheld(rec: &mut PendingRecord, why: &str) {
    if rec.result == codes::UNAVAILABLE
        && rec
            .details
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("response withheld"))
    {
        return;
    }
    rec.details.detail = Some(format!(
        "response withheld ({why}); the handler answered {}",
        super::record::code_name(rec.result)
    ));
    rec.result = codes::UNAVAILABLE;
}

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

#[cfg(test)]
mod detail_tests {
    #[test]
    fn withheld_seqs_are_named_as_ranges() {
        let d = super::withheld_detail(&[3, 5, 6, 7, 9]);
        assert!(d.starts_with("the callers of seq 3,5-7,9 gave up"), "{d}");
    }
}
