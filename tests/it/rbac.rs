//! Role-based access control (DESIGN §5) end to end over gRPC: roles × operations × keys
//! (with context conditions), existence never leaking (message and timing), separation of
//! duties refused at start, SIGHUP reload keeping the old policy on a bad file,
//! `UpdatePolicy` under quorum, MFA with lock-out, elevation that expires by itself,
//! break-glass with its alert and review, and per-role rate limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arca::grpc::pb;
use tonic::{Code, Status};

use crate::support::{
    arca_command, assert_code, create_key, ctx, generate, mint_token, output_of, postgres_url,
    reason, three_of_five, unsealed, Auth, Db, KeyClient, TestArca, Totp,
};

/// Enrols `token`'s principal and keeps the secret from the URI shown once.
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

/// A policy directory: the shipped role and binding files, plus `extra.toml`.
fn policy_dir(root: &Path, extra: &str) -> PathBuf {
    let dir = root.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["roles.toml", "bindings.toml", "quorum.toml"] {
        std::fs::copy(shipped.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("extra.toml"), extra).unwrap();
    dir
}

/// The shipped roles and bindings as one policy document (what `UpdatePolicy` takes).
fn shipped_policy() -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    format!(
        "{}\n{}",
        std::fs::read_to_string(shipped.join("roles.toml")).unwrap(),
        std::fs::read_to_string(shipped.join("bindings.toml"))
            .unwrap()
            .replace("version = 1\n", "")
    )
}

/// A tenant-bound service role: data keys only under `tenants/*`, only with the caller's
/// own tenant and a purpose from a list in the context.
const TENANTS: &str = r#"
version = 1

[roles.tenant-svc]
[[roles.tenant-svc.allow]]
operations = ["GenerateDataKey", "UnwrapKey"]
keys = ["tenants/*"]
context = { tenant = ["${principal.id}"], purpose = ["care", "billing"] }

[[bindings]]
principals = ["tenant:*"]
roles = ["tenant-svc"]
"#;

async fn gdk(c: &mut KeyClient, key: &str, context: &[(&str, &str)]) -> Result<Vec<u8>, Status> {
    c.generate_data_key(pb::GenerateDataKeyRequest {
        key_name: key.into(),
        context: ctx(context),
        without_plaintext: true,
    })
    .await
    .map(|r| r.into_inner().wrapped_key)
}

async fn unwrap_as(c: &mut KeyClient, blob: &[u8], context: &[(&str, &str)]) -> Result<(), Status> {
    c.unwrap_key(pb::UnwrapKeyRequest {
        wrapped_key: blob.to_vec(),
        context: ctx(context),
    })
    .await
    .map(|_| ())
}

/// Operation `op` by client `c` on key `k`.
async fn call(c: &mut KeyClient, op: &str, k: &str) -> Result<(), Status> {
    match op {
        "CreateKey" => c
            .create_key(pb::CreateKeyRequest {
                name: k.into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetKey" => c
            .get_key(pb::GetKeyRequest { name: k.into() })
            .await
            .map(|_| ()),
        "RotateKey" => c
            .rotate_key(pb::RotateKeyRequest { name: k.into() })
            .await
            .map(|_| ()),
        "DisableKeyVersion" => c
            .disable_key_version(pb::KeyVersionRequest {
                name: k.into(),
                version: 1,
            })
            .await
            .map(|_| ()),
        "GenerateDataKey" => gdk(c, k, &[]).await.map(|_| ()),
        _ => panic!("unknown op {op}"),
    }
}

#[tokio::test]
async fn roles_operations_and_keys_over_grpc() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(pol.path(), TENANTS);
    let arca = TestArca::builder()
        .arg("--policy-dir")
        .arg(&dir)
        .start()
        .await;
    let mut admin = arca.client().await;
    for k in ["billing/ssn", "tenants/acme", "spare"] {
        create_key(&mut admin, k).await;
    }
    let svc = mint_token(&arca, "svc:billing", &[]).await;
    let auditor = mint_token(&arca, "auditor:eve", &[]).await;
    let kadmin = mint_token(&arca, "key-admin:ann", &[]).await;
    let stranger = mint_token(&arca, "nobody", &[]).await;
    let narrowed = mint_token(&arca, "svc:narrow", &["auditor"]).await;

    use Code::{Ok as Allowed, PermissionDenied as Denied};
    #[rustfmt::skip]
    let table: &[(&str, &str, &str, Code)] = &[
        // A service uses keys, never administers them.
        ("svc", "GenerateDataKey", "billing/ssn", Allowed),
        ("svc", "GetKey", "billing/ssn", Allowed),
        ("svc", "CreateKey", "svc-made", Denied),
        ("svc", "RotateKey", "billing/ssn", Denied),
        ("svc", "DisableKeyVersion", "billing/ssn", Denied),
        // An auditor touches no key.
        ("auditor", "GetKey", "billing/ssn", Denied),
        ("auditor", "GenerateDataKey", "billing/ssn", Denied),
        ("auditor", "CreateKey", "aud-made", Denied),
        // A key admin may not retrieve key material (refused before any MFA check).
        ("kadmin", "GenerateDataKey", "billing/ssn", Denied),
        // Nobody bound, and a token narrowed to a role its principal is not bound to.
        ("stranger", "GetKey", "billing/ssn", Denied),
        ("narrowed", "GenerateDataKey", "billing/ssn", Denied),
        // The dev admin keeps what it had.
        ("admin", "RotateKey", "spare", Allowed),
    ];
    for (who, op, key, want) in table {
        let token = match *who {
            "svc" => &svc,
            "auditor" => &auditor,
            "kadmin" => &kadmin,
            "stranger" => &stranger,
            "narrowed" => &narrowed,
            _ => arca.token(),
        };
        let got = call(&mut arca.keys(token).await, op, key).await;
        let code = got.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        assert_eq!(code, *want, "{who} {op} {key}: {got:?}");
    }

    // A key admin cannot unwrap either.
    let blob = gdk(&mut arca.keys(&svc).await, "billing/ssn", &[])
        .await
        .unwrap();
    let e = unwrap_as(&mut arca.keys(&kadmin).await, &blob, &[]).await;
    assert_code(e, Code::PermissionDenied, "key-admin unwraps");
    unwrap_as(&mut arca.keys(&svc).await, &blob, &[])
        .await
        .unwrap();

    // Context conditions: a tenant's own id and an allowed purpose only.
    let acme = mint_token(&arca, "tenant:acme", &[]).await;
    let mut t = arca.keys(&acme).await;
    let good = [("tenant", "acme"), ("purpose", "care")];
    let blob = gdk(&mut t, "tenants/acme", &good).await.unwrap();
    unwrap_as(&mut t, &blob, &good).await.unwrap();
    for (context, what) in [
        (
            &[("tenant", "globex"), ("purpose", "care")][..],
            "another tenant",
        ),
        (
            &[("tenant", "acme"), ("purpose", "ads")][..],
            "a purpose not listed",
        ),
        (&[("tenant", "acme")][..], "no purpose"),
    ] {
        assert_code(
            gdk(&mut t, "tenants/acme", context).await,
            Code::PermissionDenied,
            what,
        );
        // A blob under a context the conditions refuse answers as an invalid blob.
        assert_code(
            unwrap_as(&mut t, &blob, context).await,
            Code::InvalidArgument,
            what,
        );
    }
    assert_code(
        gdk(&mut t, "billing/ssn", &good).await,
        Code::PermissionDenied,
        "a key outside tenants/*",
    );
}

#[tokio::test]
async fn a_refusal_looks_and_takes_the_same_for_existing_and_missing_keys() {
    let arca = TestArca::start().await;
    create_key(&mut arca.client().await, "patients/records").await;
    let blob = generate(&mut arca.client().await, "patients/records", &ctx(&[]))
        .await
        .wrapped_key;
    let auditor = mint_token(&arca, "auditor:eve", &[]).await;
    let mut c = arca.keys(&auditor).await;

    // Same code and message for every operation, key there or not.
    for op in [
        "GetKey",
        "RotateKey",
        "DisableKeyVersion",
        "GenerateDataKey",
        "CreateKey",
    ] {
        let there = call(&mut c, op, "patients/records").await.unwrap_err();
        let missing = call(&mut c, op, "patients/nothing").await.unwrap_err();
        assert_eq!(there.code(), Code::PermissionDenied, "{op}");
        assert_eq!(
            (there.code(), there.message()),
            (missing.code(), missing.message()),
            "{op}"
        );
    }
    // Unwrap: a real blob and one naming no key are refused alike.
    let mut fake = blob.clone();
    fake[1..17].copy_from_slice(&crate::support::random_bytes(16));
    let a = unwrap_as(&mut c, &blob, &[]).await.unwrap_err();
    let b = unwrap_as(&mut c, &fake, &[]).await.unwrap_err();
    assert_eq!((a.code(), a.message()), (b.code(), b.message()));
    assert_eq!(a.code(), Code::PermissionDenied);

    // Timing: interleaved, the medians stay in the same class.
    let mut there = Vec::new();
    let mut missing = Vec::new();
    for _ in 0..3 {
        // Warm up.
        let _ = call(&mut c, "GetKey", "patients/records").await;
        let _ = call(&mut c, "GetKey", "patients/nothing").await;
    }
    for i in 0..200 {
        let (name, into) = if i % 2 == 0 {
            ("patients/records", &mut there)
        } else {
            ("patients/nothing", &mut missing)
        };
        let t = Instant::now();
        let _ = call(&mut c, "GetKey", name).await;
        into.push(t.elapsed());
    }
    there.sort();
    missing.sort();
    let (a, b) = (there[there.len() / 2], missing[missing.len() / 2]);
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    crate::support::note(&format!(
        "existence timing: median {a:?} (existing) vs {b:?} (missing)"
    ));
    assert!(
        hi <= lo * 2 + Duration::from_micros(300),
        "refusal medians differ: existing {a:?}, missing {b:?}"
    );
}

#[tokio::test]
async fn a_policy_that_breaks_separation_of_duties_stops_the_start() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(
        pol.path(),
        r#"
version = 1
[roles.rogue]
[[roles.rogue.allow]]
operations = ["UnwrapKey"]
keys = ["*"]
[[roles.rogue.allow]]
operations = ["Approve"]
"#,
    );
    let data = tempfile::tempdir().unwrap();
    let mut cmd = arca_command();
    cmd.args(["server", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path().join("d"))
        .arg("--policy-dir")
        .arg(&dir);
    let out = output_of(cmd).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("role \"rogue\""), "{err}");
    assert!(err.contains("separation of duties"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

/// A role that may create keys under `x/*`, bound to `principal`.
fn creators(principal: &str) -> String {
    format!(
        r#"
version = 1
[roles.creator]
[[roles.creator.allow]]
operations = ["CreateKey"]
keys = ["x/*"]
[[bindings]]
principals = ["{principal}"]
roles = ["creator"]
"#
    )
}

#[tokio::test]
async fn sighup_reloads_the_policy_and_a_bad_file_keeps_the_old_one() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(pol.path(), &creators("nobody"));
    let arca = TestArca::builder()
        .arg("--policy-dir")
        .arg(&dir)
        .start()
        .await;
    let tok = mint_token(&arca, "svc:x", &[]).await;
    let mut c = arca.keys(&tok).await;
    assert_code(
        call(&mut c, "CreateKey", "x/1").await,
        Code::PermissionDenied,
        "before",
    );

    std::fs::write(dir.join("extra.toml"), creators("svc:x")).unwrap();
    crate::support::signal(arca.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&mut c, "CreateKey", "x/1").await.is_err() {
        assert!(Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A file that does not parse, then one that breaks separation of duties: both
    // refused, the policy in force stays.
    for (bad, why) in [
        ("version = 1\n[roles.broken\n", "invalid access policy"),
        (
            "version = 1\n[roles.r]\n[[roles.r.allow]]\noperations = [\"UnwrapKey\", \"Approve\"]\nkeys = [\"*\"]\n",
            "separation of duties",
        ),
    ] {
        std::fs::write(dir.join("extra.toml"), bad).unwrap();
        let before = arca.log_text().matches("access policy reload refused").count();
        crate::support::signal(arca.pid(), "HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = arca.log_text();
            if log.matches("access policy reload refused").count() > before {
                assert!(log.contains(why), "{why}: {log}");
                break;
            }
            assert!(Instant::now() < deadline, "no refusal logged for {why}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The old policy is still in force, and the server still runs.
        let name = format!("x/{}", why.len());
        call(&mut c, "CreateKey", &name).await.unwrap();
    }
    assert_code(
        call(&mut c, "CreateKey", "y/1").await,
        Code::PermissionDenied,
        "outside the creator's globs",
    );
}

on_both_backends!(
    #[tokio::test]
    update_policy_needs_quorum_and_takes_effect_after_approval
);

async fn update_policy_needs_quorum_and_takes_effect_after_approval(db: Db) {
    let (arca, cs) = unsealed(three_of_five(db)).await;
    let tok = mint_token(&arca, "svc:x", &[]).await;
    let mut c = arca.keys(&tok).await;
    assert_code(
        call(&mut c, "CreateKey", "x/1").await,
        Code::PermissionDenied,
        "before",
    );

    // A policy that does not load is refused at once, with the reason.
    let base = shipped_policy();
    let mut admin = arca.access(arca.token()).await;
    let bad = format!("{base}\n[roles.r]\n[[roles.r.allow]]\noperations = [\"UnwrapKey\", \"Approve\"]\nkeys = [\"*\"]\n");
    let e = admin
        .update_policy(pb::UpdatePolicyRequest { policy: bad })
        .await;
    let s = assert_code(e, Code::InvalidArgument, "SoD policy");
    assert!(s.message().contains("\"r\""), "{s:?}");

    let new = format!(
        "{base}\n[roles.creator]\n[[roles.creator.allow]]\noperations = [\"CreateKey\"]\nkeys = [\"x/*\"]\n\
         [[bindings]]\nprincipals = [\"svc:x\"]\nroles = [\"creator\"]\n"
    );
    let r = admin
        .update_policy(pb::UpdatePolicyRequest {
            policy: new.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let req = r.approval_request.expect("a quorum operation");
    assert_eq!(req.operation, "UpdatePolicy");
    assert_eq!(req.parameters.get("policy"), Some(&new));
    // Not in force before the approvals.
    assert_code(
        call(&mut c, "CreateKey", "x/1").await,
        Code::PermissionDenied,
        "pending",
    );
    for n in [4, 5] {
        let r = cs.approve(&arca, n, &req).await.unwrap();
        assert_eq!(r.state, "PENDING");
    }
    assert_code(
        call(&mut c, "CreateKey", "x/1").await,
        Code::PermissionDenied,
        "2 of 3",
    );
    let done = cs.approve(&arca, 1, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");
    assert!(done.outcome.contains("access policy version 1"), "{done:?}");
    call(&mut c, "CreateKey", "x/1").await.unwrap();
}

on_both_backends!(
    #[tokio::test]
    mfa_for_a_key_admin_without_wrong_right_and_lockout
);

async fn mfa_for_a_key_admin_without_wrong_right_and_lockout(db: Db) {
    let arca = TestArca::start_on(db).await;
    let ann = mint_token(&arca, "key-admin:ann", &[]).await;
    let create = |totp: Option<String>, name: &'static str| {
        let auth = match totp {
            Some(code) => Auth::bearer(&ann).totp(&code),
            None => Auth::bearer(&ann),
        };
        let arca = &arca;
        async move { call(&mut arca.keys(auth).await, "CreateKey", name).await }
    };
    // Not enrolled: told to enrol.
    let s = assert_code(
        create(None, "k1").await,
        Code::Unauthenticated,
        "not enrolled",
    );
    assert_eq!(reason(&s), Some("MFA_NOT_ENROLLED"), "{s:?}");
    let totp = enroll(&arca, &ann).await;
    // Re-enrolment needs a valid code.
    let e = arca
        .access(&ann)
        .await
        .enroll_totp(pb::EnrollTotpRequest {})
        .await;
    assert_code(e, Code::Unauthenticated, "re-enrol without a code"); // failure 1

    let s = assert_code(create(None, "k1").await, Code::Unauthenticated, "no code"); // 2
    assert_eq!(reason(&s), Some("MFA_CODE_MISSING"), "{s:?}");
    let s = assert_code(
        create(Some(totp.wrong()), "k1").await,
        Code::Unauthenticated,
        "wrong",
    ); // 3
    assert_eq!(reason(&s), Some("MFA_CODE_REJECTED"), "{s:?}");
    let code = totp.next().await;
    create(Some(code.clone()), "k1").await.unwrap();
    // The same code again: a replay.
    assert_code(
        create(Some(code), "k2").await,
        Code::Unauthenticated,
        "replay",
    ); // 4
    assert_code(
        create(Some(totp.wrong()), "k2").await,
        Code::Unauthenticated,
        "wrong",
    ); // 5
       // Locked out now, even with a good code.
    let code = totp.next().await;
    let s = assert_code(
        create(Some(code), "k2").await,
        Code::Unauthenticated,
        "locked",
    );
    assert_eq!(reason(&s), Some("MFA_LOCKED_OUT"), "{s:?}");
    assert!(
        arca.log_text()
            .contains("locked out after repeated MFA failures"),
        "no lock-out alert in the log"
    );
    // Other principals are not affected.
    create_key(&mut arca.client().await, "k3").await;
}

on_both_backends!(
    #[tokio::test]
    elevation_is_approved_works_and_expires_by_itself
);

async fn elevation_is_approved_works_and_expires_by_itself(db: Db) {
    let (arca, cs) = unsealed(three_of_five(db)).await;
    let ann = mint_token(&arca, "key-admin:ann", &[]).await;
    let totp = enroll(&arca, &ann).await;
    let mut as_ann = arca.keys(&ann).await;
    assert_code(
        gdk(&mut as_ann, "phi", &[]).await,
        Code::PermissionDenied,
        "before",
    );

    // Above the role's maximum: refused.
    let e = arca
        .access(Auth::bearer(&ann).totp(&totp.next().await))
        .await
        .elevate(pb::ElevateRequest {
            role: "service".into(),
            duration_seconds: 2 * 3600,
            reason: "incident 42".into(),
        })
        .await;
    assert_code(e, Code::InvalidArgument, "over max_elevation");

    let r = arca
        .access(Auth::bearer(&ann).totp(&totp.next().await))
        .await
        .elevate(pb::ElevateRequest {
            role: "service".into(),
            duration_seconds: 6,
            reason: "incident 42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let req = r.approval_request.expect("elevation is a quorum operation");
    assert_eq!(req.operation, "Elevate");
    assert_eq!(req.parameters.get("principal").unwrap(), "key-admin:ann");
    assert_code(
        gdk(&mut as_ann, "phi", &[]).await,
        Code::PermissionDenied,
        "pending",
    );
    // The requester cannot approve it; three custodians do.
    for n in [3, 4] {
        cs.approve(&arca, n, &req).await.unwrap();
    }
    let done = cs.approve(&arca, 5, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");
    assert!(
        done.outcome.contains("holds role service until"),
        "{done:?}"
    );
    let granted = Instant::now();
    gdk(&mut as_ann, "phi", &[]).await.unwrap();
    // Expires by itself.
    tokio::time::sleep(
        Duration::from_secs(6).saturating_sub(granted.elapsed()) + Duration::from_millis(300),
    )
    .await;
    assert_code(
        gdk(&mut as_ann, "phi", &[]).await,
        Code::PermissionDenied,
        "expired",
    );
}

on_both_backends!(
    #[tokio::test]
    break_glass_for_listed_principals_alerts_and_opens_a_review
);

async fn break_glass_for_listed_principals_alerts_and_opens_a_review(db: Db) {
    let arca = TestArca::start_on(db).await;
    create_key(&mut arca.client().await, "phi").await;
    let bob = mint_token(&arca, "oncall:bob", &[]).await;
    let svc = mint_token(&arca, "svc:x", &[]).await;
    let eve = mint_token(&arca, "auditor:eve", &[]).await;

    // Not listed: refused.
    let e = arca
        .access(&svc)
        .await
        .break_glass(pb::BreakGlassRequest {
            reason: "curious".into(),
            duration_seconds: 0,
        })
        .await;
    assert_code(e, Code::PermissionDenied, "unlisted break-glass");
    // Listed: the role needs MFA, so the break-glass needs a code.
    let totp = enroll(&arca, &bob).await;
    assert_code(
        gdk(
            &mut arca.keys(Auth::bearer(&bob).totp(&totp.next().await)).await,
            "phi",
            &[],
        )
        .await,
        Code::PermissionDenied,
        "before break-glass",
    );
    let r = arca
        .access(Auth::bearer(&bob).totp(&totp.next().await))
        .await
        .break_glass(pb::BreakGlassRequest {
            reason: "pager 7: EHR down".into(),
            duration_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.role, "break-glass");
    let review = r.review.unwrap();
    assert!(review.closed_at.is_empty());
    let log = arca.log_text();
    let alert = log
        .lines()
        .find(|l| l.contains("BREAK-GLASS"))
        .expect("a break-glass alert in the log");
    assert!(alert.contains("ERROR"), "{alert}");
    assert!(alert.contains("oncall:bob"), "{alert}");
    // The audit trail holds the break-glass call and, once it committed, an alert record
    // of the `break_glass` rule (policies/alerts.toml) naming bob.
    let mut audit = arca.audit(&eve).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit
            .query_audit(pb::QueryAuditRequest {
                principal: "oncall:bob".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        let call = records
            .iter()
            .any(|r| r.kind == "rpc" && r.operation == "BreakGlass" && r.result == "OK");
        let alerted = records
            .iter()
            .any(|r| r.kind == "alert" && r.detail.contains("rule=break_glass"));
        if call && alerted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no break-glass record and alert in the trail: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The role works (with a code).
    gdk(
        &mut arca.keys(Auth::bearer(&bob).totp(&totp.next().await)).await,
        "phi",
        &[],
    )
    .await
    .unwrap();

    // The review stays open until an auditor closes it; bob cannot.
    let list = |token: String| {
        let arca = &arca;
        async move {
            arca.access(&token)
                .await
                .list_reviews(pb::ListReviewsRequest { open_only: true })
                .await
                .map(|r| r.into_inner().reviews)
        }
    };
    assert_eq!(list(eve.clone()).await.unwrap().len(), 1);
    assert_code(
        list(svc.clone()).await,
        Code::PermissionDenied,
        "service lists reviews",
    );
    let e = arca
        .access(&bob)
        .await
        .close_review(pb::CloseReviewRequest {
            id: review.id.clone(),
            note: "fine".into(),
        })
        .await;
    assert_code(e, Code::PermissionDenied, "own review");
    let closed = arca
        .access(&eve)
        .await
        .close_review(pb::CloseReviewRequest {
            id: review.id.clone(),
            note: "checked the EHR ticket".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.closed_by, "auditor:eve");
    assert!(list(eve.clone()).await.unwrap().is_empty());
    let e = arca
        .access(&eve)
        .await
        .close_review(pb::CloseReviewRequest {
            id: review.id,
            note: "again".into(),
        })
        .await;
    assert_code(e, Code::FailedPrecondition, "closed twice");
}

#[tokio::test]
async fn a_role_limit_throttles_that_role_only() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(
        pol.path(),
        r#"
version = 1
[roles.metered]
rate_limit = { per_second = 1.0, burst = 3.0 }
[[roles.metered.allow]]
operations = ["ListKeys", "GetKey"]
keys = ["*"]
[[bindings]]
principals = ["svc:metered"]
roles = ["metered"]
"#,
    );
    let arca = TestArca::builder()
        .arg("--policy-dir")
        .arg(&dir)
        .start()
        .await;
    let metered = mint_token(&arca, "svc:metered", &["metered"]).await;
    let free = mint_token(&arca, "svc:free", &[]).await;
    let mut m = arca.keys(&metered).await;
    let mut refused = None;
    for _ in 0..10 {
        if let Err(e) = m.list_keys(pb::ListKeysRequest::default()).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("10 quick calls against a burst of 3 at 1/s");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.metadata().get("retry-after").is_some());
    // The service role (no limit) is unaffected, even at the same moment.
    let mut f = arca.keys(&free).await;
    for _ in 0..20 {
        f.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_approved_policy_and_grants() {
    if postgres_url("rbac::two_nodes_share_the_approved_policy_and_grants").is_none() {
        return;
    }
    let a = TestArca::start_on(Db::Postgres).await;
    let b = a.second_node().await;
    create_key(&mut a.client().await, "shared").await;
    let tok = mint_token(&a, "svc:x", &[]).await;
    let mut on_b = b.keys(&tok).await;
    assert_code(
        call(&mut on_b, "CreateKey", "x/1").await,
        Code::PermissionDenied,
        "before",
    );

    // Dev mode runs UpdatePolicy at once (no quorum); node A stores it.
    let policy = format!(
        "{}\n{}",
        shipped_policy(),
        r#"
[roles.creator]
[[roles.creator.allow]]
operations = ["CreateKey"]
keys = ["x/*"]
[roles.elevator]
[[roles.elevator.allow]]
operations = ["Elevate"]
[roles.rotator]
max_elevation = "10m"
[[roles.rotator.allow]]
operations = ["RotateKey"]
keys = ["shared"]
[[bindings]]
principals = ["svc:x"]
roles = ["creator", "elevator"]
"#
    );
    let r = a
        .access(a.token())
        .await
        .update_policy(pb::UpdatePolicyRequest { policy })
        .await
        .unwrap()
        .into_inner();
    assert!(r.outcome.contains("in force"), "{r:?}");
    // Node B adopts it by itself, within the refresh interval.
    let start = Instant::now();
    while call(&mut on_b, "CreateKey", "x/1").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "node B never adopted the policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    crate::support::note(&format!(
        "policy reached node B after {:?}",
        start.elapsed()
    ));

    // A grant made on A (an elevation, at once in dev mode) works on B.
    assert_code(
        call(&mut on_b, "RotateKey", "shared").await,
        Code::PermissionDenied,
        "before",
    );
    a.access(&tok)
        .await
        .elevate(pb::ElevateRequest {
            role: "rotator".into(),
            duration_seconds: 60,
            reason: "rotate after INC-9".into(),
        })
        .await
        .unwrap();
    let start = Instant::now();
    while call(&mut on_b, "RotateKey", "shared").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "node B never saw the grant"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_cli_enrols_breaks_glass_and_closes_the_review() {
    let arca = TestArca::start().await;
    let bob = mint_token(&arca, "oncall:bob", &[]).await;
    let eve = mint_token(&arca, "auditor:eve", &[]).await;
    let uri = arca.cli(&bob).json(&["totp", "enroll"]).await["totp_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let totp = Totp::from_uri(&uri);
    let bg = arca
        .cli(&bob)
        .env("ARCA_TOTP", totp.next().await)
        .json(&["break-glass", "--reason", "EHR down", "--duration", "10m"])
        .await;
    assert_eq!(bg["role"], "break-glass");
    let id = bg["review"]["id"].as_str().unwrap().to_string();
    let open = arca.cli(&eve).json(&["review", "list"]).await;
    assert_eq!(open["reviews"][0]["id"], id.as_str());
    assert_eq!(open["reviews"][0]["principal"], "oncall:bob");
    let closed = arca
        .cli(&eve)
        .json(&["review", "close", &id, "--note", "ok"])
        .await;
    assert_eq!(closed["closed_by"], "auditor:eve");
    let open = arca.cli(&eve).json(&["review", "list"]).await;
    assert_eq!(open["reviews"].as_array().unwrap().len(), 0);
    let all = arca.cli(&eve).json(&["review", "list", "--all"]).await;
    assert_eq!(all["reviews"].as_array().unwrap().len(), 1);

    // A policy update from a file (dev mode: at once).
    let pol = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[roles.creator]\n[[roles.creator.allow]]\noperations = [\"CreateKey\"]\nkeys = [\"x/*\"]\n[[bindings]]\nprincipals = [\"svc:x\"]\nroles = [\"creator\"]\n",
        shipped_policy()
    );
    let file = pol.path().join("p.toml");
    std::fs::write(&file, text).unwrap();
    let r = arca
        .cli(arca.token())
        .json(&["policy", "update", file.to_str().unwrap()])
        .await;
    assert!(r["outcome"].as_str().unwrap().contains("in force"), "{r}");
    let x = mint_token(&arca, "svc:x", &[]).await;
    call(&mut arca.keys(&x).await, "CreateKey", "x/1")
        .await
        .unwrap();
}

/// A token admin whose role needs MFA and may create tokens but not list them: creating a
/// token spends the code once, answers the token, and leaves no orphan and no counted
/// failure (it used to re-authorize for ListTokens after the insert: a replayed code,
/// UNAUTHENTICATED, a live token nobody received, and a failure towards lock-out).
#[tokio::test]
async fn creating_a_token_with_mfa_spends_one_code_and_answers_the_token() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(
        pol.path(),
        r#"
version = 1
[roles.minter]
mfa = true
[[roles.minter.allow]]
operations = ["CreateToken", "EnrollTotp"]
[[bindings]]
principals = ["ops:mia"]
roles = ["minter"]
"#,
    );
    let arca = TestArca::builder()
        .arg("--policy-dir")
        .arg(&dir)
        .start()
        .await;
    let mia = mint_token(&arca, "ops:mia", &[]).await;
    let totp = enroll(&arca, &mia).await;
    let code = totp.next().await;
    let made = arca
        .access(Auth::bearer(&mia).totp(&code))
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "svc:new".into(),
            roles: vec!["service".into()],
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await
        .expect("CreateToken with one code")
        .into_inner();
    assert!(made.token.starts_with("arca_"), "{made:?}");
    assert!(!made.expires_at.is_empty(), "{made:?}");
    // Exactly one token for svc:new, and no MFA failure counted.
    assert_eq!(
        arca.sql("SELECT COUNT(*) FROM tokens WHERE principal = 'svc:new'")
            .unwrap(),
        "1"
    );
    assert_eq!(
        arca.sql("SELECT COUNT(*) FROM principal_failures WHERE principal = 'ops:mia'")
            .unwrap(),
        "0"
    );
}

/// Requests and the seal status follow the policy's scope: a role whose request rules
/// name `billing/*` sees only billing requests (its token unrestricted), and a service
/// token does not see the seal.
#[tokio::test]
async fn requests_and_the_seal_status_follow_the_policys_scope() {
    let pol = tempfile::tempdir().unwrap();
    let dir = policy_dir(
        pol.path(),
        r#"
version = 1
[roles.billing-admin]
[[roles.billing-admin.allow]]
operations = ["ListRequests", "GetRequest"]
keys = ["billing/*"]
[[bindings]]
principals = ["ops:bill"]
roles = ["billing-admin"]
"#,
    );
    let (arca, _cs) = crate::support::unsealed(
        crate::support::three_of_five(Db::default())
            .arg("--policy-dir")
            .arg(&dir),
    )
    .await;
    let mut admin = arca.client().await;
    create_key(&mut admin, "billing/a").await;
    let mut ids = Vec::new();
    for k in ["billing/a", "phi"] {
        let r = admin
            .rotate_key(pb::RotateKeyRequest { name: k.into() })
            .await
            .unwrap()
            .into_inner();
        ids.push(r.approval_request.expect("a request").id);
    }
    let bill = mint_token(&arca, "ops:bill", &[]).await;
    let mut q = arca.quorum(&bill).await;
    let seen = q
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(
        seen.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [ids[0].as_str()]
    );
    let e = q
        .get_request(pb::GetRequestRequest { id: ids[1].clone() })
        .await;
    assert_code(e, Code::PermissionDenied, "a request about phi");

    let svc = mint_token(&arca, "svc:billing", &[]).await;
    let e = arca
        .quorum(&svc)
        .await
        .seal_status(pb::SealStatusRequest {})
        .await;
    assert_code(e, Code::PermissionDenied, "seal status for a service");
}
