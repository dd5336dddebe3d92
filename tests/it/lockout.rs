//! Atomic lock-out (ADR 14), as the attack: a burst of wrong TOTP codes for one person,
//! sent all at once and spread over two nodes on one database, gets at most the failure
//! limit of codes checked; the right code is refused afterwards until the lock-out ends;
//! and the lock-out raises an alert. For a principal's MFA (a role with `mfa = true`) and
//! for a custodian's share and code at approval.
//!
//! What was checked is seen from outside: every checked wrong code answers
//! `MFA_CODE_REJECTED` (`TOTP_REJECTED` for a custodian) and leaves one failure row, and
//! a call refused before its code was looked at answers `MFA_LOCKED_OUT` (`LOCKED_OUT`).
//! On a loaded machine a node may shed some calls `UNAVAILABLE` (its database pool or
//! audit wait ran out, before or after the check); those are counted apart, the limit is
//! then reached one wrong code at a time, and the attempt rows (one per check, written
//! before it) are the count that must equal the limit.

use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::service::{FAILURE_LIMIT, LOCKOUT_MS};
use tonic::Status;

use crate::support::{mint_token, note, reason, three_of_five, unsealed, Auth, Db, TestArca, Totp};

const LIMIT: usize = FAILURE_LIMIT as usize;

fn now_ms() -> i64 {
    use arca::clock::Clock;
    arca::clock::SystemClock.now_ms()
}

/// The answers to a burst, counted by reason.
struct Tally {
    /// Checked and rejected.
    checked: usize,
    /// Refused as locked out, unchecked.
    locked: usize,
    /// Shed by an overloaded node (`UNAVAILABLE`: a pool or audit wait ran out) before or
    /// after its check; never an acceptance.
    shed: usize,
}

fn tally(results: Vec<Result<(), Status>>, rejected: &str, locked: &str) -> Tally {
    let mut t = Tally {
        checked: 0,
        locked: 0,
        shed: 0,
    };
    for res in results {
        let s = res.expect_err("a wrong code was accepted");
        match reason(&s) {
            Some(x) if x == rejected => t.checked += 1,
            Some(x) if x == locked => t.locked += 1,
            _ if s.code() == tonic::Code::Unavailable => t.shed += 1,
            _ => panic!("unexpected answer {s:?}"),
        }
    }
    note(&format!(
        "burst: {} checked, {} refused as locked out, {} shed",
        t.checked, t.locked, t.shed
    ));
    t
}

/// One number out of a database shell's answer.
fn number(arca: &TestArca, sql: &str) -> i64 {
    arca.sql(sql)
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits until the audit trail holds an alert of `rule` about `principal`, as the auditor
/// `auditor` sees it.
async fn wait_for_alert(arca: &TestArca, auditor: &str, principal: &str, event: &str, rule: &str) {
    let mut audit = arca.audit(auditor).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit
            .query_audit(pb::QueryAuditRequest {
                principal: principal.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        let locked = records
            .iter()
            .filter(|r| r.kind == "job" && r.operation == event)
            .count();
        let alerted = records
            .iter()
            .any(|r| r.kind == "alert" && r.detail.contains(&format!("rule={rule}")));
        if locked > 0 && alerted {
            assert_eq!(locked, 1, "one lock-out, one {event} record: {records:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {event} record and {rule} alert for {principal}: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` wrong MFA codes for one key admin at once, half to each of two nodes.
async fn wrong_mfa_codes_at_once_on_two_nodes(db: Db, n: usize) {
    let a = TestArca::start_on(db).await;
    let b = a.second_node().await;
    let ann = mint_token(&a, "key-admin:ann", &[]).await;
    let uri = a
        .access(&ann)
        .await
        .enroll_totp(pb::EnrollTotpRequest {})
        .await
        .unwrap()
        .into_inner()
        .totp_uri;
    let totp = Totp::from_uri(&uri);
    let wrong = totp.wrong();
    let clients = [
        a.keys(Auth::bearer(&ann).totp(&wrong)).await,
        b.keys(Auth::bearer(&ann).totp(&wrong)).await,
    ];
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            tokio::spawn(async move {
                c.list_keys(pb::ListKeysRequest::default())
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let t = tally(results, "MFA_CODE_REJECTED", "MFA_LOCKED_OUT");
    assert!(t.checked <= LIMIT, "{} wrong codes checked", t.checked);
    // Calls an overloaded node shed may have left the limit short: more wrong codes, one
    // at a time, until refused; never more than the limit checked in all.
    let mut checked = t.checked;
    let mut c = clients[0].clone();
    loop {
        let s = c
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        match reason(&s) {
            Some("MFA_CODE_REJECTED") => checked += 1,
            Some("MFA_LOCKED_OUT") => break,
            _ => panic!("{s:?}"),
        }
    }
    assert!(checked <= LIMIT, "{checked} wrong codes rejected in all");
    // Every check had its attempt row first (a shed answer may hide a check, not a row).
    assert_eq!(
        number(
            &a,
            "SELECT COUNT(*) FROM principal_failures WHERE principal = 'key-admin:ann'"
        ),
        FAILURE_LIMIT as i64,
        "failures recorded"
    );
    // Locked out for the full period, on both nodes, even with the right code.
    let until = number(
        &a,
        "SELECT locked_until FROM principal_totp WHERE principal = 'key-admin:ann'",
    );
    assert!(
        until > now_ms() + LOCKOUT_MS - 60_000,
        "locked until {until}"
    );
    for node in [&a, &b] {
        let s = node
            .keys(Auth::bearer(&ann).totp(&totp.next().await))
            .await
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        assert_eq!(reason(&s), Some("MFA_LOCKED_OUT"), "{s:?}");
    }
    // The lock-out is an audit record of its own, and the alert rule fires on it.
    let eve = mint_token(&a, "auditor:eve", &[]).await;
    wait_for_alert(&a, &eve, "key-admin:ann", "mfa.locked", "mfa_lockout").await;
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    fifty_wrong_mfa_codes_at_once_on_two_nodes_get_five_checked_and_lock_out
);

async fn fifty_wrong_mfa_codes_at_once_on_two_nodes_get_five_checked_and_lock_out(db: Db) {
    wrong_mfa_codes_at_once_on_two_nodes(db, 50).await;
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    five_hundred_wrong_mfa_codes_at_once_on_two_nodes_get_five_checked_and_lock_out
);

async fn five_hundred_wrong_mfa_codes_at_once_on_two_nodes_get_five_checked_and_lock_out(db: Db) {
    wrong_mfa_codes_at_once_on_two_nodes(db, 500).await;
}

/// `n` approvals with custodian 2's share (stolen) and wrong codes at once, half to each
/// of two unsealed nodes.
async fn wrong_custodian_codes_at_once_on_two_nodes(db: Db, n: usize) {
    let (a, cs) = unsealed(three_of_five(db)).await;
    let b = a.second_node().await;
    cs.unseal(&b, &[4, 5, 1]).await;
    let req = crate::support::request_rotation(&a).await;
    let kit = cs.kit(2);
    let wrong = kit.totp.wrong();
    let clients = [cs.client(&a, 2).await, cs.client(&b, 2).await];
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            let msg = pb::ApproveRequest {
                id: req.id.clone(),
                digest: req.digest.clone(),
                share: kit.share.clone(),
                totp: wrong.clone(),
            };
            tokio::spawn(async move { c.approve(msg).await.map(|_| ()) })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let t = tally(results, "TOTP_REJECTED", "LOCKED_OUT");
    assert!(t.checked <= LIMIT, "{} wrong codes checked", t.checked);
    // Calls an overloaded node shed may have left the limit short: more wrong codes, one
    // at a time, until refused; never more than the limit checked in all.
    let mut checked = t.checked;
    loop {
        let s = cs
            .approve_with(&a, 2, &req.id, &req.digest, &wrong)
            .await
            .unwrap_err();
        match reason(&s) {
            Some("TOTP_REJECTED") => checked += 1,
            Some("LOCKED_OUT") => break,
            _ => panic!("{s:?}"),
        }
    }
    assert!(checked <= LIMIT, "{checked} wrong codes rejected in all");
    // Every check had its attempt row first (a shed answer may hide a check, not a row).
    assert_eq!(
        number(
            &a,
            "SELECT COUNT(*) FROM custodian_failures WHERE custodian = 'custodian-2'"
        ),
        FAILURE_LIMIT as i64,
        "failures recorded"
    );
    let until = number(
        &a,
        "SELECT locked_until FROM custodians WHERE name = 'custodian-2'",
    );
    assert!(
        until > now_ms() + LOCKOUT_MS - 60_000,
        "locked until {until}"
    );
    // The right code is refused on both nodes; the request still waits.
    let code = cs.code(2).await;
    for node in [&a, &b] {
        let s = cs
            .approve_with(node, 2, &req.id, &req.digest, &code)
            .await
            .unwrap_err();
        assert_eq!(reason(&s), Some("LOCKED_OUT"), "{s:?}");
    }
    let eve = mint_token(&a, "auditor:eve", &[]).await;
    wait_for_alert(
        &a,
        &eve,
        "custodian:custodian-2",
        "custodian.locked",
        "custodian_lockout",
    )
    .await;
    // Other custodians still approve.
    for c in [3, 4] {
        cs.approve(&a, c, &req).await.unwrap();
    }
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    fifty_wrong_custodian_codes_at_once_on_two_nodes_get_five_checked_and_lock_out
);

async fn fifty_wrong_custodian_codes_at_once_on_two_nodes_get_five_checked_and_lock_out(db: Db) {
    wrong_custodian_codes_at_once_on_two_nodes(db, 50).await;
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    five_hundred_wrong_custodian_codes_at_once_on_two_nodes_get_five_checked_and_lock_out
);

async fn five_hundred_wrong_custodian_codes_at_once_on_two_nodes_get_five_checked_and_lock_out(
    db: Db,
) {
    wrong_custodian_codes_at_once_on_two_nodes(db, 500).await;
}
