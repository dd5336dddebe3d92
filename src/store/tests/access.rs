//! Contract of [`AccessStore`]: grants expire, reviews close once, policies are
//! sequenced, a TOTP step is used once, failures lock at the limit, and MFA attempts are
//! reserved before a check, never past the limit, even all at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{AccessStore, Conflict, GrantRecord, MfaAttempt, MfaFailure, StoreError};

on_both_backends!(
    grants_expire_and_reviews_close_once,
    policies_are_sequenced_and_totp_steps_used_once,
    mfa_attempts_are_reserved_before_the_check_and_never_past_the_limit,
    fifty_concurrent_mfa_reservations_get_five_slots,
);

fn attempt<'a>(id: &'a str, at: i64) -> MfaAttempt<'a> {
    MfaAttempt {
        principal: "p",
        id,
        at,
        since: at - 1000,
        limit: 5,
    }
}

fn failure<'a>(id: &'a str, at: i64) -> MfaFailure<'a> {
    MfaFailure {
        principal: "p",
        attempt: id,
        at,
        reason: "totp",
        since: at - 1000,
        limit: 5,
        lock_until: at + 1000,
    }
}

fn grant(id: &str, kind: &str, created: i64, expires: i64) -> GrantRecord {
    GrantRecord {
        id: id.into(),
        principal: "oncall:ann".into(),
        role: "break-glass".into(),
        kind: kind.into(),
        reason: "pager".into(),
        request_id: None,
        created_at: created,
        expires_at: expires,
    }
}

async fn grants_expire_and_reviews_close_once(db: Arc<TestDb>) {
    let s = db.open().await;
    let r = s
        .break_glass(&grant("g1", "break-glass", 1000, 5000), "rev1")
        .await
        .unwrap();
    assert_eq!(r.closed_at, None);
    s.insert_grant(&grant("g2", "elevation", 1000, 9000))
        .await
        .unwrap();
    assert_eq!(s.active_grants(4000).await.unwrap().len(), 2);
    assert_eq!(s.active_grants(5000).await.unwrap().len(), 1);
    assert_eq!(s.list_reviews(true).await.unwrap().len(), 1);
    let closed = s
        .close_review("rev1", "auditor:eve", "ok", 6000)
        .await
        .unwrap();
    assert_eq!(closed.closed_by.as_deref(), Some("auditor:eve"));
    assert!(matches!(
        s.close_review("rev1", "auditor:eve", "again", 7000).await,
        Err(StoreError::Conflict(Conflict::ReviewClosed))
    ));
    assert!(matches!(
        s.close_review("nope", "auditor:eve", "x", 7000).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.list_reviews(true).await.unwrap().is_empty());
    assert_eq!(s.list_reviews(false).await.unwrap().len(), 1);
    // A grant with no lifetime is refused by the database.
    assert!(s
        .insert_grant(&grant("g3", "elevation", 10, 10))
        .await
        .is_err());
}

async fn policies_are_sequenced_and_totp_steps_used_once(db: Arc<TestDb>) {
    let s = db.open().await;
    assert!(s.latest_policy().await.unwrap().is_none());
    assert_eq!(s.insert_policy("a", 1).await.unwrap(), 1);
    assert_eq!(s.insert_policy("b", 2).await.unwrap(), 2);
    assert_eq!(s.latest_policy().await.unwrap().unwrap().text, "b");
    s.enroll_totp("p", &[1, 2, 3], 1).await.unwrap();
    s.use_principal_totp_step("p", 10, "a").await.unwrap();
    for replay in [10, 9] {
        assert!(matches!(
            s.use_principal_totp_step("p", replay, "a").await,
            Err(StoreError::Conflict(Conflict::StepUsed))
        ));
    }
    s.use_principal_totp_step("p", 11, "a").await.unwrap();
    for i in 1..=5 {
        let id = format!("f{i}");
        s.reserve_mfa_attempt(&MfaAttempt {
            principal: "p",
            id: &id,
            at: 100 + i,
            since: 0,
            limit: 5,
        })
        .await
        .unwrap();
        let n = s
            .record_mfa_failure(&MfaFailure {
                principal: "p",
                attempt: &id,
                at: 100 + i,
                reason: "totp",
                since: 0,
                limit: 5,
                lock_until: 999,
            })
            .await
            .unwrap();
        assert_eq!(n, i as u32);
    }
    let e = s.totp_enrolment("p").await.unwrap().unwrap();
    assert_eq!(e.locked_until, Some(999));
    assert_eq!(e.sealed, vec![1, 2, 3]);
    // Re-enrolment clears the step and the lock.
    s.enroll_totp("p", &[4], 2).await.unwrap();
    let e = s.totp_enrolment("p").await.unwrap().unwrap();
    assert_eq!((e.last_step, e.locked_until), (None, None));
}

async fn mfa_attempts_are_reserved_before_the_check_and_never_past_the_limit(db: Arc<TestDb>) {
    let s = db.open().await;
    let t = 10_000;
    assert!(matches!(
        s.reserve_mfa_attempt(&attempt("x", t)).await,
        Err(StoreError::NotFound)
    ));
    s.enroll_totp("p", &[1], 1).await.unwrap();
    // Five slots; the sixth attempt finds none, although no failure settled yet.
    for id in ["a1", "a2", "a3", "a4", "a5"] {
        s.reserve_mfa_attempt(&attempt(id, t)).await.unwrap();
    }
    assert!(matches!(
        s.reserve_mfa_attempt(&attempt("a6", t)).await,
        Err(StoreError::Conflict(Conflict::LockedOut))
    ));
    // A failure keeps its slot; a passed check releases its own.
    assert_eq!(s.record_mfa_failure(&failure("a1", t)).await.unwrap(), 1);
    s.use_principal_totp_step("p", 7, "a2").await.unwrap();
    s.reserve_mfa_attempt(&attempt("a6", t)).await.unwrap();
    assert!(matches!(
        s.reserve_mfa_attempt(&attempt("a7", t)).await,
        Err(StoreError::Conflict(Conflict::LockedOut))
    ));
    // A replay keeps the slot (to be settled as a failure).
    assert!(matches!(
        s.use_principal_totp_step("p", 7, "a3").await,
        Err(StoreError::Conflict(Conflict::StepUsed))
    ));
    // Pending attempts do not lock; the fifth settled failure does.
    for (i, id) in ["a3", "a4", "a5"].into_iter().enumerate() {
        assert_eq!(
            s.record_mfa_failure(&failure(id, t)).await.unwrap(),
            2 + i as u32
        );
    }
    assert_eq!(
        s.totp_enrolment("p").await.unwrap().unwrap().locked_until,
        None
    );
    assert_eq!(s.record_mfa_failure(&failure("a6", t)).await.unwrap(), 5);
    let locked_until = s.totp_enrolment("p").await.unwrap().unwrap().locked_until;
    assert_eq!(locked_until, Some(t + 1000));
    // Locked until then; after it (and with the failures out of the window), a slot again.
    assert!(matches!(
        s.reserve_mfa_attempt(&attempt("a8", t + 999)).await,
        Err(StoreError::Conflict(Conflict::LockedOut))
    ));
    s.reserve_mfa_attempt(&attempt("a8", t + 1000))
        .await
        .unwrap();
}

async fn fifty_concurrent_mfa_reservations_get_five_slots(db: Arc<TestDb>) {
    let s = Arc::new(db.open().await);
    s.enroll_totp("p", &[1], 1).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let id = format!("c{i}");
                s.reserve_mfa_attempt(&attempt(&id, 10_000)).await
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
