//! People, not principals (ADR 15): the requester approves through no principal of
//! theirs, one person counts once among the approvers, and nobody closes the review of
//! their own break-glass — with persons from the policy's `[people]`, as recorded at the
//! request and as the policy in force says at the approval.

use zeroize::Zeroizing;

use super::{admin, caller, custodian, fake_hsm, kit_code, ok, world_with, World};
use crate::authz::policy::Policy;
use crate::quorum::approvals::RequestState;
use crate::service::{
    AdminOutcome, ApprovalRecord, CustodianKit, Rejection, Result, ServiceConfig, ServiceError,
};

const ROLES: &str = include_str!("../../../policies/roles.toml");

/// Who is whom: alice asks as `rotator:alice` and is custodian c1, carol is custodians c4
/// and c5, bob is on call and an auditor.
const PEOPLE: &str = r#"alice = ["rotator:alice", "custodian:c1"]
bob = ["oncall:bob", "auditor:bob"]
carol = ["custodian:c4", "custodian:c5"]
"#;

/// Bindings, with roles without MFA for the requester and the break-glass, so that the
/// tests need no TOTP header codes.
const BINDINGS: &str = r#"
[roles.rotator]
[[roles.rotator.allow]]
operations = ["RotateKey", "GetKey", "ListRequests", "GetRequest"]
keys = ["*"]

[roles.bg]
[[roles.bg.allow]]
operations = ["GetKey"]
keys = ["*"]

[[bindings]]
principals = ["dev-admin"]
roles = ["admin"]

[[bindings]]
principals = ["custodian:*"]
roles = ["custodian"]

[[bindings]]
principals = ["rotator:*"]
roles = ["rotator"]

[[bindings]]
principals = ["auditor:*"]
roles = ["auditor"]

[break_glass]
principals = ["oncall:*"]
role = "bg"
max_duration = "1h"
"#;

/// The policy as one document, with `people` as its `[people]` section.
fn policy_text(people: &str) -> String {
    format!("{ROLES}\n[people]\n{people}\n{BINDINGS}")
}

fn policy() -> Policy {
    Policy::parse(&policy_text(PEOPLE)).unwrap()
}

fn c(n: usize) -> crate::service::Caller {
    custodian(&format!("c{n}"))
}

/// A 3-of-5 quorum (custodians c1..c5) under the people policy, unsealed by c1, c2, c3,
/// with a key `phi`.
struct People {
    w: World,
    kits: Vec<CustodianKit>,
}

async fn people() -> People {
    let cfg = ServiceConfig {
        quorum_gates: true,
        access_policy: policy(),
        ..ServiceConfig::default()
    };
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
    let p = People { w, kits };
    for n in 1..=3 {
        let code = p.code(n).await;
        p.w.svc
            .sealing
            .unseal(&c(n), &p.kits[n - 1].share, &code)
            .await
            .unwrap();
    }
    ok(p.w
        .svc
        .keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    p
}

impl People {
    async fn code(&self, n: usize) -> String {
        // Each approval here is a custodian's first of its step, or a step later.
        self.w.clock.advance(super::STEP);
        kit_code(&self.w.store, &self.kits[n - 1], 1, self.w.now()).await
    }

    async fn approve(&self, n: usize, req: &ApprovalRecord) -> Result<ApprovalRecord> {
        let code = self.code(n).await;
        self.w
            .svc
            .approvals
            .approve(&c(n), &req.id, &req.digest, &self.kits[n - 1].share, &code)
            .await
            .map(|o| o.request)
    }

    async fn rotation_by(&self, who: &crate::service::Caller) -> ApprovalRecord {
        match ok(self.w.svc.rotation.rotate_key(who, "phi").await) {
            AdminOutcome::Pending(r) => *r,
            AdminOutcome::Done(k) => panic!("ran at once: {k:?}"),
        }
    }

    /// Another node approved an access policy with `people` as its `[people]`.
    async fn adopt_people(&self, people: &str) {
        self.w.store_policy(&policy_text(people)).await;
        self.w.svc.guard.refresh(true).await;
        assert!(
            self.w.svc.guard.policy_seq() > 0,
            "the stored policy is in force"
        );
    }
}

fn rejected(r: Result<ApprovalRecord>) -> Rejection {
    match r {
        Err(ServiceError::Rejected(why)) => why,
        other => panic!("not rejected: {other:?}"),
    }
}

#[tokio::test]
async fn the_requester_cannot_approve_as_a_custodian_who_is_the_same_person() {
    let p = people().await;
    let alice = caller("rotator:alice", &[]);
    let req = p.rotation_by(&alice).await;
    assert_eq!(req.requester, "rotator:alice");
    assert_eq!(req.requester_person.as_deref(), Some("alice"));
    assert_eq!(rejected(p.approve(1, &req).await), Rejection::Requester);
    // Others approve; the refusal took no place among the approvals.
    for n in [2, 3] {
        p.approve(n, &req).await.unwrap();
    }
    let done = p.approve(4, &req).await.unwrap();
    assert_eq!(done.state, RequestState::Executed);
    let who: Vec<&str> = done
        .approvals
        .iter()
        .map(|a| a.custodian.as_str())
        .collect();
    assert_eq!(who, ["c2", "c3", "c4"]);
}

#[tokio::test]
async fn one_person_counts_once_whichever_custodian_they_approve_as() {
    let p = people().await;
    let req = p.rotation_by(&admin()).await;
    assert_eq!(req.requester_person.as_deref(), Some("dev-admin"));
    p.approve(4, &req).await.unwrap();
    // Carol again, as c5: refused, and not counted.
    assert_eq!(
        rejected(p.approve(5, &req).await),
        Rejection::AlreadyApproved
    );
    let r = p.approve(2, &req).await.unwrap();
    assert_eq!((r.state, r.approvals.len()), (RequestState::Pending, 2));
    let done = p.approve(3, &req).await.unwrap();
    assert_eq!(done.state, RequestState::Executed);
}

#[tokio::test]
async fn a_policy_change_after_the_request_lets_no_person_approve_their_own() {
    let p = people().await;
    let alice = caller("rotator:alice", &[]);
    // Requested while alice is one person; then a policy leaves rotator:alice to no one
    // (a person of its own), and c1 still alice: the person recorded at the request
    // refuses her.
    let split = p.rotation_by(&alice).await;
    p.adopt_people("alice = [\"custodian:c1\"]\n").await;
    assert_eq!(rejected(p.approve(1, &split).await), Rejection::Requester);

    // Requested while c1 is a person apart (under another name); then a policy joins
    // them: the policy in force at the approval refuses her.
    let p = people().await;
    p.adopt_people("al = [\"custodian:c1\"]\n").await;
    let joined = p.rotation_by(&alice).await;
    assert_eq!(joined.requester_person.as_deref(), Some("rotator:alice"));
    p.adopt_people("alice = [\"rotator:alice\", \"custodian:c1\"]\n")
        .await;
    assert_eq!(rejected(p.approve(1, &joined).await), Rejection::Requester);
    // A custodian who is someone else approves.
    p.approve(2, &joined).await.unwrap();
}

#[tokio::test]
async fn nobody_closes_the_review_of_their_own_break_glass_through_another_principal() {
    let p = people().await;
    let (grant, review) =
        p.w.svc
            .grants
            .break_glass(&caller("oncall:bob", &[]), "pager 7", 0)
            .await
            .unwrap();
    assert_eq!(grant.principal, "oncall:bob");
    let close = |who: &'static str| {
        let p = &p;
        let id = review.id.clone();
        async move {
            p.w.svc
                .grants
                .close_review(&caller(who, &[]), &id, "checked")
                .await
        }
    };
    assert!(matches!(
        close("auditor:bob").await,
        Err(ServiceError::Rejected(Rejection::OwnReview))
    ));
    assert!(matches!(
        close("oncall:bob").await,
        Err(ServiceError::PermissionDenied) | Err(ServiceError::Rejected(Rejection::OwnReview))
    ));
    let closed = close("auditor:eve").await.unwrap();
    assert_eq!(closed.closed_by.as_deref(), Some("auditor:eve"));
}
