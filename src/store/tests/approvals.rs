//! Contract of [`ApprovalStore`]: approvals count once and only while a request is open;
//! a completion commits its effect and the request's `EXECUTED` mark once, or nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};
use crate::quorum::approvals::{digest, Operation, Parameters, QuorumApproved, RequestState};
use crate::store::{
    AccessStore, ApprovalRecord, ApprovalStore, Conflict, CustodianRecord, GrantRecord, KeyRecord,
    KeyStore, NewKey, NewQuorum, NewRequest, QuorumConfig, QuorumStore, RequestResult, SqlStore,
    StoreError, TokenRecord, TokenStore,
};

const T0: i64 = 1_800_000_000_000;
const TTL: i64 = 60_000;

on_both_backends!(
    approvals_count_once_and_only_while_open,
    completion_runs_once_records_the_result_and_wipes_the_shares,
    a_failed_effect_leaves_the_request_pending,
    rejection_and_expiry_decide_and_wipe,
    lists_newest_first_by_page_and_state,
    two_nodes_complete_at_once_and_one_wins,
    two_custodians_take_the_last_place_at_once_and_one_gets_it,
    a_rekey_commits_only_on_the_generation_it_replaces,
    policy_and_elevation_complete_once_with_their_effect,
);

/// A real proof, from a 1-of-1 split.
fn proof() -> QuorumApproved {
    use crate::quorum::{approvals::verify_quorum, crypto, shamir};
    let s = crate::secret::QuorumSecret::from_slice(&[1; 32]).unwrap();
    let shares = shamir::split(&s, 1, 1).unwrap();
    verify_quorum(&[&shares[0]], 1, &crypto::verifier(&s)).unwrap()
}

async fn key(s: &SqlStore, name: &str, n: u8) -> KeyRecord {
    s.create_key(&NewKey {
        id: KeyId::from_random([n; 16]),
        name: KeyName::parse(name).unwrap(),
        description: String::new(),
        first_hsm_id: ObjectId([n; 16]),
        first_mac: "m".into(),
        rotation_period_ms: None,
        retain_until: None,
        retention_mac: None,
        now: T0,
    })
    .await
    .unwrap()
}

async fn request(s: &SqlStore, id: &str, op: Operation, params: &Parameters) -> ApprovalRecord {
    let d = digest(op, params);
    s.create_request(&NewRequest {
        id,
        operation: op,
        parameters: params,
        digest: &d,
        requester: "dev-admin",
        threshold: 2,
        generation: 1,
        created_at: T0,
        expires_at: T0 + TTL,
    })
    .await
    .unwrap()
}

fn rotate_params(name: &str) -> Parameters {
    [("key".to_string(), name.to_string())]
        .into_iter()
        .collect()
}

async fn approvals_count_once_and_only_while_open(db: Arc<TestDb>) {
    let s = db.open().await;
    let r = request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
    assert_eq!(r.state, RequestState::Pending);
    assert_eq!(r.parameters, rotate_params("a"));
    let r = s
        .add_approval("req_1", "c1", b"sealed-1", T0 + 1)
        .await
        .unwrap();
    assert_eq!(r.approvals.len(), 1);
    assert!(matches!(
        s.add_approval("req_1", "c1", b"sealed-x", T0 + 2).await,
        Err(StoreError::AlreadyExists)
    ));
    // Expired: refused, named EXPIRED.
    assert!(matches!(
        s.add_approval("req_1", "c2", b"s", T0 + TTL).await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Expired
        )))
    ));
    let r = s
        .add_approval("req_1", "c2", b"sealed-2", T0 + 3)
        .await
        .unwrap();
    assert_eq!(
        r.approvals
            .iter()
            .map(|a| a.custodian.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    // K in: no more approvals; the request is ready to run and does not expire.
    assert!(matches!(
        s.add_approval("req_1", "c3", b"s", T0 + 4).await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Pending
        )))
    ));
    assert_eq!(s.ready_requests().await.unwrap(), ["req_1"]);
    assert_eq!(s.expire_requests(T0 + 2 * TTL).await.unwrap(), 0);
    assert_eq!(s.sealed_shares("req_1").await.unwrap().len(), 2);
    assert!(matches!(s.request("nope").await, Err(StoreError::NotFound)));
}

async fn completion_runs_once_records_the_result_and_wipes_the_shares(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = key(&s, "a", 1).await;
    request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
    s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
    // Short of K: nothing runs.
    assert!(matches!(
        s.complete_add_version("req_1", &proof(), &k.id, 2, &ObjectId([9; 16]), "m", T0 + 2)
            .await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Pending
        )))
    ));
    s.add_approval("req_1", "c2", b"y", T0 + 2).await.unwrap();
    let rec = s
        .complete_add_version("req_1", &proof(), &k.id, 2, &ObjectId([9; 16]), "m", T0 + 3)
        .await
        .unwrap();
    assert_eq!(rec.primary_version, 2);
    // The second completion changes nothing: the version stays single.
    assert!(matches!(
        s.complete_add_version("req_1", &proof(), &k.id, 3, &ObjectId([8; 16]), "m", T0 + 4)
            .await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Executed
        )))
    ));
    assert_eq!(s.key_by_id(&k.id).await.unwrap().versions.len(), 2);
    let r = s.request("req_1").await.unwrap();
    assert_eq!(r.state, RequestState::Executed);
    assert_eq!(r.decided_at, Some(T0 + 3));
    let Some(RequestResult::Key(after)) = r.result else {
        panic!("no result")
    };
    assert_eq!(after.primary_version, 2);
    assert_eq!(after.versions[1].hsm_id, ObjectId([9; 16]));
    assert_eq!(after.name.as_str(), "a");
    // Shares wiped, approvers kept.
    assert!(s.sealed_shares("req_1").await.unwrap().is_empty());
    assert_eq!(r.approvals.len(), 2);
    assert!(s.ready_requests().await.unwrap().is_empty());
    // A decided request is final, in the database too.
    assert!(
        sqlx::query("UPDATE approval_requests SET state = 'PENDING'")
            .execute(&s.writer)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("UPDATE request_approvals SET share_sealed = 'aa'")
            .execute(&s.writer)
            .await
            .is_err()
    );
    assert!(sqlx::query("DELETE FROM request_approvals")
        .execute(&s.writer)
        .await
        .is_err());
    assert!(sqlx::query(
        "INSERT INTO request_approvals (request_id, custodian, approved_at) VALUES ('req_1', 'c9', 1)"
    )
    .execute(&s.writer)
    .await
    .is_err());
}

async fn a_failed_effect_leaves_the_request_pending(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = key(&s, "a", 1).await;
    request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
    s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
    s.add_approval("req_1", "c2", b"y", T0 + 2).await.unwrap();
    // A version number another rotation took: the whole transaction rolls back.
    assert!(matches!(
        s.complete_add_version("req_1", &proof(), &k.id, 5, &ObjectId([9; 16]), "m", T0 + 3)
            .await,
        Err(StoreError::AlreadyExists)
    ));
    let r = s.request("req_1").await.unwrap();
    assert_eq!(r.state, RequestState::Pending);
    assert_eq!(s.sealed_shares("req_1").await.unwrap().len(), 2);
    // A state change from a state that does not allow it: the same.
    let p: Parameters = [("key", "a"), ("version", "1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    request(&s, "req_2", Operation::DisableKeyVersion, &p).await;
    s.add_approval("req_2", "c1", b"x", T0 + 1).await.unwrap();
    s.add_approval("req_2", "c2", b"y", T0 + 2).await.unwrap();
    assert!(matches!(
        s.complete_set_version_state(
            "req_2",
            &proof(),
            &k.id,
            1,
            &[VersionState::Disabled],
            VersionState::ScheduledForDestruction,
            None,
            T0 + 3
        )
        .await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::Enabled
        )))
    ));
    assert_eq!(
        s.request("req_2").await.unwrap().state,
        RequestState::Pending
    );
    let rec = s
        .complete_set_version_state(
            "req_2",
            &proof(),
            &k.id,
            1,
            &[VersionState::Enabled],
            VersionState::Disabled,
            None,
            T0 + 4,
        )
        .await
        .unwrap();
    assert_eq!(rec.versions[0].state, VersionState::Disabled);
    assert_eq!(
        s.request("req_2").await.unwrap().state,
        RequestState::Executed
    );
}

async fn rejection_and_expiry_decide_and_wipe(db: Arc<TestDb>) {
    let s = db.open().await;
    request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
    request(&s, "req_2", Operation::RotateKey, &rotate_params("b")).await;
    s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
    s.add_approval("req_2", "c1", b"x", T0 + 1).await.unwrap();
    let r = s
        .reject_request("req_1", "custodian:c2", "wrong key", T0 + 2)
        .await
        .unwrap();
    assert_eq!(r.state, RequestState::Rejected);
    assert_eq!(r.decided_by.as_deref(), Some("custodian:c2"));
    assert_eq!(r.reason.as_deref(), Some("wrong key"));
    assert!(s.sealed_shares("req_1").await.unwrap().is_empty());
    assert!(matches!(
        s.add_approval("req_1", "c2", b"y", T0 + 3).await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Rejected
        )))
    ));
    assert!(matches!(
        s.reject_request("req_1", "x", "again", T0 + 3).await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Rejected
        )))
    ));
    // Expiry: refused for rejection, then swept.
    assert!(matches!(
        s.reject_request("req_2", "x", "late", T0 + TTL).await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Expired
        )))
    ));
    assert_eq!(s.expire_requests(T0 + TTL - 1).await.unwrap(), 0);
    assert_eq!(s.expire_requests(T0 + TTL).await.unwrap(), 1);
    let r = s.request("req_2").await.unwrap();
    assert_eq!(r.state, RequestState::Expired);
    assert!(s.sealed_shares("req_2").await.unwrap().is_empty());
    // Failing is for pending requests only.
    let r = s.fail_request("req_2", "x", T0 + TTL).await;
    assert!(matches!(
        r,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Expired
        )))
    ));
}

async fn lists_newest_first_by_page_and_state(db: Arc<TestDb>) {
    let s = db.open().await;
    for i in 0..5 {
        let d = digest(Operation::RotateKey, &rotate_params("a"));
        s.create_request(&NewRequest {
            id: &format!("req_{i}"),
            operation: Operation::RotateKey,
            parameters: &rotate_params("a"),
            digest: &d,
            requester: "r",
            threshold: 2,
            generation: 1,
            created_at: T0 + i64::from(i / 2),
            expires_at: T0 + TTL,
        })
        .await
        .unwrap();
    }
    s.reject_request("req_1", "x", "no", T0).await.unwrap();
    let mut seen = Vec::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let page = s
            .list_requests(None, after.as_ref().map(|(t, i)| (*t, i.as_str())), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| (r.created_at, r.id.clone()));
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, ["req_4", "req_3", "req_2", "req_1", "req_0"]);
    let rejected = s
        .list_requests(Some(RequestState::Rejected), None, 10)
        .await
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].id, "req_1");
}

async fn two_nodes_complete_at_once_and_one_wins(db: Arc<TestDb>) {
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    for round in 0..8u8 {
        let k = key(&a, &format!("k{round}"), 100 + round).await;
        let id = format!("req_{round}");
        request(&a, &id, Operation::RotateKey, &rotate_params("k")).await;
        a.add_approval(&id, "c1", b"x", T0 + 1).await.unwrap();
        a.add_approval(&id, "c2", b"y", T0 + 2).await.unwrap();
        let race = |s: Arc<SqlStore>, obj: u8| {
            let (id, key) = (id.clone(), k.id);
            tokio::spawn(async move {
                s.complete_add_version(&id, &proof(), &key, 2, &ObjectId([obj; 16]), "m", T0 + 3)
                    .await
            })
        };
        let (ra, rb) = tokio::join!(
            race(Arc::clone(&a), round),
            race(Arc::clone(&b), 200 - round)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {ra:?} / {rb:?}"
        );
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(
                    matches!(
                        e,
                        StoreError::Conflict(Conflict::RequestState(RequestState::Executed))
                            | StoreError::AlreadyExists
                    ),
                    "round {round}: loser got {e:?}"
                );
            }
        }
        assert_eq!(b.key_by_id(&k.id).await.unwrap().versions.len(), 2);
        assert_eq!(b.request(&id).await.unwrap().state, RequestState::Executed);
    }
}

async fn two_custodians_take_the_last_place_at_once_and_one_gets_it(db: Arc<TestDb>) {
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    for round in 0..8u8 {
        let id = format!("req_{round}");
        request(&a, &id, Operation::RotateKey, &rotate_params("k")).await;
        a.add_approval(&id, "c1", b"x", T0 + 1).await.unwrap();
        let add = |s: Arc<SqlStore>, who: &'static str| {
            let id = id.clone();
            tokio::spawn(async move { s.add_approval(&id, who, b"z", T0 + 2).await })
        };
        let (ra, rb) = tokio::join!(add(Arc::clone(&a), "c2"), add(Arc::clone(&b), "c3"));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
            1,
            "round {round}: {ra:?} / {rb:?}"
        );
        assert_eq!(b.request(&id).await.unwrap().approvals.len(), 2);
    }
}

fn custodian(name: &str, generation: i64, index: u8) -> CustodianRecord {
    CustodianRecord {
        name: name.into(),
        generation,
        share_index: index,
        commitment: vec![index; 32],
        totp_sealed: vec![index, 1, 2],
        totp_last_step: None,
        locked_until: None,
    }
}

fn custodian_token(id: &str, name: &str, n: u8) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        hash: crate::secret::BearerToken::from_random(&[n; 32]).hash(),
        principal: format!("custodian:{name}"),
        roles: vec!["custodian".into()],
        created_at: T0,
        expires_at: None,
        key_globs: Vec::new(),
        cidrs: Vec::new(),
        bound_principal: None,
        description: String::new(),
        revoked_at: None,
        state_seq: 1,
        mac: None,
    }
}

fn quorum_config(generation: i64, threshold: u8, shares: u8) -> QuorumConfig {
    QuorumConfig {
        generation,
        threshold,
        shares,
        sealed_pin: vec![generation as u8; 8],
        verifier: vec![9; 32],
        created_at: T0,
    }
}

/// A request with K = 2 approvals in, ready to complete.
async fn approved(s: &SqlStore, id: &str, op: Operation, params: &Parameters) {
    request(s, id, op, params).await;
    s.add_approval(id, "c1", b"x", T0 + 1).await.unwrap();
    s.add_approval(id, "c2", b"y", T0 + 2).await.unwrap();
}

async fn a_rekey_commits_only_on_the_generation_it_replaces(db: Arc<TestDb>) {
    let s = db.open().await;
    s.init_quorum(
        &quorum_config(1, 2, 2),
        &[custodian("c1", 1, 1), custodian("c2", 1, 2)],
        &[
            custodian_token("tok_c1", "c1", 1),
            custodian_token("tok_c2", "c2", 2),
        ],
    )
    .await
    .unwrap();
    let params: Parameters = [("threshold".to_string(), "2".to_string())]
        .into_iter()
        .collect();
    approved(&s, "req_1", Operation::Rekey, &params).await;
    approved(&s, "req_2", Operation::Rekey, &params).await;
    let next = quorum_config(2, 2, 3);
    let custodians = [
        custodian("c1", 2, 1),
        custodian("c2", 2, 2),
        custodian("c3", 2, 3),
    ];
    let tokens = [custodian_token("tok_c3", "c3", 3)];
    let rekey = |previous_generation: i64| NewQuorum {
        previous_generation,
        config: &next,
        custodians: &custodians,
        tokens: &tokens,
    };
    let mut revoked = s
        .complete_rekey("req_1", &proof(), &rekey(1), T0 + 3)
        .await
        .unwrap();
    revoked.sort();
    assert_eq!(revoked, ["tok_c1", "tok_c2"]);
    let cfg = s.quorum_config().await.unwrap().unwrap();
    assert_eq!((cfg.generation, cfg.shares), (2, 3));
    assert_eq!(s.custodian("c3", 2).await.unwrap().share_index, 3);
    let all = s.list_tokens().await.unwrap();
    let live: Vec<&str> = all
        .iter()
        .filter(|t| t.revoked_at.is_none())
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(live, ["tok_c3"]);
    let r = s.request("req_1").await.unwrap();
    assert_eq!(r.state, RequestState::Executed);
    assert!(matches!(
        r.result,
        Some(RequestResult::Rekey {
            threshold: 2,
            shares: 3,
            generation: 2
        })
    ));
    // A second rekey made against generation 1 no longer applies: nothing changes, and
    // its request stays pending.
    assert!(matches!(
        s.complete_rekey("req_2", &proof(), &rekey(1), T0 + 4).await,
        Err(StoreError::Conflict(Conflict::Generation))
    ));
    assert_eq!(
        s.request("req_2").await.unwrap().state,
        RequestState::Pending
    );
    assert_eq!(s.quorum_config().await.unwrap().unwrap().generation, 2);
    assert!(matches!(
        s.custodian("c3", 3).await,
        Err(StoreError::NotFound)
    ));
    // A configuration that does not follow the generation it replaces is refused.
    assert!(matches!(
        s.complete_rekey("req_2", &proof(), &rekey(2), T0 + 4).await,
        Err(StoreError::Corrupt(_))
    ));
}

fn version(seq: i64, text: &str) -> crate::store::PolicyVersion {
    crate::store::PolicyVersion {
        seq,
        text: text.into(),
        request_id: Some("req_p".into()),
        created_at: T0,
        mac: Some("m".into()),
    }
}

async fn policy_and_elevation_complete_once_with_their_effect(db: Arc<TestDb>) {
    let s = db.open().await;
    let policy: Parameters = [("policy".to_string(), "text".to_string())]
        .into_iter()
        .collect();
    approved(&s, "req_p", Operation::UpdatePolicy, &policy).await;
    assert_eq!(
        s.complete_update_policy("req_p", &proof(), &version(1, "v1"), T0 + 3)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        s.complete_update_policy("req_p", &proof(), &version(2, "v2"), T0 + 4)
            .await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Executed
        )))
    ));
    let latest = s.latest_policy().await.unwrap().unwrap();
    assert_eq!(
        (
            latest.seq,
            latest.text.as_str(),
            latest.request_id.as_deref()
        ),
        (1, "v1", Some("req_p"))
    );
    let r = s.request("req_p").await.unwrap();
    assert_eq!(
        r.result.map(|r| r.summary()).as_deref(),
        Some("access policy version 1 in force")
    );

    let grant = GrantRecord {
        id: "grant_1".into(),
        principal: "ops:ann".into(),
        role: "admin".into(),
        kind: "elevation".into(),
        reason: "incident".into(),
        request_id: Some("req_e".into()),
        created_at: T0,
        expires_at: T0 + TTL,
        state_seq: 1,
        mac: Some("m".into()),
    };
    let elevate: Parameters = [("principal".to_string(), "ops:ann".to_string())]
        .into_iter()
        .collect();
    request(&s, "req_e", Operation::Elevate, &elevate).await;
    s.add_approval("req_e", "c1", b"x", T0 + 1).await.unwrap();
    // Short of K: no grant.
    assert!(matches!(
        s.complete_elevation("req_e", &proof(), &grant, T0 + 2)
            .await,
        Err(StoreError::Conflict(Conflict::RequestState(
            RequestState::Pending
        )))
    ));
    assert!(s.active_grants(T0 + 2).await.unwrap().is_empty());
    s.add_approval("req_e", "c2", b"y", T0 + 2).await.unwrap();
    s.complete_elevation("req_e", &proof(), &grant, T0 + 3)
        .await
        .unwrap();
    assert_eq!(s.active_grants(T0 + 3).await.unwrap(), [grant]);
    assert_eq!(
        s.request("req_e").await.unwrap().state,
        RequestState::Executed
    );
    assert!(s.sealed_shares("req_e").await.unwrap().is_empty());
}
