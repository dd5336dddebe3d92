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
//! - The writer never hangs a request: a full queue refuses at once, a waiter whose
//!   record is still queued gives up after its timeout, and on PostgreSQL a batch that
//!   takes longer than the commit timeout is dropped (its transaction rolls back) and
//!   reported failed. A SQLite append runs synchronously on this thread to its end
//!   (SQLite's busy timeout bounds its wait for the lock), and its outcome is what its
//!   waiters hear.
//! - A record says what its caller heard: a waiter whose record is in a batch waits for
//!   that batch's outcome (so a slow commit that succeeds is not answered `UNAVAILABLE`
//!   beside an OK record), and a record whose waiter gave up first says the response
//!   was withheld.
//! - Records of a failed batch are kept (with result `UNAVAILABLE`, since their requests
//!   were refused) and written when the store recovers, after an `audit.write_failed`
//!   job record; while the store keeps failing, the writer retries every 250 ms, so it
//!   reports healthy again without waiting for traffic.
//! - Details are encrypted under a data key made in the HSM whenever the HSM is open;
//!   the data key lives only in this task's memory and sealed in `audit_deks`.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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
/// How much longer than the commit timeout a caller whose record is in a batch waits for
/// the writer's answer before it gives up: far more than building and checking even a
/// full carry takes, so only a writer bug reaches it.
const WRITER_MARGIN: Duration = Duration::from_secs(10);

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
    /// Records that may wait for the writer.
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
            keys_ready: Arc::clone(&log.ready),
            digest: Arc::clone(&log.digest),
            sink: cfg.checkpoints.clone().map(CheckpointSink::start),
            cfg,
            dek: None,
            dek_used: 0,
            open: false,
            carry: Vec::new(),
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

    /// Whether the last batch committed and the writer is running (a writer that never
    /// started or stopped fails every call closed, so it is not healthy).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.tx.is_closed()
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

    /// A fresh per-request slot.
    pub fn slot(&self) -> AuditSlot {
        AuditSlot {
            state: Arc::new(Mutex::new(SlotState::default())),
            digest: self.digest.read().ok().and_then(|d| d.clone()),
        }
    }

    /// Submits a record and waits until it is durable (or fails, or times out).
    ///
    /// The wait is bounded twice: a record still queued when `timeout` ends is abandoned
    /// (the caller fails `UNAVAILABLE` and the record says the response was withheld); a
    /// record already in a batch waits for that batch's outcome, which the writer bounds
    /// by `commit_timeout`, so what the record says is what the caller hears.
    pub async fn record(&self, mut rec: PendingRecord) -> Result<u64, AuditError> {
        rec.details.node.clone_from(&self.cfg.node);
        let (answer, mut wait) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(QUEUED));
        self.tx
            .try_send(Submission {
                rec,
                done: Some(Waiter {
                    answer,
                    claim: Arc::clone(&claim),
                }),
            })
            .map_err(|_| AuditError::Unavailable)?;
        crate::metrics::global()
            .audit_queue_depth
            .store(self.depth(), Ordering::Relaxed);
        match tokio::time::timeout(self.cfg.timeout, &mut wait).await {
            Ok(Ok(r)) => return r,
            Ok(Err(_)) => return Err(AuditError::Unavailable),
            Err(_) => {}
        }
        if claim
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Err(AuditError::Unavailable);
        }
        // In a batch being committed. The writer answers within its commit timeout, the
        // look-up after a failed commit and the (synchronous) building of the rows; a
        // writer that dies drops the answer channel. The margin is for a writer bug only.
        match tokio::time::timeout(self.cfg.commit_timeout + WRITER_MARGIN, wait).await {
            Ok(Ok(r)) => r,
            _ => Err(AuditError::Unavailable),
        }
    }

    /// Submits a record without waiting (background actions whose outcome does not go
    /// to a caller).
    pub fn record_nowait(&self, mut rec: PendingRecord) {
        rec.details.node.clone_from(&self.cfg.node);
        if self.tx.try_send(Submission { rec, done: None }).is_err() {
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
    digest: Arc<RwLock<Option<Arc<DigestKey>>>>,
    sink: Option<CheckpointSink>,
    cfg: AuditConfig,
    dek: Option<DataKey>,
    dek_used: u64,
    open: bool,
    carry: Vec<PendingRecord>,
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
                            seal: mac,
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
            if batch.is_empty() && self.carry.is_empty() {
                if self.ready.is_some() {
                    // Idle: store the seal on its own.
                    if let Err(e) = self.commit(&[]).await {
                        tracing::warn!(error = %e, "could not store an audit seal");
                    }
                }
                continue;
            }
            let carried = self.carry.len();
            let mut records: Vec<PendingRecord> = std::mem::take(&mut self.carry);
            records.extend(batch.iter_mut().map(|s| {
                // A waiter that gave up (its timeout) answered its caller UNAVAILABLE:
                // its record says so, whatever the handler did. The others wait for
                // this batch's outcome.
                if s.done.as_ref().is_some_and(|d| !d.take()) {
                    withheld(&mut s.rec, "audit record late");
                }
                s.rec.clone()
            }));
            let started = Instant::now();
            let before = self.head;
            let mut outcome =
                match tokio::time::timeout(self.cfg.commit_timeout, self.commit(&records)).await {
                    Ok(r) => r,
                    Err(_) => Err(AuditError::Unavailable),
                };
            if outcome.is_err() {
                // A commit can fail after it happened (a connection lost during COMMIT,
                // a timeout while the statement finishes): writing the batch again would
                // duplicate it, so look first.
                if let Some(first) = self.committed_anyway(before, &records).await {
                    outcome = Ok(first);
                } else {
                    // Whatever the head is now, the next batch reads it under the lock
                    // (a commit dropped by the timeout did not get to forget it).
                    self.head = None;
                }
            }
            let m = crate::metrics::global();
            match outcome {
                Ok(first_seq) => {
                    m.audit_commit.observe(started.elapsed());
                    m.audit_batches.fetch_add(1, Ordering::Relaxed);
                    m.audit_records
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("audit log writable again");
                    }
                    self.outage_noted = false;
                    for (i, s) in batch.into_iter().enumerate() {
                        if let Some(done) = s.done {
                            let _ = done.answer.send(Ok(first_seq + (carried + i) as u64));
                        }
                    }
                    for r in &records {
                        for f in self.alerts.observe(r) {
                            self.raise(f);
                        }
                    }
                }
                Err(e) => {
                    m.audit_failures.fetch_add(1, Ordering::Relaxed);
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        tracing::error!(error = %e, source = ?std::error::Error::source(&e), "audit log write failed: requests fail closed");
                    }
                    records.truncate(carried);
                    self.carry = records;
                    if !self.outage_noted {
                        self.outage_noted = true;
                        self.carry.push(self.job_record(
                            "audit.write_failed",
                            codes::UNAVAILABLE,
                            "",
                        ));
                    }
                    for s in batch {
                        let mut rec = s.rec;
                        if let Some(done) = s.done {
                            // The response is withheld: the record says so, and what the
                            // handler had answered (it may have changed state).
                            withheld(&mut rec, "audit write failed");
                            let _ = done.answer.send(Err(AuditError::Unavailable));
                        }
                        if self.carry.len() < MAX_CARRY {
                            self.carry.push(rec);
                        }
                    }
                }
            }
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
        self.carry.push(rec);
    }

    /// Follows the seal state: on unseal, makes `arca:audit-mac` if needed, derives the
    /// digest key and makes a data key; on seal, forgets both.
    async fn refresh(&mut self) {
        let open = self.keys.is_open();
        if !open {
            self.keys_ready.store(false, Ordering::Relaxed);
            if self.open {
                self.open = false;
                self.dek = None;
                if let Ok(mut d) = self.digest.write() {
                    *d = None;
                }
            }
            return;
        }
        if !self.open {
            if let Err(e) = self.keys.ensure().await {
                tracing::error!(error = %e, "cannot make the HSM system key arca:audit-mac");
                return;
            }
            match self.keys.mac(DigestKey::LABEL.to_vec()).await {
                Ok(k) => {
                    if let Ok(mut d) = self.digest.write() {
                        *d = Some(Arc::new(DigestKey(Zeroizing::new(k))));
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
            match self.new_dek().await {
                Ok(d) => {
                    self.dek = Some(d);
                    self.dek_used = 0;
                }
                Err(e) => tracing::error!(error = %e, "cannot make an audit data key"),
            }
        }
        self.keys_ready.store(self.dek.is_some(), Ordering::Relaxed);
    }

    async fn new_dek(&self) -> Result<DataKey, AuditError> {
        let key = self.keys.random32().await?;
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|_| AuditError::Hsm)?;
        let id = hex::encode(raw);
        let sealed = self
            .keys
            .seal_meta(dek_aad(&id), Zeroizing::new(key.to_vec()))
            .await?;
        self.store
            .audit_insert_dek(&id, &sealed, self.clock.now_ms())
            .await?;
        Ok(DataKey::new(id, key))
    }

    /// After a failed commit on the fast path: whether the batch is stored anyway (its
    /// last row, rebuilt — numbering, encryption and chaining are deterministic — is in
    /// the store with the same hash). Returns its first seq if so.
    async fn committed_anyway(
        &mut self,
        before: Option<(u64, [u8; 32])>,
        records: &[PendingRecord],
    ) -> Option<u64> {
        let before = before?;
        let dek = if self.open { self.dek.as_ref() } else { None };
        let rows = build_rows(before.0, before.1, records, dek).ok()?;
        let last = rows.last()?;
        let stored = tokio::time::timeout(TICK, self.store.audit_row(last.seq))
            .await
            .ok()?
            .ok()?;
        if stored.hash != last.hash {
            return None;
        }
        tracing::warn!(
            last_seq = last.seq,
            "an audit batch reported as failed was stored; not written again"
        );
        self.head = None;
        self.dek_used += records.len() as u64;
        self.unsealed = Some((last.seq, last.hash));
        Some(before.0 + 1)
    }

    /// Appends `records` (and the ready seal, if any) in one transaction; returns the
    /// first seq.
    async fn commit(&mut self, records: &[PendingRecord]) -> Result<u64, AuditError> {
        let dek = if self.open { self.dek.as_ref() } else { None };
        let seal = self.ready.take();
        let carried = seal.clone();
        let build =
            move |seq: u64, prev: [u8; 32]| -> BoxFuture<'_, Result<AuditAppend, StoreError>> {
                let seal = carried.clone();
                Box::pin(async move {
                    let rows = build_rows(seq, prev, records, dek)
                        .map_err(|_| StoreError::Corrupt("audit batch"))?;
                    Ok(AuditAppend { rows, seal })
                })
            };
        // Fast path: on the head this writer committed last, built before the
        // transaction (one round trip on SQLite). If another writer moved the head, or
        // after any failure, the locking path reads the head inside the transaction.
        let fast = match self.head {
            Some(h) => match build_rows(h.0, h.1, records, dek) {
                Ok(rows) => {
                    let batch = AuditAppend {
                        rows,
                        seal: seal.clone(),
                    };
                    match self.store.audit_append_at(h, batch).await {
                        Ok(nh) => Some(Ok(nh)),
                        Err(StoreError::AlreadyExists | StoreError::StateConflict { .. }) => None,
                        Err(e) => Some(Err(e)),
                    }
                }
                Err(e) => {
                    self.ready = seal;
                    return Err(e);
                }
            },
            None => None,
        };
        let appended = match fast {
            Some(r) => r,
            None => self.store.audit_append(&build).await,
        };
        let (last_seq, last_hash) = match appended {
            Ok(h) => h,
            Err(e) => {
                self.head = None;
                self.ready = seal;
                return Err(e.into());
            }
        };
        self.head = Some((last_seq, last_hash));
        self.dek_used += records.len() as u64;
        if !records.is_empty() {
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

/// AAD of a sealed data key.
pub fn dek_aad(id: &str) -> Vec<u8> {
    format!("arca-audit-dek:{id}").into_bytes()
}
