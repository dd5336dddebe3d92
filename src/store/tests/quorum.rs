//! Contract of [`QuorumStore`]: initialised once, a custodian's TOTP step used once, and
//! failures counted within the window, locking at the limit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{
    Conflict, CustodianRecord, Failure, QuorumConfig, QuorumStore, StoreError, TokenStore,
};

on_both_backends!(
    the_quorum_is_initialised_once,
    a_custodian_step_is_used_once_and_failures_lock,
);

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
    s.use_totp_step("c1", 1, 100).await.unwrap();
    for replay in [100, 99] {
        assert!(matches!(
            s.use_totp_step("c1", 1, replay).await,
            Err(StoreError::Conflict(Conflict::StepUsed))
        ));
    }
    s.use_totp_step("c1", 1, 101).await.unwrap();
    assert_eq!(
        s.custodian("c1", 1).await.unwrap().totp_last_step,
        Some(101)
    );
    let failure = |at: i64| Failure {
        name: "c1",
        generation: 1,
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
