//! Contract of [`AuditStore`]: a seal handed in again is kept once; and on SQLite, an
//! append never waits behind another on the audit writer's own connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{AuditAppend, AuditRow, AuditSeal, AuditStore, Conflict, StoreError};

on_both_backends!(a_seal_handed_in_again_is_kept_once_and_does_not_fail_the_batch);

fn row(seq: u64) -> AuditRow {
    AuditRow {
        seq,
        time_ms: 1,
        kind: "rpc".into(),
        operation: "UnwrapKey".into(),
        result: 0,
        dek_id: String::new(),
        body: b"{}".to_vec(),
        hash: [seq as u8; 32],
    }
}

async fn a_seal_handed_in_again_is_kept_once_and_does_not_fail_the_batch(db: Arc<TestDb>) {
    let store = db.open().await;
    let head = store.audit_head().await.unwrap();
    let h1 = store
        .audit_append_at(
            head,
            AuditAppend {
                rows: vec![row(1)],
                seal: None,
            },
        )
        .await
        .unwrap();
    let seal = AuditSeal {
        seq: 1,
        head: h1.1,
        seal: [5u8; 32],
        node: "n".into(),
        time_ms: 1,
    };
    let with_seal = |seq: u64| AuditAppend {
        rows: vec![row(seq)],
        seal: Some(seal.clone()),
    };
    // Stored with one batch (whose commit was then reported failed, say) and handed
    // in again with the next ones, on both paths.
    let h2 = store.audit_append_at(h1, with_seal(2)).await.unwrap();
    let h3 = store.audit_append_at(h2, with_seal(3)).await.unwrap();
    let h4 = store
        .audit_append(&|_, _| Box::pin(async { Ok(with_seal(4)) }))
        .await
        .unwrap();
    assert_eq!((h3.0, h4.0), (3, 4));
    assert_eq!(store.audit_seals(1).await.unwrap(), vec![seal]);
}

// The held guard stands for another append in progress; the append under test only
// tries the lock, so holding it across the await cannot deadlock.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn an_append_never_waits_behind_one_still_running() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let head = store.audit_head().await.unwrap();
    let batch = || AuditAppend {
        rows: vec![row(head.0 + 1)],
        seal: None,
    };
    // An earlier append still holds the audit connection: this batch fails at once
    // and stores nothing (it must not commit later, after its callers were answered).
    let slot = store.audit_conn.as_ref().unwrap().slot();
    let held = slot.lock().unwrap();
    let r = store.audit_append_at(head, batch()).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    drop(held);
    assert_eq!(store.audit_head().await.unwrap(), head);
    // Free again: the same batch is stored.
    let new = store.audit_append_at(head, batch()).await.unwrap();
    assert_eq!(new, (head.0 + 1, [(head.0 + 1) as u8; 32]));
    assert_eq!(store.audit_head().await.unwrap(), new);
    // A lost race for the head keeps the connection for the next batch.
    let again = store.audit_append_at(head, batch()).await;
    assert!(
        matches!(
            again,
            Err(StoreError::AlreadyExists | StoreError::Conflict(Conflict::AuditHead))
        ),
        "{again:?}"
    );
    assert!(
        slot.lock().unwrap().is_some(),
        "connection kept after a lost race"
    );
}
