//! The writer, verifier and reader on a real SQLite store and the in-memory HSM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::fake::FakeHsm;
use zeroize::Zeroizing;

use super::alerts::{AlertEngine, AlertPolicy};
use super::record::codes;
use super::verify::{query, verify, Filter, Problem};
use super::*;
use crate::clock::SystemClock;
use crate::keys::{EngineConfig, KeyEngine};
use crate::store::{AuditStore, SqlStore};

pub(crate) struct TestKeys {
    engine: KeyEngine,
    open: AtomicBool,
    /// Refuse to seal (an HSM reached through a transport without AES-GCM).
    no_gcm: AtomicBool,
}

#[async_trait::async_trait]
impl AuditKeys for TestKeys {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }
    async fn ensure(&self) -> Result<(), AuditError> {
        self.engine
            .ensure_audit_mac_key()
            .await
            .map_err(|_| AuditError::Hsm)?;
        self.engine
            .ensure_meta_key()
            .await
            .map_err(|_| AuditError::Hsm)?;
        Ok(())
    }
    async fn mac(&self, data: Vec<u8>) -> Result<Zeroizing<[u8; 32]>, AuditError> {
        self.engine
            .audit_mac(data)
            .await
            .map_err(|_| AuditError::Hsm)
    }
    async fn random32(&self) -> Result<Zeroizing<[u8; 32]>, AuditError> {
        Ok(Zeroizing::new(
            self.engine
                .random::<32>()
                .await
                .map_err(|_| AuditError::Hsm)?,
        ))
    }
    async fn seal_meta(&self, aad: Vec<u8>, p: Zeroizing<Vec<u8>>) -> Result<Vec<u8>, AuditError> {
        if self.no_gcm.load(Ordering::SeqCst) {
            return Err(AuditError::Hsm);
        }
        self.engine
            .seal_meta(aad, p)
            .await
            .map_err(|_| AuditError::Hsm)
    }
    async fn open_meta(&self, aad: Vec<u8>, s: Vec<u8>) -> Result<Zeroizing<Vec<u8>>, AuditError> {
        self.engine
            .open_meta(aad, s)
            .await
            .map_err(|_| AuditError::Hsm)
    }
}

pub(crate) struct World {
    dir: tempfile::TempDir,
    pub(crate) store: Arc<SqlStore>,
    pub(crate) keys: Arc<TestKeys>,
    pub(crate) log: Arc<AuditLog>,
}

/// A fresh SQLite store in a temporary directory.
async fn sqlite_store() -> (tempfile::TempDir, Arc<SqlStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open_sqlite(&dir.path().join("a.db"))
            .await
            .unwrap(),
    );
    (dir, store)
}

/// A writer over `store`, with a fake HSM (open or sealed) and the default alert rules.
fn start_log(
    store: Arc<dyn AuditStore>,
    open: bool,
    cfg: AuditConfig,
) -> (Arc<TestKeys>, Arc<AuditLog>) {
    let engine = KeyEngine::start(Arc::new(FakeHsm::new()), &EngineConfig::default()).unwrap();
    let keys = Arc::new(TestKeys {
        engine,
        open: AtomicBool::new(open),
        no_gcm: AtomicBool::new(false),
    });
    let log = AuditLog::start(
        store,
        keys.clone(),
        Arc::new(SystemClock),
        cfg,
        AlertEngine::new(&AlertPolicy::parse(alerts::DEFAULT_ALERTS).unwrap()),
        None,
    );
    (keys, log)
}

pub(crate) async fn world(open: bool) -> World {
    let (dir, store) = sqlite_store().await;
    let cfg = AuditConfig {
        node: "n1".into(),
        checkpoints: Some(dir.path().join("cp.jsonl")),
        ..AuditConfig::default()
    };
    let (keys, log) = start_log(store.clone(), open, cfg);
    World {
        dir,
        store,
        keys,
        log,
    }
}

fn rec(op: &str, principal: &str, key: &str) -> PendingRecord {
    PendingRecord {
        time_ms: SystemClock.now_ms(),
        kind: Kind::Rpc,
        operation: op.into(),
        result: 0,
        details: Details {
            principal: principal.into(),
            auth_method: "token".into(),
            key_name: Some(key.into()),
            ..Details::default()
        },
    }
}

use crate::clock::Clock;

/// Waits until a seal covers `seq` (seals trail the head by about one batch).
async fn wait_sealed(w: &World, seq: u64) {
    for _ in 0..200 {
        if w.store
            .audit_seals(1)
            .await
            .unwrap()
            .last()
            .is_some_and(|s| s.seq >= seq)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no seal reached seq {seq}");
}

async fn wait_open(w: &World) {
    // The writer notices the open HSM within a tick.
    for _ in 0..100 {
        if w.log.context_digest(b"").is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("writer did not notice the open HSM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_gapless_sealed_encrypted_and_verify() {
    let w = world(true).await;
    wait_open(&w).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let log = w.log.clone();
        tasks.push(tokio::spawn(async move {
            log.record(rec("UnwrapKey", &format!("svc:{}", i % 3), "k1"))
                .await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    wait_sealed(&w, 300).await;
    // Fewer batches than records: group commit.
    let seals = w.store.audit_seals(1).await.unwrap();
    assert!(
        !seals.is_empty() && seals.len() < 300,
        "{} seals",
        seals.len()
    );
    let r = verify(
        w.store.as_ref(),
        w.keys.as_ref(),
        Some(&w.dir.path().join("cp.jsonl")),
        1,
    )
    .await
    .unwrap();
    assert!(r.ok, "{r:?}");
    assert!(r.records >= 300);
    assert!(r.seal_macs_checked && r.seals_checked > 0);
    // Stored bodies do not show principals; the reader decrypts them.
    let rows = w.store.audit_rows(1, 10).await.unwrap();
    assert!(!String::from_utf8_lossy(&rows[0].body).contains("svc:"));
    let (found, _) = query(
        w.store.as_ref(),
        w.keys.as_ref(),
        &Filter {
            principal: Some("svc:1".into()),
            ..Filter::default()
        },
        1,
        1000,
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 100);
    assert!(found.iter().all(|r| r.details.principal == "svc:1"
        && r.details.node == "n1"
        && r.details.key_name.as_deref() == Some("k1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_records_are_clear_and_the_next_seal_covers_them() {
    let w = world(false).await;
    w.log
        .record(rec("Unseal", "custodian-1", ""))
        .await
        .unwrap();
    assert!(w.store.audit_seals(1).await.unwrap().is_empty());
    w.keys.open.store(true, Ordering::SeqCst);
    wait_open(&w).await;
    w.log.record(rec("GetKey", "a", "k")).await.unwrap();
    wait_sealed(&w, 2).await;
    let seals = w.store.audit_seals(1).await.unwrap();
    assert_eq!(seals.last().unwrap().seq, 2);
    let r = verify(w.store.as_ref(), w.keys.as_ref(), None, 1)
        .await
        .unwrap();
    assert!(r.ok && r.unsealed_tail == 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_lost_checkpoint_is_found() {
    let w = world(true).await;
    wait_open(&w).await;
    for _ in 0..3 {
        w.log.record(rec("GetKey", "a", "k")).await.unwrap();
    }
    wait_sealed(&w, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cp = w.dir.path().join("cp.jsonl");
    let lines = checkpoint::read(&cp).unwrap();
    assert!(!lines.is_empty());
    // A checkpoint beyond the end: the tail was cut.
    let mut ahead = lines.last().unwrap().clone();
    ahead.seq += 5;
    let path = w.dir.path().join("cp2.jsonl");
    std::fs::write(
        &path,
        format!("{}\n", serde_json::to_string(&ahead).unwrap()),
    )
    .unwrap();
    let r = verify(w.store.as_ref(), w.keys.as_ref(), Some(&path), 1)
        .await
        .unwrap();
    assert_eq!(r.problem, Some(Problem::Truncated), "{r:?}");
    assert_eq!(r.first_bad_seq, Some(4));
    // A checkpoint whose seal the HSM did not make.
    let mut forged = lines[0].clone();
    forged.seal = hex::encode([9u8; 32]);
    forged.seq = 2;
    forged.head = hex::encode(w.store.audit_row(2).await.unwrap().hash);
    std::fs::write(
        &path,
        format!("{}\n", serde_json::to_string(&forged).unwrap()),
    )
    .unwrap();
    let r = verify(w.store.as_ref(), w.keys.as_ref(), Some(&path), 1)
        .await
        .unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.problem, Some(Problem::Modified));
}

/// A store whose fast-path appends commit and then report a failure (a connection lost
/// during `COMMIT`), `lose` times, whose appends take `delay_ms` longer, and whose row
/// reads fail `blind` times.
struct LostAnswers {
    inner: Arc<SqlStore>,
    lose: std::sync::atomic::AtomicU32,
    delay_ms: std::sync::atomic::AtomicU64,
    blind: std::sync::atomic::AtomicU32,
}

impl LostAnswers {
    fn over(inner: Arc<SqlStore>) -> Arc<LostAnswers> {
        Arc::new(LostAnswers {
            inner,
            lose: std::sync::atomic::AtomicU32::new(0),
            delay_ms: std::sync::atomic::AtomicU64::new(0),
            blind: std::sync::atomic::AtomicU32::new(0),
        })
    }

    async fn delay(&self) {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

#[async_trait::async_trait]
impl AuditStore for LostAnswers {
    async fn audit_append(
        &self,
        build: &crate::store::AppendBuilder<'_>,
    ) -> crate::store::Result<(u64, [u8; 32])> {
        self.delay().await;
        self.inner.audit_append(build).await
    }
    async fn audit_append_at(
        &self,
        head: (u64, [u8; 32]),
        batch: crate::store::AuditAppend,
    ) -> crate::store::Result<(u64, [u8; 32])> {
        self.delay().await;
        let r = self.inner.audit_append_at(head, batch).await?;
        let left = self.lose.load(Ordering::SeqCst);
        if left > 0 && r != head {
            self.lose.store(left - 1, Ordering::SeqCst);
            return Err(crate::store::StoreError::Corrupt(
                "answer lost after COMMIT",
            ));
        }
        Ok(r)
    }
    async fn audit_insert_dek(
        &self,
        id: &str,
        sealed: &[u8],
        now: i64,
    ) -> crate::store::Result<()> {
        self.inner.audit_insert_dek(id, sealed, now).await
    }
    async fn audit_dek(&self, id: &str) -> crate::store::Result<Vec<u8>> {
        self.inner.audit_dek(id).await
    }
    async fn audit_rows(
        &self,
        from: u64,
        limit: u32,
    ) -> crate::store::Result<Vec<crate::store::AuditRow>> {
        self.inner.audit_rows(from, limit).await
    }
    async fn audit_rows_in_time(
        &self,
        from: u64,
        since: i64,
        until: i64,
        limit: u32,
    ) -> crate::store::Result<Vec<crate::store::AuditRow>> {
        self.inner
            .audit_rows_in_time(from, since, until, limit)
            .await
    }
    async fn audit_row(&self, seq: u64) -> crate::store::Result<crate::store::AuditRow> {
        let left = self.blind.load(Ordering::SeqCst);
        if left > 0 {
            self.blind.store(left - 1, Ordering::SeqCst);
            return Err(crate::store::StoreError::Unavailable("blind".into()));
        }
        self.inner.audit_row(seq).await
    }
    async fn audit_seals(&self, from: u64) -> crate::store::Result<Vec<crate::store::AuditSeal>> {
        self.inner.audit_seals(from).await
    }
    async fn audit_head(&self) -> crate::store::Result<(u64, [u8; 32])> {
        self.inner.audit_head().await
    }
}

type FaultyWorld = (
    tempfile::TempDir,
    Arc<SqlStore>,
    Arc<LostAnswers>,
    Arc<TestKeys>,
    Arc<AuditLog>,
);

/// A writer (HSM open) over a SQLite store wrapped in [`LostAnswers`].
async fn over_faulty_store(cfg: AuditConfig) -> FaultyWorld {
    let (dir, inner) = sqlite_store().await;
    let store = LostAnswers::over(inner.clone());
    let (keys, log) = start_log(store.clone(), true, cfg);
    (dir, inner, store, keys, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_before_its_commit_failed_is_not_written_twice() {
    let (_dir, inner, store, keys, log) = over_faulty_store(AuditConfig::default()).await;
    // The first commits take the locking path; once the writer knows its head, later
    // batches take the fast path, whose answers are now lost three times.
    for i in 0..5 {
        log.record(rec("UnwrapKey", "svc:a", &format!("k{i}")))
            .await
            .unwrap();
    }
    store.lose.store(3, Ordering::SeqCst);
    for i in 5..20 {
        log.record(rec("UnwrapKey", "svc:a", &format!("k{i}")))
            .await
            .unwrap();
    }
    assert_eq!(store.lose.load(Ordering::SeqCst), 0, "no answer was lost");
    // 20 records, each once, gapless, and the chain verifies.
    let rows = inner.audit_rows(1, 100).await.unwrap();
    let rpc: Vec<_> = rows.iter().filter(|r| r.kind == "rpc").collect();
    assert_eq!(
        rpc.len(),
        20,
        "{:?}",
        rows.iter().map(|r| r.seq).collect::<Vec<_>>()
    );
    let r = verify(inner.as_ref(), keys.as_ref(), None, 1)
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
}

/// The decrypted records of `operation`.
pub(crate) async fn records_of(
    store: &dyn AuditStore,
    keys: &dyn AuditKeys,
    operation: &str,
) -> Vec<super::Record> {
    query(
        store,
        keys,
        &Filter {
            operation: Some(operation.into()),
            ..Filter::default()
        },
        1,
        1000,
    )
    .await
    .unwrap()
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_waits_at_most_its_timeout_and_the_log_says_what_it_heard() {
    let (_dir, inner, store, keys, log) = over_faulty_store(AuditConfig {
        timeout: Duration::from_millis(300),
        commit_timeout: Duration::from_millis(2000),
        ..AuditConfig::default()
    })
    .await;
    log.record(rec("UnwrapKey", "svc:a", "warm")).await.unwrap();
    // Every commit now takes 700 ms: longer than a caller's 300 ms, shorter than the
    // commit timeout.
    store.delay_ms.store(700, Ordering::SeqCst);
    let first = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            (
                log.record(rec("UnwrapKey", "svc:a", "in-batch")).await,
                t.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued behind the slow commit: its caller gives up at its timeout.
    let second = log.record(rec("UnwrapKey", "svc:a", "queued")).await;
    assert!(matches!(second, Err(AuditError::Unavailable)), "{second:?}");
    // In the batch when its caller's time ran out: it does not wait for the batch.
    let (first, waited) = first.await.unwrap();
    assert!(matches!(first, Err(AuditError::Unavailable)), "{first:?}");
    assert!(waited < Duration::from_millis(650), "waited {waited:?}");
    store.delay_ms.store(0, Ordering::SeqCst);
    let mut withheld = Vec::new();
    for _ in 0..300 {
        withheld = records_of(inner.as_ref(), keys.as_ref(), "audit.responses_withheld").await;
        if !withheld.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rows = inner.audit_rows(1, 100).await.unwrap();
    let rpc: Vec<_> = rows.iter().filter(|r| r.kind == "rpc").collect();
    assert_eq!(rpc.len(), 3, "{rows:?}");
    // The batch that committed late holds the handler's OK, and a later record names
    // its seq as withheld; the abandoned one says UNAVAILABLE itself.
    assert_eq!(rpc[1].result, codes::OK);
    assert_eq!(withheld.len(), 1, "{withheld:?}");
    let detail = withheld[0].details.detail.clone().unwrap_or_default();
    assert!(detail.contains(&format!("seq {} ", rpc[1].seq)), "{detail}");
    assert_eq!(rpc[2].result, codes::UNAVAILABLE);
    let r = verify(inner.as_ref(), keys.as_ref(), None, 1)
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_found_stored_only_later_is_not_written_twice_and_is_noted() {
    let (_dir, inner, store, keys, log) = over_faulty_store(AuditConfig::default()).await;
    log.record(rec("UnwrapKey", "svc:a", "warm")).await.unwrap();
    // The next batch commits, its answer is lost, and the look that follows cannot read
    // the row: its caller is refused, and the writer does not know what was stored.
    store.lose.store(1, Ordering::SeqCst);
    store.blind.store(1, Ordering::SeqCst);
    let r = log.record(rec("UnwrapKey", "svc:a", "lost")).await;
    assert!(matches!(r, Err(AuditError::Unavailable)), "{r:?}");
    // The next batch finds it stored first: its record is not written again.
    log.record(rec("UnwrapKey", "svc:a", "after"))
        .await
        .unwrap();
    let rows = inner.audit_rows(1, 100).await.unwrap();
    let keys_of: Vec<String> = records_of(inner.as_ref(), keys.as_ref(), "UnwrapKey")
        .await
        .into_iter()
        .map(|r| r.details.key_name.unwrap_or_default())
        .collect();
    assert_eq!(keys_of, ["warm", "lost", "after"], "{rows:?}");
    let late = records_of(inner.as_ref(), keys.as_ref(), "audit.late_commit").await;
    assert_eq!(late.len(), 1, "{rows:?}");
    let r = verify(inner.as_ref(), keys.as_ref(), None, 1)
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_before_the_call_and_the_loss_is_recorded() {
    let (dir, store) = sqlite_store().await;
    let (keys, log) = start_log(
        store.clone(),
        true,
        AuditConfig {
            queue: 2,
            checkpoints: Some(dir.path().join("cp.jsonl")),
            ..AuditConfig::default()
        },
    );
    let lost_before = crate::metrics::global()
        .audit_records_lost
        .load(Ordering::Relaxed);
    // Two calls hold the two places; a third finds none (its handler must not run).
    let a = log.reserve().expect("a place");
    let b = log.reserve().expect("a place");
    assert!(log.reserve().is_none());
    assert!(matches!(
        log.record(rec("GetKey", "svc:a", "k")).await,
        Err(AuditError::Unavailable)
    ));
    assert!(
        crate::metrics::global()
            .audit_records_lost
            .load(Ordering::Relaxed)
            >= lost_before + 2
    );
    drop(a);
    log.submit(b, rec("GetKey", "svc:a", "k")).await.unwrap();
    // The next batch says how many records were lost.
    let mut lost = Vec::new();
    for _ in 0..100 {
        log.record(rec("GetKey", "svc:a", "k")).await.unwrap();
        lost = records_of(store.as_ref(), keys.as_ref(), "audit.records_lost").await;
        if !lost.is_empty() {
            break;
        }
    }
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].result, "DATA_LOSS");
    assert!(
        lost[0]
            .details
            .detail
            .as_deref()
            .unwrap_or_default()
            .starts_with("count=2:"),
        "{:?}",
        lost[0].details.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_that_cannot_seal_gets_a_derived_data_key_not_clear_records() {
    let (_dir, store) = sqlite_store().await;
    let (keys, log) = start_log(store.clone(), false, AuditConfig::default());
    keys.no_gcm.store(true, Ordering::SeqCst);
    keys.open.store(true, Ordering::SeqCst);
    for _ in 0..100 {
        if log.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(log.is_ready(), "no data key");
    log.record(rec("GetKey", "svc:secretive", "k"))
        .await
        .unwrap();
    let rows = store.audit_rows(1, 10).await.unwrap();
    let row = rows.iter().find(|r| r.operation == "GetKey").unwrap();
    assert!(!row.dek_id.is_empty());
    assert!(!String::from_utf8_lossy(&row.body).contains("svc:secretive"));
    assert_eq!(
        store.audit_dek(&row.dek_id).await.unwrap(),
        writer::DERIVED_DEK
    );
    // The reader derives it again.
    let found = records_of(store.as_ref(), keys.as_ref(), "GetKey").await;
    assert_eq!(found[0].details.principal, "svc:secretive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_just_after_a_seal_are_still_encrypted() {
    let w = world(true).await;
    wait_open(&w).await;
    w.log.record(rec("GetKey", "a", "k")).await.unwrap();
    // The service seals; a call made while it was open has its record written now.
    w.keys.open.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seq = w
        .log
        .record(rec("UnwrapKey", "svc:late", "k"))
        .await
        .unwrap();
    let row = w.store.audit_row(seq).await.unwrap();
    assert!(!row.dek_id.is_empty(), "written in clear after the seal");
    assert!(!String::from_utf8_lossy(&row.body).contains("svc:late"));
    let found = records_of(w.store.as_ref(), w.keys.as_ref(), "UnwrapKey").await;
    assert_eq!(found[0].details.principal, "svc:late");
}
