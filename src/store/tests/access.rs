//! Contract of [`AccessStore`]: grants expire, reviews close once, policies are
//! sequenced, a TOTP step is used once and failures lock at the limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{
    AccessStore, Conflict, GrantRecord, MfaFailure, PolicyVersion, Roster, StoreError,
};

on_both_backends!(
    grants_expire_and_reviews_close_once,
    policies_are_sequenced_and_totp_steps_used_once,
);

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
        state_seq: 1,
        mac: Some("m".into()),
    }
}

fn version(seq: i64, text: &str) -> PolicyVersion {
    PolicyVersion {
        seq,
        text: text.into(),
        request_id: None,
        created_at: seq,
        mac: Some(format!("mac{seq}")),
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
    s.insert_policy(&version(1, "a")).await.unwrap();
    // A version number that does not follow the newest is refused (its MAC covers it).
    for seq in [1, 3] {
        assert!(matches!(
            s.insert_policy(&version(seq, "x")).await,
            Err(StoreError::Conflict(Conflict::PolicySeq))
        ));
    }
    s.insert_policy(&version(2, "b")).await.unwrap();
    let latest = s.latest_policy().await.unwrap().unwrap();
    assert_eq!(
        (latest.text.as_str(), latest.mac.as_deref()),
        ("b", Some("mac2"))
    );
    // Stamping replaces only the MAC it was read with.
    assert!(!s.stamp_policy(2, None, "new").await.unwrap());
    assert!(s.stamp_policy(2, Some("mac2"), "new").await.unwrap());
    assert_eq!(
        s.latest_policy().await.unwrap().unwrap().mac.as_deref(),
        Some("new")
    );
    // The roster gains p with the enrolment, only from the sequence it was read at.
    let genesis = s.roster("totp").await.unwrap().unwrap();
    assert_eq!((genesis.members.len(), genesis.state_seq), (0, 1));
    let next = Roster {
        members: vec!["p".into(), "ünï,code".into()],
        state_seq: 2,
        mac: Some("m2".into()),
        ..genesis.clone()
    };
    assert!(matches!(
        s.enroll_totp("p", &[1, 2, 3], 1, Some((&next, 7))).await,
        Err(StoreError::Conflict(Conflict::ChangedConcurrently))
    ));
    assert!(s.totp_enrolment("p").await.unwrap().is_none());
    s.enroll_totp("p", &[1, 2, 3], 1, Some((&next, 1)))
        .await
        .unwrap();
    assert_eq!(s.roster("totp").await.unwrap().unwrap(), next);
    assert!(!s.stamp_roster("totp", 2, None, "m3").await.unwrap());
    assert!(s.stamp_roster("totp", 2, Some("m2"), "m3").await.unwrap());
    s.use_principal_totp_step("p", 10).await.unwrap();
    for replay in [10, 9] {
        assert!(matches!(
            s.use_principal_totp_step("p", replay).await,
            Err(StoreError::Conflict(Conflict::StepUsed))
        ));
    }
    s.use_principal_totp_step("p", 11).await.unwrap();
    for i in 1..=5 {
        let n = s
            .record_mfa_failure(&MfaFailure {
                principal: "p",
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
    s.enroll_totp("p", &[4], 2, None).await.unwrap();
    let e = s.totp_enrolment("p").await.unwrap().unwrap();
    assert_eq!((e.last_step, e.locked_until), (None, None));
}
