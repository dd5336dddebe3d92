//! Contract of [`QuorumStore`]: initialised once, a custodian's TOTP step used once,
//! failures counted within the window, locking at the limit, and attempts reserved before
//! a check, never past the limit, even all at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{
    Conflict, Counter, CustodianAttempt, CustodianRecord, Failure, QuorumConfig, QuorumStore,
    StoreError, TokenStore,
};

on_both_backends!(
    the_quorum_is_initialised_once,
    a_custodian_step_is_used_once_and_failures_lock,
    custodian_attempts_are_reserved_before_the_check_and_never_past_the_limit,
    fifty_concurrent_custodian_reservations_get_five_slots,
    a_counter_only_grows_and_is_never_deleted,
);

async fn a_counter_only_grows_and_is_never_deleted(db: Arc<TestDb>) {
    let s = db.open().await;
    let c = Counter::HsmLoginsRefused;
    assert_eq!(s.counter(c).await.unwrap(), 0);
    assert_eq!(s.bump_counter(c, 1).await.unwrap(), 1);
    assert_eq!(s.bump_counter(c, 2).await.unwrap(), 2);
    assert_eq!(s.counter(c).await.unwrap(), 2);
    // The database refuses to wind it back or delete it.
    for sql in ["UPDATE counters SET value = 0", "DELETE FROM counters"] {
        assert!(
            sqlx::query(sql).execute(&s.writer).await.is_err(),
            "{sql} was allowed"
        );
    }
    assert_eq!(s.counter(c).await.unwrap(), 2);
}

fn slot<'a>(name: &'a str, id: &'a str, at: i64) -> CustodianAttempt<'a> {
    CustodianAttempt {
        name,
        generation: 1,
        id,
        at,
        since: at - 1000,
        limit: 5,
    }
}

fn config() -> QuorumConfig {
    QuorumConfig {
        generation: 1,
        threshold: 2,
        shares: 3,
        sealed_pin: vec![1, 2, 3],
        verifier: vec![4; 32],
        created_at: 10,
    }
}

fn custodian(name: &str, index: u8) -> CustodianRecord {
    CustodianRecord {
        name: name.into(),
        generation: 1,
        share_index: index,
        commitment: vec![index; 32],
        totp_sealed: vec![index; 4],
        totp_last_step: None,
        locked_until: None,
    }
}

async fn the_quorum_is_initialised_once(db: Arc<TestDb>) {
    let s = db.open().await;
    assert!(s.quorum_config().await.unwrap().is_none());
    let token = crate::store::TokenRecord {
        id: "tok_c1".into(),
        hash: crate::secret::BearerToken::from_random(&[1; 32]).hash(),
        principal: "custodian:c1".into(),
        roles: vec!["custodian".into()],
        created_at: 10,
        expires_at: None,
        key_globs: Vec::new(),
        cidrs: Vec::new(),
        bound_principal: None,
        description: String::new(),
        revoked_at: None,
        state_seq: 1,
        mac: None,
    };
    let custodians = [custodian("c1", 1), custodian("c2", 2), custodian("c3", 3)];
    s.init_quorum(&config(), &custodians, std::slice::from_ref(&token))
        .await
        .unwrap();
    let cfg = s.quorum_config().await.unwrap().unwrap();
    assert_eq!(
        (cfg.generation, cfg.threshold, cfg.shares, cfg.sealed_pin),
        (1, 2, 3, vec![1, 2, 3])
    );
    let c2 = s.custodian("c2", 1).await.unwrap();
    assert_eq!((c2.share_index, c2.commitment), (2, vec![2; 32]));
    assert_eq!(s.token_by_hash(&token.hash).await.unwrap().id, "tok_c1");
    // Once only, and all or nothing.
    let again = [custodian("c9", 1)];
    assert!(matches!(
        s.init_quorum(&config(), &again, &[]).await,
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        s.custodian("c9", 1).await,
        Err(StoreError::NotFound)
    ));
}

async fn a_custodian_step_is_used_once_and_failures_lock(db: Arc<TestDb>) {
    let s = db.open().await;
    s.init_quorum(&config(), &[custodian("c1", 1)], &[])
        .await
        .unwrap();
    s.use_totp_step("c1", 1, 100, "a").await.unwrap();
    for replay in [100, 99] {
        assert!(matches!(
            s.use_totp_step("c1", 1, replay, "a").await,
            Err(StoreError::Conflict(Conflict::StepUsed))
        ));
    }
    s.use_totp_step("c1", 1, 101, "a").await.unwrap();
    assert_eq!(
        s.custodian("c1", 1).await.unwrap().totp_last_step,
        Some(101)
    );
    // Failures with no reserved slot still count.
    let failure = |at: i64| Failure {
        name: "c1",
        generation: 1,
        attempt: "none",
        at,
        reason: "totp",
        since: 1000,
        limit: 3,
        lock_until: 9000,
    };
    // A failure before the window does not count.
    assert_eq!(s.record_failure(&failure(500)).await.unwrap(), 0);
    assert_eq!(s.record_failure(&failure(1001)).await.unwrap(), 1);
    assert_eq!(s.record_failure(&failure(1002)).await.unwrap(), 2);
    assert_eq!(s.custodian("c1", 1).await.unwrap().locked_until, None);
    assert_eq!(s.record_failure(&failure(1003)).await.unwrap(), 3);
    assert_eq!(s.custodian("c1", 1).await.unwrap().locked_until, Some(9000));
}

async fn custodian_attempts_are_reserved_before_the_check_and_never_past_the_limit(
    db: Arc<TestDb>,
) {
    let s = db.open().await;
    s.init_quorum(&config(), &[custodian("c1", 1), custodian("c2", 2)], &[])
        .await
        .unwrap();
    let t = 10_000;
    assert!(matches!(
        s.reserve_custodian_attempt(&slot("c9", "x", t)).await,
        Err(StoreError::NotFound)
    ));
    let failure = |id: &'static str| Failure {
        name: "c1",
        generation: 1,
        attempt: id,
        at: t,
        reason: "totp",
        since: t - 1000,
        limit: 5,
        lock_until: t + 1000,
    };
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        s.reserve_custodian_attempt(&slot("c1", id, t))
            .await
            .unwrap();
    }
    assert!(matches!(
        s.reserve_custodian_attempt(&slot("c1", "a6", t)).await,
        Err(StoreError::Conflict(Conflict::LockedOut))
    ));
    // Another custodian has slots of its own.
    s.reserve_custodian_attempt(&slot("c2", "b1", t))
        .await
        .unwrap();
    // A passed check releases its slot; failures keep theirs and lock at the fifth.
    s.use_totp_step("c1", 1, 7, "a1").await.unwrap();
    s.reserve_custodian_attempt(&slot("c1", "a6", t))
        .await
        .unwrap();
    for (i, id) in ["a2", "a3", "a4", "a5"].into_iter().enumerate() {
        assert_eq!(s.record_failure(&failure(id)).await.unwrap(), 1 + i as u32);
    }
    assert_eq!(s.custodian("c1", 1).await.unwrap().locked_until, None);
    assert_eq!(s.record_failure(&failure("a6")).await.unwrap(), 5);
    assert_eq!(
        s.custodian("c1", 1).await.unwrap().locked_until,
        Some(t + 1000)
    );
    assert!(matches!(
        s.reserve_custodian_attempt(&slot("c1", "a7", t + 999))
            .await,
        Err(StoreError::Conflict(Conflict::LockedOut))
    ));
    s.reserve_custodian_attempt(&slot("c1", "a7", t + 1000))
        .await
        .unwrap();
}

async fn fifty_concurrent_custodian_reservations_get_five_slots(db: Arc<TestDb>) {
    let s = Arc::new(db.open().await);
    s.init_quorum(&config(), &[custodian("c1", 1)], &[])
        .await
        .unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let id = format!("c{i}");
                s.reserve_custodian_attempt(&slot("c1", &id, 10_000)).await
            })
        })
        .collect();
    let mut reserved = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => reserved += 1,
            Err(StoreError::Conflict(Conflict::LockedOut)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(reserved, 5);
}
