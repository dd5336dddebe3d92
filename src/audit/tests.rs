//! The writer, verifier and reader on a real SQLite store and the in-memory HSM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::fake::FakeHsm;
use zeroize::Zeroizing;

use super::alerts::{AlertEngine, AlertPolicy};
use super::verify::{query, verify, Filter, Problem};
use super::*;
use crate::clock::SystemClock;
use crate::keys::{EngineConfig, KeyEngine};
use crate::store::{AuditStore, SqlStore};

struct TestKeys {
    engine: KeyEngine,
    open: AtomicBool,
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
    async fn mac(&self, data: Vec<u8>) -> Result<[u8; 32], AuditError> {
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

struct World {
    dir: tempfile::TempDir,
    store: Arc<SqlStore>,
    keys: Arc<TestKeys>,
    log: Arc<AuditLog>,
}

async fn world(open: bool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open_sqlite(&dir.path().join("a.db"))
            .await
            .unwrap(),
    );
    let engine = KeyEngine::start(Arc::new(FakeHsm::new()), &EngineConfig::default()).unwrap();
    let keys = Arc::new(TestKeys {
        engine,
        open: AtomicBool::new(open),
    });
    let cfg = AuditConfig {
        node: "n1".into(),
        checkpoints: Some(dir.path().join("cp.jsonl")),
        ..AuditConfig::default()
    };
    let log = AuditLog::start(
        store.clone(),
        keys.clone(),
        Arc::new(SystemClock),
        cfg,
        AlertEngine::new(&AlertPolicy::parse(alerts::DEFAULT_ALERTS).unwrap()),
        None,
    );
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
        if w.log.slot().can_digest() {
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
