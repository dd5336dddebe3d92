//! Approval requests: quorum gating, exactly-once execution, expiry, rejection, recovery
//! at unseal, rekey.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{admin, caller, custodian, fake_hsm, kit_code, ok, world_with, World, STEP, T0};
use crate::authz::Principal;
use crate::keys::VersionState;
use crate::quorum::approvals::{self, Operation, RequestState};
use crate::quorum::shamir;
use crate::service::{
    AdminOutcome, ApprovalRecord, Conflict, CustodianKit, KeyRecord, Rejection, RequestResult,
    Result, ServiceConfig, ServiceError,
};
use crate::store::ApprovalStore;

const DAY: i64 = 24 * 3600 * 1000;

/// A 3-of-5 quorum (custodians c1..c5), unsealed by c1, c2, c3.
pub(super) struct Quorum {
    pub(super) w: World,
    pub(super) kits: Vec<CustodianKit>,
}

pub(super) fn c(n: usize) -> crate::service::Caller {
    custodian(&format!("c{n}"))
}

pub(super) async fn quorum(gates: bool) -> Quorum {
    quorum_with(ServiceConfig {
        quorum_gates: gates,
        ..ServiceConfig::default()
    })
    .await
}

async fn quorum_with(cfg: ServiceConfig) -> Quorum {
    let w = world_with(cfg, fake_hsm()).await;
    let names: Vec<String> = (1..=5).map(|i| format!("c{i}")).collect();
    let kits = w
        .svc
        .ceremony
        .init(
            &admin(),
            3,
            &names,
            Zeroizing::new("so".into()),
            &Default::default(),
        )
        .await
        .unwrap();
    let q = Quorum { w, kits };
    for n in 1..=3 {
        let code = q.code(n).await;
        q.w.svc
            .sealing
            .unseal(&c(n), &q.kits[n - 1].share, &code)
            .await
            .unwrap();
    }
    assert!(q.w.svc.ctx.engine.is_open());
    q
}

impl Quorum {
    /// Custodian n's TOTP code now. Each custodian's code is used once per step: the tests
    /// move the clock a step on before a custodian submits again.
    pub(super) async fn code(&self, n: usize) -> String {
        kit_code(&self.w.store, &self.kits[n - 1], 1, self.w.now()).await
    }

    pub(super) fn next_step(&self) {
        self.w.clock.advance(STEP);
    }

    pub(super) async fn approve(&self, n: usize, req: &ApprovalRecord) -> Result<ApprovalRecord> {
        let code = self.code(n).await;
        self.w
            .svc
            .approvals
            .approve(&c(n), &req.id, &req.digest, &self.kits[n - 1].share, &code)
            .await
            .map(|o| o.request)
    }

    pub(super) async fn key(&self, name: &str) -> KeyRecord {
        ok(self.w.svc.keys.get_key(&admin(), name).await)
    }

    pub(super) async fn create(&self, name: &str) {
        ok(self
            .w
            .svc
            .keys
            .create_key(&admin(), name, "", Default::default())
            .await);
    }

    pub(super) async fn rotate(&self, name: &str) -> ApprovalRecord {
        pending(ok(self.w.svc.rotation.rotate_key(&admin(), name).await))
    }

    pub(super) async fn unseal_all(&self, who: &[usize]) {
        for &n in who {
            let code = self.code(n).await;
            self.w
                .svc
                .sealing
                .unseal(&c(n), &self.kits[n - 1].share, &code)
                .await
                .unwrap();
        }
    }

    pub(super) async fn seal(&self) {
        self.w.svc.sealing.seal(&c(1)).await.unwrap();
    }
}

fn pending(o: AdminOutcome) -> ApprovalRecord {
    match o {
        AdminOutcome::Pending(r) => *r,
        AdminOutcome::Done(k) => panic!("ran at once: {k:?}"),
    }
}

#[tokio::test]
async fn a_rotation_waits_for_three_custodians_and_runs_once() {
    let q = quorum(true).await;
    let svc = &q.w.svc;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    assert_eq!(req.state, RequestState::Pending);
    assert_eq!(req.operation, Operation::RotateKey);
    assert_eq!(req.requester, "dev-admin");
    assert_eq!(req.threshold, 3);
    assert_eq!(req.expires_at, T0 + DAY);
    assert_eq!(
        req.digest,
        approvals::digest(Operation::RotateKey, &req.parameters)
    );
    assert_eq!(q.key("phi").await.versions.len(), 1);
    // A request for a key that does not exist is refused at once.
    assert!(matches!(
        svc.rotation.rotate_key(&admin(), "nope").await.result,
        Err(ServiceError::NotFound(_))
    ));

    // The requester is no custodian (the policy gives it no Approve); a wrong digest;
    // bad TOTP (counted).
    q.next_step();
    assert!(matches!(
        svc.approvals
            .approve(&admin(), &req.id, &req.digest, &q.kits[0].share, "000000")
            .await,
        Err(ServiceError::PermissionDenied)
    ));
    let code = q.code(1).await;
    assert!(matches!(
        svc.approvals
            .approve(&c(1), &req.id, &"0".repeat(64), &q.kits[0].share, &code)
            .await,
        Err(ServiceError::InvalidArgument(_))
    ));
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert!(matches!(
        svc.approvals
            .approve(&c(1), &req.id, &req.digest, &q.kits[0].share, wrong)
            .await,
        Err(ServiceError::Rejected(Rejection::TotpRejected))
    ));
    // Another custodian's share under c1's identity.
    assert!(matches!(
        svc.approvals
            .approve(&c(1), &req.id, &req.digest, &q.kits[1].share, &code)
            .await,
        Err(ServiceError::Rejected(Rejection::ShareRejected))
    ));

    let r = q.approve(1, &req).await.unwrap();
    assert_eq!(r.approvals.len(), 1);
    q.next_step();
    assert!(matches!(
        q.approve(1, &req).await,
        Err(ServiceError::Rejected(Rejection::AlreadyApproved))
    ));
    let r = q.approve(2, &req).await.unwrap();
    assert_eq!(r.state, RequestState::Pending);
    assert_eq!(q.key("phi").await.versions.len(), 1);
    let r = q.approve(4, &req).await.unwrap();
    assert_eq!(r.state, RequestState::Executed);
    let Some(RequestResult::Key(after)) = &r.result else {
        panic!("no result")
    };
    assert_eq!(after.primary_version, 2);
    let key = q.key("phi").await;
    assert_eq!(key.versions.len(), 2);
    assert_eq!(key.primary_version, 2);
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
    assert_eq!(
        r.approvals
            .iter()
            .map(|a| a.custodian.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c2", "c4"]
    );

    // After execution: no more approvals, no rejection, nothing runs twice.
    assert!(matches!(
        q.approve(5, &req).await,
        Err(ServiceError::Conflict(Conflict::Request(
            RequestState::Executed
        )))
    ));
    assert!(svc.approvals.reject(&c(5), &req.id, "late").await.is_err());
    assert_eq!(q.key("phi").await.versions.len(), 2);
    let listed = svc
        .approvals
        .list_requests(&admin(), "executed", 0, "")
        .await
        .unwrap();
    assert_eq!(listed.0.len(), 1);
}

#[tokio::test]
async fn expiry_and_rejection_with_a_fixed_clock() {
    let q = quorum(true).await;
    let svc = &q.w.svc;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    q.next_step();
    q.approve(1, &req).await.unwrap();
    // One ms before expiry it still takes approvals; at expiry it does not.
    q.w.clock.advance(DAY - STEP - 1);
    let state = |r: Result<ApprovalRecord>| r.unwrap().state;
    assert_eq!(
        state(svc.approvals.get_request(&admin(), &req.id).await),
        RequestState::Pending
    );
    q.w.clock.advance(1);
    assert_eq!(
        state(svc.approvals.get_request(&admin(), &req.id).await),
        RequestState::Expired
    );
    assert!(matches!(
        q.approve(2, &req).await,
        Err(ServiceError::Conflict(Conflict::Request(
            RequestState::Expired
        )))
    ));
    // Listing sweeps it: stored EXPIRED, its share wiped.
    let (all, _) = svc
        .approvals
        .list_requests(&admin(), "", 0, "")
        .await
        .unwrap();
    assert_eq!(all[0].state, RequestState::Expired);
    assert_eq!(
        q.w.store.request(&req.id).await.unwrap().state,
        RequestState::Expired
    );
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());

    // Rejection: by a custodian (or the requester), with a reason; then no approvals.
    let req = q.rotate("phi").await;
    q.next_step();
    q.approve(1, &req).await.unwrap();
    assert!(matches!(
        svc.approvals
            .reject(&caller("someone", &["admin"]), &req.id, "no")
            .await,
        Err(ServiceError::PermissionDenied)
    ));
    assert!(matches!(
        svc.approvals.reject(&c(9), &req.id, "no").await,
        Err(ServiceError::PermissionDenied)
    ));
    assert!(matches!(
        svc.approvals.reject(&c(2), &req.id, " ").await,
        Err(ServiceError::InvalidArgument(_))
    ));
    let r = svc
        .approvals
        .reject(&c(2), &req.id, "not planned")
        .await
        .unwrap();
    assert_eq!(r.state, RequestState::Rejected);
    assert_eq!(r.decided_by.as_deref(), Some("custodian:c2"));
    assert_eq!(r.reason.as_deref(), Some("not planned"));
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
    q.next_step();
    assert!(matches!(
        q.approve(3, &req).await,
        Err(ServiceError::Conflict(Conflict::Request(
            RequestState::Rejected
        )))
    ));
    // The requester withdraws another.
    let req = q.rotate("phi").await;
    let r = svc
        .approvals
        .reject(&admin(), &req.id, "typo")
        .await
        .unwrap();
    assert_eq!(r.state, RequestState::Rejected);
    assert_eq!(q.key("phi").await.versions.len(), 1);
}

#[tokio::test]
async fn disable_through_quorum_and_at_once_without_gates() {
    let q = quorum(true).await;
    let lifecycle = &q.w.svc.lifecycle;
    q.create("phi").await;
    let req = pending(ok(lifecycle.disable_version(&admin(), "phi", 1).await));
    assert_eq!(req.parameters.get("version").map(String::as_str), Some("1"));
    // An enabled version needs nothing (no request is made for a change that cannot
    // happen).
    assert!(matches!(
        ok(lifecycle.enable_version(&admin(), "phi", 1).await),
        AdminOutcome::Done(_)
    ));
    assert!(matches!(
        lifecycle.disable_version(&admin(), "phi", 7).await.result,
        Err(ServiceError::NotFound(_))
    ));
    q.next_step();
    for n in [3, 4, 5] {
        q.approve(n, &req).await.unwrap();
    }
    let key = q.key("phi").await;
    assert_eq!(key.versions[0].state, VersionState::Disabled);
    let r = q.w.svc.approvals.get_request(&admin(), &req.id).await;
    assert_eq!(r.unwrap().state, RequestState::Executed);
    // One admin cannot undo the quorum's disable: re-enabling is a quorum operation too.
    let undo = pending(ok(lifecycle.enable_version(&admin(), "phi", 1).await));
    assert_eq!(undo.operation, Operation::EnableKeyVersion);
    assert_eq!(q.key("phi").await.versions[0].state, VersionState::Disabled);

    let q = quorum(false).await;
    q.create("phi").await;
    assert!(matches!(
        ok(q.w.svc.rotation.rotate_key(&admin(), "phi").await),
        AdminOutcome::Done(k) if k.primary_version == 2
    ));
    assert!(matches!(
        ok(q.w.svc.lifecycle.disable_version(&admin(), "phi", 1).await),
        AdminOutcome::Done(k) if k.versions[0].state == VersionState::Disabled
    ));
}

/// Seals custodian n's share for `req` and stores the approval directly, as if the
/// process died right after committing it.
pub(super) async fn stored_approval(q: &Quorum, n: usize, req: &ApprovalRecord, share: &[u8]) {
    let engine = q.w.svc.ctx.engine().unwrap();
    let name = format!("c{n}");
    let sealed = engine
        .seal_meta(
            approvals::share_aad(&req.id, &req.digest, &name),
            Zeroizing::new(share.to_vec()),
        )
        .await
        .unwrap();
    q.w.store
        .add_approval(&req.id, &name, &sealed, q.w.now())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_approved_request_left_unrun_completes_at_the_next_unseal() {
    let q = quorum(true).await;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    for n in [1, 2, 5] {
        let share = shamir::decode(&q.kits[n - 1].share).unwrap();
        stored_approval(&q, n, &req, share.expose()).await;
    }
    assert_eq!(q.key("phi").await.versions.len(), 1);
    q.seal().await;
    q.next_step();
    q.unseal_all(&[1, 2, 3]).await;
    let r = q.w.svc.approvals.get_request(&admin(), &req.id).await;
    assert_eq!(r.unwrap().state, RequestState::Executed);
    assert_eq!(q.key("phi").await.versions.len(), 2);
    assert!(q.w.store.ready_requests().await.unwrap().is_empty());
    // A second unseal finds nothing more to do.
    q.seal().await;
    q.next_step();
    q.unseal_all(&[1, 2, 3]).await;
    assert_eq!(q.key("phi").await.versions.len(), 2);
}

#[tokio::test]
async fn shares_that_do_not_rebuild_the_secret_fail_the_request() {
    let q = quorum(true).await;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    for n in [1, 2] {
        let share = shamir::decode(&q.kits[n - 1].share).unwrap();
        stored_approval(&q, n, &req, share.expose()).await;
    }
    // A third share with the right x but wrong y (as a tampered row would be, had it
    // passed the HSM's authentication).
    let mut forged = vec![3u8];
    forged.extend_from_slice(&[0x42; 32]);
    stored_approval(&q, 3, &req, &forged).await;
    q.seal().await;
    q.next_step();
    q.unseal_all(&[1, 2, 3]).await;
    let r =
        q.w.svc
            .approvals
            .get_request(&admin(), &req.id)
            .await
            .unwrap();
    assert_eq!(r.state, RequestState::Failed);
    assert_eq!(
        r.reason.as_deref(),
        Some(Conflict::QuorumMismatch.to_string().as_str())
    );
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
    assert_eq!(q.key("phi").await.versions.len(), 1);
}

#[tokio::test]
async fn a_token_limited_to_other_keys_sees_no_request_about_this_one() {
    let q = quorum(true).await;
    let approvals = &q.w.svc.approvals;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    let mut billing = admin();
    billing.principal = Arc::new(Principal {
        key_globs: vec!["billing/*".into()],
        ..(*billing.principal).clone()
    });
    assert!(matches!(
        approvals.get_request(&billing, &req.id).await,
        Err(ServiceError::PermissionDenied)
    ));
    let seen = approvals.list_requests(&billing, "", 0, "").await.unwrap();
    assert!(seen.0.is_empty());
    let seen = approvals.list_requests(&admin(), "", 0, "").await.unwrap();
    assert_eq!(seen.0.len(), 1);
}

#[tokio::test]
async fn approvals_need_the_service_unsealed() {
    let q = quorum(true).await;
    q.create("phi").await;
    let req = q.rotate("phi").await;
    q.seal().await;
    q.next_step();
    assert!(matches!(
        q.approve(4, &req).await,
        Err(ServiceError::Sealed)
    ));
    assert!(matches!(
        q.w.svc.approvals.get_request(&admin(), &req.id).await,
        Err(ServiceError::Sealed)
    ));
}

#[tokio::test]
async fn an_approved_retirement_rechecks_its_waiting_period_against_the_policy_in_force() {
    let q = quorum(true).await;
    q.create("phi").await;
    let lifecycle = &q.w.svc.lifecycle;
    let week = 7 * DAY;
    let req = pending(ok(lifecycle.retire(&admin(), "phi", None, week).await));
    // The stored parameters are changed behind the service's back to a waiting period
    // the policy does not allow (the database is not trusted with authority).
    let mut forged = req.clone();
    forged
        .parameters
        .insert(approvals::PARAM_WAITING_MS.to_string(), "1".to_string());
    let shares: Vec<_> = q.kits[..3]
        .iter()
        .map(|k| shamir::decode(&k.share).unwrap())
        .collect();
    let refs: Vec<_> = shares.iter().collect();
    let system = q.w.svc.ctx.system();
    let cfg =
        q.w.svc
            .sealing
            .quorum_config(&system)
            .await
            .unwrap()
            .unwrap();
    let approved = approvals::verify_quorum(&refs, 3, &cfg.verifier).unwrap();
    let refused = lifecycle
        .run_approved(
            Operation::RetireKey,
            &forged.parameters,
            &crate::keys::KeyName::parse("phi").unwrap(),
            None,
            crate::service::Commit::Approved(&req.id, &approved),
        )
        .await;
    assert!(
        matches!(refused, Err(ServiceError::InvalidArgument(_))),
        "{:?}",
        refused.err()
    );
    assert_eq!(q.key("phi").await.versions[0].state, VersionState::Enabled);
    // Approved as asked, it runs.
    q.next_step();
    for n in [1, 2, 3] {
        q.approve(n, &req).await.unwrap();
    }
    let key = q.key("phi").await;
    assert_eq!(key.versions[0].state, VersionState::ScheduledForDestruction);
    assert_eq!(key.versions[0].destroy_at, Some(q.w.now() + week));
}

/// What an attacker with write access to the database does: drops the trigger that keeps
/// a request's content immutable, and rewrites it.
fn tamper(w: &World, sql: &str) {
    let conn = rusqlite::Connection::open(w._dir.path().join("a.db")).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn parameters_changed_after_k_minus_one_approvals_are_refused_and_nothing_runs() {
    let q = quorum(true).await;
    q.create("phi").await;
    q.create("other").await;
    let req = q.rotate("phi").await;
    q.next_step();
    q.approve(1, &req).await.unwrap();
    q.approve(2, &req).await.unwrap();
    // The request now points at another key, under the digest custodians were shown.
    tamper(
        &q.w,
        &format!(
            "DROP TRIGGER approval_requests_immutable_content; \
             UPDATE approval_requests SET parameters = '{{\"key\":\"other\"}}' \
             WHERE id = '{}';",
            req.id
        ),
    );
    assert!(matches!(
        q.approve(3, &req).await,
        Err(ServiceError::Conflict(Conflict::RequestAltered))
    ));
    assert_eq!(q.key("phi").await.versions.len(), 1);
    assert_eq!(q.key("other").await.versions.len(), 1);
    let r =
        q.w.svc
            .approvals
            .get_request(&admin(), &req.id)
            .await
            .unwrap();
    assert_eq!(r.state, RequestState::Failed);
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_request_altered_after_k_approvals_does_not_run_at_the_next_unseal() {
    let q = quorum(true).await;
    q.create("phi").await;
    q.create("other").await;
    let req = q.rotate("phi").await;
    for n in [1, 2, 5] {
        let share = shamir::decode(&q.kits[n - 1].share).unwrap();
        stored_approval(&q, n, &req, share.expose()).await;
    }
    // The digest rewritten to match the new parameters: the shares, sealed for the
    // digest the custodians approved, no longer open.
    let params = std::collections::BTreeMap::from([("key".to_string(), "other".to_string())]);
    let forged = approvals::digest(Operation::RotateKey, &params);
    tamper(
        &q.w,
        &format!(
            "DROP TRIGGER approval_requests_immutable_content; \
             UPDATE approval_requests SET parameters = '{{\"key\":\"other\"}}', \
             digest = '{forged}' WHERE id = '{}';",
            req.id
        ),
    );
    q.seal().await;
    q.next_step();
    q.unseal_all(&[1, 2, 3]).await;
    let r =
        q.w.svc
            .approvals
            .get_request(&admin(), &req.id)
            .await
            .unwrap();
    assert_eq!(r.state, RequestState::Failed);
    assert_eq!(q.key("other").await.versions.len(), 1);
    assert_eq!(q.key("phi").await.versions.len(), 1);
}

/// The shipped policy plus `extra` (one more policy file).
fn shipped_plus(extra: &str) -> crate::authz::policy::Policy {
    crate::authz::policy::Policy::from_files(&[
        ("roles.toml", include_str!("../../../policies/roles.toml")),
        (
            "bindings.toml",
            include_str!("../../../policies/bindings.toml"),
        ),
        ("extra.toml", extra),
    ])
    .unwrap()
}

#[tokio::test]
async fn a_role_limited_to_some_keys_sees_only_their_requests() {
    let q = quorum_with(ServiceConfig {
        quorum_gates: true,
        access_policy: shipped_plus(
            r#"
version = 1
[roles.billing-admin]
[[roles.billing-admin.allow]]
operations = ["RotateKey", "GetKey"]
keys = ["billing/*"]
[[roles.billing-admin.allow]]
operations = ["ListRequests", "GetRequest"]
keys = ["billing/*"]
[[bindings]]
principals = ["ops:bill"]
roles = ["billing-admin"]
"#,
        ),
        ..ServiceConfig::default()
    })
    .await;
    q.create("billing/a").await;
    q.create("patients/b").await;
    let billing = q.rotate("billing/a").await;
    let patients = q.rotate("patients/b").await;
    // An unrestricted token: only the policy limits what it sees.
    let bill = caller("ops:bill", &[]);
    let approvals = &q.w.svc.approvals;
    let (seen, _) = approvals.list_requests(&bill, "", 0, "").await.unwrap();
    let ids: Vec<&str> = seen.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [billing.id.as_str()]);
    assert!(approvals.get_request(&bill, &billing.id).await.is_ok());
    assert!(matches!(
        approvals.get_request(&bill, &patients.id).await,
        Err(ServiceError::PermissionDenied)
    ));
    // The shipped roles (no keys on these rules) still see every request.
    let (all, _) = approvals.list_requests(&admin(), "", 0, "").await.unwrap();
    assert_eq!(all.len(), 2);
}

#[tokio::test]
async fn the_seal_status_is_for_who_acts_on_the_seal_not_for_services() {
    let q = quorum(true).await;
    let sealing = &q.w.svc.sealing;
    assert!(matches!(
        sealing.status(&caller("svc:billing", &[])).await,
        Err(ServiceError::PermissionDenied)
    ));
    for who in [c(1), admin(), caller("auditor:eve", &[])] {
        assert!(
            sealing.status(&who).await.is_ok(),
            "{:?}",
            who.principal.name
        );
    }
}
