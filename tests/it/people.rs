//! People, not principals (DESIGN §2, ADR 15), as attacks: a policy whose `[people]` says
//! that `key-admin:alice` and custodian `custodian-1` are one person, alice, and that
//! `oncall:bob` and `auditor:bob` are one person, bob, and custodians `custodian-4` and
//! `custodian-5` one person, carol. Alice asks for a rotation and
//! approves it as her custodian identity; bob breaks the glass and closes his own review
//! as an auditor; carol, who holds two custodian identities, approves twice. All are
//! refused, with their stable reasons; other people still can.

use std::path::{Path, PathBuf};

use arca::grpc::pb;
use tonic::Code;

use crate::support::{
    assert_code, mint_token, reason, request_rotation, three_of_five, unsealed, Auth, Db, TestArca,
    Totp,
};

/// Who is whom, on top of the shipped roles and bindings.
const PEOPLE: &str = r#"
version = 1
[people]
alice = ["key-admin:alice", "custodian:custodian-1"]
bob = ["oncall:bob", "auditor:bob"]
carol = ["custodian:custodian-4", "custodian:custodian-5"]
"#;

/// A policy directory: the shipped role, binding and quorum files, plus `people.toml`.
fn policy_dir(root: &Path) -> PathBuf {
    let dir = root.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["roles.toml", "bindings.toml", "quorum.toml"] {
        std::fs::copy(shipped.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("people.toml"), PEOPLE).unwrap();
    dir
}

/// Enrols the holder of `token` in TOTP; their authenticator.
async fn enroll(arca: &TestArca, token: &str) -> Totp {
    let uri = arca
        .access(token)
        .await
        .enroll_totp(pb::EnrollTotpRequest {})
        .await
        .unwrap()
        .into_inner()
        .totp_uri;
    Totp::from_uri(&uri)
}

on_both_backends!(
    #[tokio::test]
    alice_cannot_approve_her_own_rotation_as_her_custodian_identity
);

async fn alice_cannot_approve_her_own_rotation_as_her_custodian_identity(db: Db) {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(pol.path());
    let (arca, cs) = unsealed(three_of_five(db).arg("--policy-dir").arg(&dir)).await;
    let alice = mint_token(&arca, "key-admin:alice", &[]).await;
    let totp = enroll(&arca, &alice).await;
    let req = arca
        .keys(Auth::bearer(&alice).totp(&totp.next().await))
        .await
        .rotate_key(pb::RotateKeyRequest { name: "phi".into() })
        .await
        .unwrap()
        .into_inner()
        .approval_request
        .expect("rotation is a quorum operation");
    assert_eq!(req.requester, "key-admin:alice");

    // Alice, as custodian-1: refused as the requester, and not counted.
    let s = assert_code(
        cs.approve(&arca, 1, &req).await,
        Code::PermissionDenied,
        "alice approves her own request as custodian-1",
    );
    assert_eq!(reason(&s), Some("REQUESTER_CANNOT_APPROVE"), "{s:?}");

    // Three other people approve, and the rotation runs with them only.
    for n in [2, 3] {
        let r = cs.approve(&arca, n, &req).await.unwrap();
        assert_eq!(r.state, "PENDING", "{r:?}");
    }
    let done = cs.approve(&arca, 4, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");
    let who: Vec<&str> = done
        .approvals
        .iter()
        .map(|a| a.custodian.as_str())
        .collect();
    assert_eq!(who, ["custodian-2", "custodian-3", "custodian-4"]);
    assert!(
        arca.log_text().contains("the approver is the requester"),
        "no log line for the refusal"
    );
}

on_both_backends!(
    #[tokio::test]
    carol_counts_once_whichever_of_her_custodian_identities_approves
);

async fn carol_counts_once_whichever_of_her_custodian_identities_approves(db: Db) {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(pol.path());
    let (arca, cs) = unsealed(three_of_five(db).arg("--policy-dir").arg(&dir)).await;
    let req = request_rotation(&arca).await;
    let r = cs.approve(&arca, 4, &req).await.unwrap();
    assert_eq!(r.state, "PENDING", "{r:?}");
    // Carol again, as custodian-5: refused, and not counted.
    let s = assert_code(
        cs.approve(&arca, 5, &req).await,
        Code::PermissionDenied,
        "carol approves again as custodian-5",
    );
    assert_eq!(reason(&s), Some("ALREADY_APPROVED"), "{s:?}");
    let r = cs.approve(&arca, 2, &req).await.unwrap();
    assert_eq!(
        (r.state.as_str(), r.approvals.len()),
        ("PENDING", 2),
        "{r:?}"
    );
    let done = cs.approve(&arca, 3, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");
    assert_eq!(arca.key("phi").await.versions.len(), 2, "rotated once");
}

on_both_backends!(
    #[tokio::test]
    bob_cannot_close_the_review_of_his_own_break_glass_as_an_auditor
);

async fn bob_cannot_close_the_review_of_his_own_break_glass_as_an_auditor(db: Db) {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(pol.path());
    let arca = TestArca::builder()
        .backend(db)
        .arg("--policy-dir")
        .arg(&dir)
        .start()
        .await;
    let oncall = mint_token(&arca, "oncall:bob", &[]).await;
    let auditor_bob = mint_token(&arca, "auditor:bob", &[]).await;
    let eve = mint_token(&arca, "auditor:eve", &[]).await;
    let totp = enroll(&arca, &oncall).await;
    let review = arca
        .access(Auth::bearer(&oncall).totp(&totp.next().await))
        .await
        .break_glass(pb::BreakGlassRequest {
            reason: "pager 7: EHR down".into(),
            duration_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner()
        .review
        .expect("a review");

    let close = |token: String, note: &'static str| {
        let arca = &arca;
        let id = review.id.clone();
        async move {
            arca.access(&token)
                .await
                .close_review(pb::CloseReviewRequest {
                    id,
                    note: note.into(),
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    // Bob, as an auditor: refused, and the review stays open.
    let s = assert_code(
        close(auditor_bob.clone(), "all fine").await,
        Code::PermissionDenied,
        "bob closes his own review as auditor:bob",
    );
    assert_eq!(reason(&s), Some("OWN_REVIEW"), "{s:?}");
    let open = arca
        .access(&eve)
        .await
        .list_reviews(pb::ListReviewsRequest { open_only: true })
        .await
        .unwrap()
        .into_inner()
        .reviews;
    assert_eq!(open.len(), 1, "{open:?}");

    // Another person closes it.
    let closed = close(eve.clone(), "checked the EHR ticket").await.unwrap();
    assert_eq!(closed.closed_by, "auditor:eve");
}
