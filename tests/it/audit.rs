//! The audit trail (DESIGN §6) on the real binary, SoftHSM and a real database: one
//! record per RPC (allowed, denied, failed, unauthenticated), nothing secret in the
//! database, checkpoint file or logs, tamper detection with the first bad seq, an
//! append-only table, fail-closed writes that recover with an unbroken chain, alerts
//! (record, log line, webhook) and the metrics endpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::grpc::pb::access_service_client::AccessServiceClient;
use arca::grpc::pb::audit_service_client::AuditServiceClient;
use arca::grpc::pb::key_service_client::KeyServiceClient;
use arca::grpc::pb::quorum_service_client::QuorumServiceClient;
use base64::Engine;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    contains, create_key, ctx, generate, unwrap, wait_health, Auth, Db, Kit, TestArca,
};

/// A request with an `x-request-id` and, optionally, a bearer token.
fn req<T>(msg: T, token: Option<&str>, rid: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-request-id", rid.parse().unwrap());
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// A fresh token of an auditor (the policy binds `auditor:*` to the role that reads the
/// trail; the dev admin does not). Minting it is itself a `CreateToken` record.
async fn auditor(arca: &TestArca) -> String {
    arca.access(Auth::none())
        .await
        .create_token(req(
            pb::CreateTokenRequest {
                principal: "auditor:it".into(),
                ..Default::default()
            },
            Some(arca.token()),
            &format!(
                "mint-auditor-{}",
                hex::encode(crate::support::random_bytes(4))
            ),
        ))
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Every record, decrypted, through QueryAudit with an auditor's token.
async fn export(arca: &TestArca) -> Vec<pb::AuditRecord> {
    let auditor = auditor(arca).await;
    let mut c = arca.audit(Auth::none()).await;
    let mut out = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        let r = c
            .query_audit(req(
                pb::QueryAuditRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                },
                Some(&auditor),
                &format!(
                    "export-{page}-{}",
                    hex::encode(crate::support::random_bytes(4))
                ),
            ))
            .await
            .unwrap()
            .into_inner();
        out.extend(r.records);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    out
}

async fn verify(arca: &TestArca) -> pb::VerifyAuditResponse {
    let auditor = auditor(arca).await;
    verify_as(arca, &auditor).await
}

/// VerifyAudit with `auditor`'s token (for a trail that no longer takes new records).
async fn verify_as(arca: &TestArca, auditor: &str) -> pb::VerifyAuditResponse {
    arca.audit(Auth::none())
        .await
        .verify_audit(req(
            pb::VerifyAuditRequest { from_seq: 0 },
            Some(auditor),
            &format!("verify-{}", hex::encode(crate::support::random_bytes(4))),
        ))
        .await
        .unwrap()
        .into_inner()
}

fn checkpoints(arca: &TestArca) -> PathBuf {
    arca.data_dir().join("audit-checkpoints.jsonl")
}

/// Waits until the database holds at least `n` audit rows.
async fn wait_rows(arca: &TestArca, n: u64) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if arca
            .sql("SELECT count(*) FROM audit_log")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|c| c >= n)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} audit rows after 10 s");
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    every_rpc_writes_exactly_one_record
);

async fn every_rpc_writes_exactly_one_record(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    let admin = arca.token().to_string();
    let ch = arca.channel().await;
    let mut keys = KeyServiceClient::new(ch.clone());
    let mut quorum = QuorumServiceClient::new(ch.clone());
    let mut access = AccessServiceClient::new(ch.clone());
    let mut audit = AuditServiceClient::new(ch.clone());
    let t = Some(admin.as_str());
    let context = ctx(&[("tenant", "acme"), ("record", "r-1")]);

    keys.create_key(req(
        pb::CreateKeyRequest {
            name: "k1".into(),
            description: String::new(),
            ..Default::default()
        },
        t,
        "t-create",
    ))
    .await
    .unwrap();
    keys.get_key(req(pb::GetKeyRequest { name: "k1".into() }, t, "t-get"))
        .await
        .unwrap();
    keys.list_keys(req(pb::ListKeysRequest::default(), t, "t-list"))
        .await
        .unwrap();
    let dk = keys
        .generate_data_key(req(
            pb::GenerateDataKeyRequest {
                key_name: "k1".into(),
                context: context.clone(),
                without_plaintext: false,
            },
            t,
            "t-gen",
        ))
        .await
        .unwrap()
        .into_inner();
    keys.wrap_key(req(
        pb::WrapKeyRequest {
            key_name: "k1".into(),
            plaintext: vec![7u8; 32],
            context: context.clone(),
        },
        t,
        "t-wrap",
    ))
    .await
    .unwrap();
    keys.unwrap_key(req(
        pb::UnwrapKeyRequest {
            wrapped_key: dk.wrapped_key.clone(),
            context: context.clone(),
        },
        t,
        "t-unwrap",
    ))
    .await
    .unwrap();
    keys.rewrap_key(req(
        pb::RewrapKeyRequest {
            wrapped_key: dk.wrapped_key.clone(),
            context: context.clone(),
        },
        t,
        "t-rewrap",
    ))
    .await
    .unwrap();
    keys.rotate_key(req(
        pb::RotateKeyRequest { name: "k1".into() },
        t,
        "t-rotate",
    ))
    .await
    .unwrap();
    keys.disable_key_version(req(
        pb::KeyVersionRequest {
            name: "k1".into(),
            version: 1,
        },
        t,
        "t-disable",
    ))
    .await
    .unwrap();
    keys.enable_key_version(req(
        pb::KeyVersionRequest {
            name: "k1".into(),
            version: 1,
        },
        t,
        "t-enable",
    ))
    .await
    .unwrap();
    quorum
        .seal_status(req(pb::SealStatusRequest {}, t, "t-sealstatus"))
        .await
        .unwrap();
    quorum
        .list_requests(req(pb::ListRequestsRequest::default(), t, "t-listreq"))
        .await
        .unwrap();
    let scoped = access
        .create_token(req(
            pb::CreateTokenRequest {
                principal: "svc:scoped".into(),
                roles: vec!["service".into()],
                key_globs: vec!["other/*".into()],
                ..Default::default()
            },
            t,
            "t-mktoken",
        ))
        .await
        .unwrap()
        .into_inner();
    access
        .list_tokens(req(pb::ListTokensRequest {}, t, "t-lstoken"))
        .await
        .unwrap();
    let eve = auditor(&arca).await;
    audit
        .query_audit(req(
            pb::QueryAuditRequest {
                page_size: 1,
                ..Default::default()
            },
            Some(&eve),
            "t-query",
        ))
        .await
        .unwrap();
    audit
        .verify_audit(req(
            pb::VerifyAuditRequest::default(),
            Some(&eve),
            "t-verify",
        ))
        .await
        .unwrap();
    // Denied, failed and unauthenticated calls.
    let st = keys
        .unwrap_key(req(
            pb::UnwrapKeyRequest {
                wrapped_key: dk.wrapped_key.clone(),
                context: context.clone(),
            },
            Some(&scoped.token),
            "t-denied",
        ))
        .await
        .unwrap_err();
    // A blob of a key the caller may not use is answered as one naming no key.
    assert_eq!(st.code(), Code::InvalidArgument);
    let st = audit
        .query_audit(req(
            pb::QueryAuditRequest::default(),
            Some(&scoped.token),
            "t-query-denied",
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    let mut forged = dk.wrapped_key.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let st = keys
        .unwrap_key(req(
            pb::UnwrapKeyRequest {
                wrapped_key: forged,
                context: context.clone(),
            },
            t,
            "t-forged",
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let st = keys
        .get_key(req(
            pb::GetKeyRequest { name: "k1".into() },
            None,
            "t-noauth",
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    let st = keys
        .get_key(req(
            pb::GetKeyRequest { name: "k1".into() },
            Some("arca_notavalidtoken"),
            "t-badauth",
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    access
        .revoke_token(req(
            pb::RevokeTokenRequest {
                id: scoped.id.clone(),
            },
            t,
            "t-revoke",
        ))
        .await
        .unwrap();

    // Every other RPC of the API, as the dev admin (an auditor for Seal, so the server
    // stays unsealed): whatever each answers, its record must say the same.
    let mut seen: Vec<(&str, &str, Code)> = Vec::new();
    fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    let c = code_of(
        keys.retire_key_version(req(
            pb::RetireKeyVersionRequest {
                name: "k1".into(),
                version: 1,
                waiting_period_seconds: 7 * 86_400,
            },
            t,
            "x-retire-version",
        ))
        .await,
    );
    seen.push(("x-retire-version", "RetireKeyVersion", c));
    let c = code_of(
        keys.retire_key(req(
            pb::RetireKeyRequest {
                name: "absent".into(),
                waiting_period_seconds: 7 * 86_400,
            },
            t,
            "x-retire-key",
        ))
        .await,
    );
    seen.push(("x-retire-key", "RetireKey", c));
    let c = code_of(
        keys.cancel_retirement(req(
            pb::CancelRetirementRequest {
                name: "k1".into(),
                version: 1,
            },
            t,
            "x-cancel",
        ))
        .await,
    );
    seen.push(("x-cancel", "CancelRetirement", c));
    let c = code_of(
        keys.set_retention(req(
            pb::SetRetentionRequest {
                name: "k1".into(),
                ..Default::default()
            },
            t,
            "x-retention",
        ))
        .await,
    );
    seen.push(("x-retention", "SetRetention", c));
    let c = code_of(
        quorum
            .init(req(pb::InitRequest::default(), t, "x-init"))
            .await,
    );
    seen.push(("x-init", "Init", c));
    let c = code_of(
        quorum
            .unseal(req(pb::UnsealRequest::default(), t, "x-unseal"))
            .await,
    );
    seen.push(("x-unseal", "Unseal", c));
    let c = code_of(
        quorum
            .seal(req(pb::SealRequest::default(), Some(&eve), "x-seal"))
            .await,
    );
    seen.push(("x-seal", "Seal", c));
    let c = code_of(
        quorum
            .get_request(req(
                pb::GetRequestRequest {
                    id: "req_00".into(),
                },
                t,
                "x-getreq",
            ))
            .await,
    );
    seen.push(("x-getreq", "GetRequest", c));
    let c = code_of(
        quorum
            .approve(req(pb::ApproveRequest::default(), t, "x-approve"))
            .await,
    );
    seen.push(("x-approve", "Approve", c));
    let c = code_of(
        quorum
            .reject(req(pb::RejectRequest::default(), t, "x-reject"))
            .await,
    );
    seen.push(("x-reject", "Reject", c));
    let c = code_of(
        quorum
            .rekey(req(pb::RekeyRequest::default(), t, "x-rekey"))
            .await,
    );
    seen.push(("x-rekey", "Rekey", c));
    let c = code_of(
        access
            .elevate(req(pb::ElevateRequest::default(), t, "x-elevate"))
            .await,
    );
    seen.push(("x-elevate", "Elevate", c));
    let c = code_of(
        access
            .break_glass(req(pb::BreakGlassRequest::default(), t, "x-breakglass"))
            .await,
    );
    seen.push(("x-breakglass", "BreakGlass", c));
    let c = code_of(
        access
            .enroll_totp(req(pb::EnrollTotpRequest::default(), t, "x-enroll"))
            .await,
    );
    seen.push(("x-enroll", "EnrollTotp", c));
    let c = code_of(
        access
            .list_reviews(req(pb::ListReviewsRequest::default(), t, "x-reviews"))
            .await,
    );
    seen.push(("x-reviews", "ListReviews", c));
    let c = code_of(
        access
            .close_review(req(pb::CloseReviewRequest::default(), t, "x-close"))
            .await,
    );
    seen.push(("x-close", "CloseReview", c));
    let c = code_of(
        access
            .update_policy(req(pb::UpdatePolicyRequest::default(), t, "x-policy"))
            .await,
    );
    seen.push(("x-policy", "UpdatePolicy", c));

    let records = export(&arca).await;
    let mut by_rid: HashMap<&str, Vec<&pb::AuditRecord>> = HashMap::new();
    for r in &records {
        by_rid.entry(r.request_id.as_str()).or_default().push(r);
    }
    let expect: &[(&str, &str, &str, &str)] = &[
        ("t-create", "CreateKey", "dev-admin", "OK"),
        ("t-get", "GetKey", "dev-admin", "OK"),
        ("t-list", "ListKeys", "dev-admin", "OK"),
        ("t-gen", "GenerateDataKey", "dev-admin", "OK"),
        ("t-wrap", "WrapKey", "dev-admin", "OK"),
        ("t-unwrap", "UnwrapKey", "dev-admin", "OK"),
        ("t-rewrap", "RewrapKey", "dev-admin", "OK"),
        ("t-rotate", "RotateKey", "dev-admin", "OK"),
        ("t-disable", "DisableKeyVersion", "dev-admin", "OK"),
        ("t-enable", "EnableKeyVersion", "dev-admin", "OK"),
        ("t-sealstatus", "SealStatus", "dev-admin", "OK"),
        ("t-listreq", "ListRequests", "dev-admin", "OK"),
        ("t-mktoken", "CreateToken", "dev-admin", "OK"),
        ("t-lstoken", "ListTokens", "dev-admin", "OK"),
        ("t-query", "QueryAudit", "auditor:it", "OK"),
        ("t-verify", "VerifyAudit", "auditor:it", "OK"),
        ("t-denied", "UnwrapKey", "svc:scoped", "INVALID_ARGUMENT"),
        (
            "t-query-denied",
            "QueryAudit",
            "svc:scoped",
            "PERMISSION_DENIED",
        ),
        ("t-forged", "UnwrapKey", "dev-admin", "INVALID_ARGUMENT"),
        ("t-noauth", "GetKey", "", "UNAUTHENTICATED"),
        ("t-badauth", "GetKey", "", "UNAUTHENTICATED"),
        ("t-revoke", "RevokeToken", "dev-admin", "OK"),
    ];
    for (rid, op, principal, result) in expect {
        let got = by_rid.get(rid).cloned().unwrap_or_default();
        assert_eq!(got.len(), 1, "{rid}: {got:?}");
        let r = got[0];
        assert_eq!(
            (
                r.operation.as_str(),
                r.principal.as_str(),
                r.result.as_str(),
                r.kind.as_str()
            ),
            (*op, *principal, *result, "rpc"),
            "{rid}"
        );
        assert!(
            !r.time.is_empty() && r.time.ends_with('Z'),
            "{rid}: {}",
            r.time
        );
        assert_eq!(r.client, "127.0.0.1", "{rid}");
        assert!(!r.node.is_empty(), "{rid}");
    }
    for (rid, op, code) in &seen {
        let got = by_rid.get(rid).cloned().unwrap_or_default();
        assert_eq!(got.len(), 1, "{rid}: {got:?}");
        let principal = if *rid == "x-seal" {
            "auditor:it"
        } else {
            "dev-admin"
        };
        assert_eq!(
            (
                got[0].operation.as_str(),
                got[0].principal.as_str(),
                got[0].result.as_str(),
            ),
            (*op, principal, code_name(*code)),
            "{rid}"
        );
    }
    // Every RPC of the API was called above: the records name them all.
    let ops: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.operation.as_str()).collect();
    for proto in ["keys", "quorum", "access", "audit"] {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("proto/arca/v1/{proto}.proto")),
        )
        .unwrap();
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                assert!(ops.contains(name), "no record of {name}");
            }
        }
    }
    let one = |rid: &str| by_rid[rid][0];
    assert_eq!(one("t-noauth").auth_method, "none");
    assert_eq!(one("t-badauth").auth_method, "bearer");
    assert!(one("t-get").auth_method.starts_with("token:tok_"));
    assert_eq!(one("t-get").key_name, "k1");
    assert_eq!(
        (
            one("t-unwrap").key_name.as_str(),
            one("t-unwrap").key_version
        ),
        ("k1", 1)
    );
    assert_eq!(one("t-disable").key_version, 1);
    // The context is kept only as a keyed digest, the same for the same context.
    let digest = &one("t-gen").context_digest;
    assert_eq!(digest.len(), 64);
    assert_eq!(&one("t-unwrap").context_digest, digest);
    assert_eq!(&one("t-wrap").context_digest, digest);
    // Sequence numbers are gapless and the start-up actions are recorded.
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(records
        .iter()
        .any(|r| r.kind == "job" && r.operation == "unseal"));

    // Seal: recorded even though the HSM is gone by the time it is written.
    quorum
        .seal(req(pb::SealRequest {}, t, "t-seal"))
        .await
        .unwrap();
    let last = arca.sql(
        "SELECT operation || '|' || result || '|' || dek_id FROM audit_log ORDER BY seq DESC LIMIT 1",
    )
    .unwrap();
    // Written after the HSM closed, yet encrypted: the writer keeps its data key for a
    // while after a seal, for the records of calls made while the HSM was open.
    let (what, dek) = last.rsplit_once('|').unwrap();
    assert_eq!(what, "Seal|0", "the Seal record: {last}");
    assert!(!dek.is_empty(), "the Seal record in clear: {last}");
    arca.restart().await;
    let v = verify(&arca).await;
    assert!(v.ok, "{v:?}");
    assert!(v.seal_macs_checked && v.seals_checked > 0, "{v:?}");
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    nothing_secret_reaches_the_database_checkpoints_or_logs
);

async fn nothing_secret_reaches_the_database_checkpoints_or_logs(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    let admin = arca.token().to_string();
    let mut c = arca.client().await;
    create_key(&mut c, "phi").await;
    let mut secrets: Vec<(String, Vec<u8>)> =
        vec![("dev token".into(), admin.clone().into_bytes())];
    for i in 0..8 {
        let value = format!(
            "patient-ctx-value-{i}-{}",
            hex::encode(crate::support::random_bytes(6))
        );
        let context = ctx(&[("patient", &value)]);
        let dk = generate(&mut c, "phi", &context).await;
        let back = unwrap(&mut c, &dk.wrapped_key, &context).await.unwrap();
        assert_eq!(back.plaintext, dk.plaintext);
        secrets.push((format!("data key {i}"), dk.plaintext.clone()));
        secrets.push((format!("context value {i}"), value.into_bytes()));
    }
    let wrapped_pt = crate::support::random_bytes(48);
    let context = ctx(&[("consent", "consent-secret-value-31337")]);
    c.wrap_key(pb::WrapKeyRequest {
        key_name: "phi".into(),
        plaintext: wrapped_pt.clone(),
        context: context.clone(),
    })
    .await
    .unwrap();
    secrets.push(("wrapped plaintext".into(), wrapped_pt));
    secrets.push((
        "context value".into(),
        b"consent-secret-value-31337".to_vec(),
    ));
    let minted = arca
        .access(Auth::none())
        .await
        .create_token(req(
            pb::CreateTokenRequest {
                principal: "svc:x".into(),
                roles: vec!["service".into()],
                ..Default::default()
            },
            Some(&admin),
            "mint",
        ))
        .await
        .unwrap()
        .into_inner();
    secrets.push(("minted token".into(), minted.token.clone().into_bytes()));
    // A failed authentication with a token that looks real.
    let fake = format!("arca_{}", hex::encode(crate::support::random_bytes(32)));
    let _ = arca
        .keys(Auth::none())
        .await
        .get_key(req(
            pb::GetKeyRequest { name: "phi".into() },
            Some(&fake),
            "fake",
        ))
        .await;
    secrets.push(("presented token".into(), fake.into_bytes()));
    for f in ["hsm-pin", "hsm-so-pin", "dev-share"] {
        if let Ok(text) = std::fs::read_to_string(arca.data_dir().join(f)) {
            secrets.push((f.into(), text.trim().as_bytes().to_vec()));
        }
    }
    assert!(verify(&arca).await.ok);
    let pg_dump = arca.postgres().map(|p| p.dump());
    arca.stop().await;

    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    match pg_dump {
        Some(d) => haystacks.push(("pg_dump".into(), d)),
        None => {
            for f in ["arca.db", "arca.db-wal"] {
                if let Ok(b) = std::fs::read(arca.data_dir().join(f)) {
                    haystacks.push((f.into(), b));
                }
            }
        }
    }
    let cp = std::fs::read(checkpoints(&arca)).unwrap();
    assert!(!cp.is_empty());
    haystacks.push(("checkpoints".into(), cp));
    haystacks.push(("logs".into(), arca.all_logs().into_bytes()));
    let b64 = base64::engine::general_purpose::STANDARD;
    for (what, s) in &secrets {
        let forms: Vec<Vec<u8>> = vec![
            s.clone(),
            hex::encode(s).into_bytes(),
            hex::encode_upper(s).into_bytes(),
            b64.encode(s).trim_end_matches('=').as_bytes().to_vec(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(s)
                .into_bytes(),
        ];
        for (hay, bytes) in &haystacks {
            for form in &forms {
                let needle = &form[..form.len().min(40)];
                assert!(!contains(bytes, needle), "{what} found in {hay}");
            }
        }
    }
}

/// Builds a log of known rows, then breaks a copy of it in each way and asks the server
/// to verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_found_at_the_first_bad_seq() {
    let mut arca = TestArca::builder().backend(Db::Sqlite).start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let context = ctx(&[("a", "b")]);
    for _ in 0..15 {
        let dk = generate(&mut c, "k", &context).await;
        unwrap(&mut c, &dk.wrapped_key, &context).await.unwrap();
    }
    // Minted before the copy: a tampered trail takes no new records, tokens included.
    let eve = auditor(&arca).await;
    let v = verify_as(&arca, &eve).await;
    assert!(v.ok, "{v:?}");
    assert!(v.records >= 30);
    arca.stop().await;
    let dbf = arca.data_dir().join("arca.db");
    let pristine = arca.root().join("pristine.db");
    // Fold the WAL into the file so one copy holds everything.
    arca.sql("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    std::fs::copy(&dbf, &pristine).unwrap();
    let pristine_cp = std::fs::read(checkpoints(&arca)).unwrap();
    let last: u64 = arca
        .sql("SELECT max(seq) FROM audit_log")
        .unwrap()
        .parse()
        .unwrap();
    // A seal boundary in the middle, for the cut.
    let cut: u64 = arca
        .sql(&format!(
            "SELECT max(seq) FROM audit_seals WHERE seq <= {}",
            last / 2
        ))
        .unwrap()
        .parse()
        .unwrap();
    assert!(cut >= 5, "cut at {cut}");

    // The forged row: chained correctly after the last one, but beyond the head.
    let row = arca.sql(
        &format!("SELECT time_ms, kind, operation, result, dek_id, body, hash FROM audit_log WHERE seq = {last}"),
    )
    .unwrap();
    let f: Vec<&str> = row.split('|').collect();
    let mut prev = [0u8; 32];
    hex::decode_to_slice(f[6], &mut prev).unwrap();
    let mut forged = arca::store::AuditRow {
        seq: last + 1,
        time_ms: f[0].parse().unwrap(),
        kind: "rpc".into(),
        operation: "UnwrapKey".into(),
        result: 0,
        dek_id: String::new(),
        body: br#"{"node":"n","request_id":"x","principal":"nobody","auth_method":"none","client":"","latency_us":1}"#.to_vec(),
        hash: [0u8; 32],
    };
    forged.hash = arca::audit::chain::link(&prev, &forged);
    let forged_sql = format!(
        "INSERT INTO audit_log (seq, time_ms, kind, operation, result, dek_id, body, hash) VALUES ({}, {}, 'rpc', 'UnwrapKey', 0, '', '{}', '{}')",
        forged.seq,
        forged.time_ms,
        base64::engine::general_purpose::STANDARD.encode(&forged.body),
        hex::encode(forged.hash)
    );

    // A forged row put in the middle, at a sealed seq, the later rows renumbered and
    // every link from there recomputed (SHA-256 needs no key), the head moved to the new
    // end: the chain links throughout, and only the seals know better.
    let at: u64 = arca
        .sql(&format!(
            "SELECT min(seq) FROM audit_seals WHERE seq > {cut}"
        ))
        .unwrap()
        .parse()
        .unwrap();
    assert!(at < last, "a seal in the middle, after {cut}: {at}");
    let relinked_sql = {
        let hash_of = |seq: u64| {
            let mut h = [0u8; 32];
            let hex_hash = arca
                .sql(&format!("SELECT hash FROM audit_log WHERE seq = {seq}"))
                .unwrap();
            hex::decode_to_slice(hex_hash, &mut h).unwrap();
            h
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut prev = hash_of(at - 1);
        let mut forged = arca::store::AuditRow {
            seq: at,
            time_ms: 0,
            kind: "rpc".into(),
            operation: "UnwrapKey".into(),
            result: 0,
            dek_id: String::new(),
            body: br#"{"node":"n","request_id":"y","principal":"nobody","auth_method":"none","client":"","latency_us":1}"#.to_vec(),
            hash: [0u8; 32],
        };
        forged.time_ms = arca
            .sql(&format!("SELECT time_ms FROM audit_log WHERE seq = {at}"))
            .unwrap()
            .parse()
            .unwrap();
        let mut rows = vec![forged];
        let stored = arca
            .sql(&format!(
                "SELECT seq, time_ms, kind, operation, result, dek_id, body FROM audit_log WHERE seq >= {at} ORDER BY seq"
            ))
            .unwrap();
        for line in stored.lines() {
            let f: Vec<&str> = line.split('|').collect();
            rows.push(arca::store::AuditRow {
                seq: f[0].parse::<u64>().unwrap() + 1,
                time_ms: f[1].parse().unwrap(),
                kind: f[2].into(),
                operation: f[3].into(),
                result: f[4].parse().unwrap(),
                dek_id: f[5].into(),
                body: b64.decode(f[6]).unwrap(),
                hash: [0u8; 32],
            });
        }
        let mut sql =
            format!("DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE seq >= {at}; ");
        for r in &mut rows {
            r.hash = arca::audit::chain::link(&prev, r);
            prev = r.hash;
            sql.push_str(&format!(
                "INSERT INTO audit_log (seq, time_ms, kind, operation, result, dek_id, body, hash) VALUES ({}, {}, '{}', '{}', {}, '{}', '{}', '{}'); ",
                r.seq,
                r.time_ms,
                r.kind,
                r.operation,
                r.result,
                r.dek_id,
                b64.encode(&r.body),
                hex::encode(r.hash)
            ));
        }
        sql.push_str(&format!(
            "UPDATE audit_head SET seq = {}, hash = '{}';",
            last + 1,
            hex::encode(prev)
        ));
        sql
    };

    let cases: Vec<(&str, String, u64, &str)> = vec![
        ("untouched", String::new(), 0, ""),
        ("inserted in the middle, relinked", relinked_sql, at, "inserted"),
        (
            "one byte changed",
            "DROP TRIGGER audit_log_no_update; UPDATE audit_log SET body = substr(body, 1, 10) || \
             (CASE substr(body, 11, 1) WHEN 'A' THEN 'B' ELSE 'A' END) || substr(body, 12) WHERE seq = 10;"
                .into(),
            10,
            "modified",
        ),
        (
            "deleted",
            "DROP TRIGGER audit_log_no_delete; DELETE FROM audit_log WHERE seq = 12;".into(),
            12,
            "missing",
        ),
        (
            "swapped",
            "DROP TRIGGER audit_log_no_update; \
             CREATE TEMP TABLE t AS SELECT * FROM audit_log WHERE seq IN (14, 15); \
             UPDATE audit_log SET time_ms = (SELECT time_ms FROM t WHERE seq = 15), kind = (SELECT kind FROM t WHERE seq = 15), operation = (SELECT operation FROM t WHERE seq = 15), result = (SELECT result FROM t WHERE seq = 15), dek_id = (SELECT dek_id FROM t WHERE seq = 15), body = (SELECT body FROM t WHERE seq = 15), hash = (SELECT hash FROM t WHERE seq = 15) WHERE seq = 14; \
             UPDATE audit_log SET time_ms = (SELECT time_ms FROM t WHERE seq = 14), kind = (SELECT kind FROM t WHERE seq = 14), operation = (SELECT operation FROM t WHERE seq = 14), result = (SELECT result FROM t WHERE seq = 14), dek_id = (SELECT dek_id FROM t WHERE seq = 14), body = (SELECT body FROM t WHERE seq = 14), hash = (SELECT hash FROM t WHERE seq = 14) WHERE seq = 15;"
                .into(),
            14,
            "reordered",
        ),
        ("inserted", forged_sql, last + 1, "inserted"),
        (
            "tail cut",
            format!(
                "DROP TRIGGER audit_log_no_delete; DROP TRIGGER audit_seals_no_delete; DROP TRIGGER audit_head_forward; \
                 DELETE FROM audit_log WHERE seq > {cut}; DELETE FROM audit_seals WHERE seq > {cut}; \
                 UPDATE audit_head SET seq = {cut}, hash = (SELECT hash FROM audit_log WHERE seq = {cut});"
            ),
            cut + 1,
            "truncated",
        ),
    ];
    for (what, tamper, bad_seq, problem) in cases {
        let _ = std::fs::remove_file(arca.data_dir().join("arca.db-wal"));
        let _ = std::fs::remove_file(arca.data_dir().join("arca.db-shm"));
        std::fs::copy(&pristine, &dbf).unwrap();
        std::fs::write(checkpoints(&arca), &pristine_cp).unwrap();
        if !tamper.is_empty() {
            arca.sql(&tamper).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        arca.start_with(TestArca::builder()).await;
        let v = verify_as(&arca, &eve).await;
        if problem.is_empty() {
            assert!(v.ok, "{what}: {v:?}");
        } else {
            assert!(!v.ok, "{what}: {v:?}");
            assert_eq!(
                (v.first_bad_seq, v.problem.as_str()),
                (bad_seq, problem),
                "{what}: {v:?}"
            );
            // A failed verification raises an alert.
            let log = arca.log_text();
            assert!(log.contains("audit verification failed"), "{what}");
        }
        arca.stop().await;
    }
    // A checkpoint line rewritten: a second line for a seq already in the file, with
    // another head. A line is never superseded: both are named.
    let _ = std::fs::remove_file(arca.data_dir().join("arca.db-wal"));
    let _ = std::fs::remove_file(arca.data_dir().join("arca.db-shm"));
    std::fs::copy(&pristine, &dbf).unwrap();
    let text = String::from_utf8(pristine_cp.clone()).unwrap();
    let first = text.lines().next().expect("a checkpoint line");
    let mut line: serde_json::Value = serde_json::from_str(first).unwrap();
    let seq = line["seq"].as_u64().unwrap();
    line["head"] = serde_json::Value::String("ab".repeat(32));
    let forged = format!("{text}{line}\n");
    std::fs::write(checkpoints(&arca), forged).unwrap();
    arca.start_with(TestArca::builder()).await;
    let v = verify_as(&arca, &eve).await;
    assert!(!v.ok, "checkpoint rewritten: {v:?}");
    assert_eq!(
        (v.first_bad_seq, v.problem.as_str()),
        (seq, "checkpoint rewritten"),
        "{v:?}"
    );
    assert!(v.detail.contains("lines 1 and"), "{v:?}");
    arca.stop().await;
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_database_refuses_update_and_delete
);

async fn the_database_refuses_update_and_delete(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    wait_rows(&arca, 3).await;
    // Seals trail the head: wait for one, so that every table has rows to refuse.
    let start = Instant::now();
    while arca.sql("SELECT count(*) FROM audit_seals").unwrap() == "0" {
        assert!(start.elapsed() < Duration::from_secs(10), "no seal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for stmt in [
        "UPDATE audit_log SET result = 5 WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 2",
        "DELETE FROM audit_log",
        "UPDATE audit_seals SET node = 'x'",
        "DELETE FROM audit_seals",
        "DELETE FROM audit_deks",
        "UPDATE audit_head SET seq = 0",
    ] {
        let e = arca.sql(stmt).expect_err(stmt);
        assert!(
            e.contains("append-only") || e.contains("only moves forward"),
            "{stmt}: {e}"
        );
    }
    if arca.postgres().is_some() {
        let e = arca.sql("TRUNCATE audit_log").expect_err("truncate");
        assert!(e.contains("append-only"), "{e}");
    }
    assert_eq!(
        arca.sql("SELECT result FROM audit_log WHERE seq = 2")
            .unwrap(),
        "0"
    );
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    an_unwritable_log_fails_closed_then_recovers_with_an_unbroken_chain
);

async fn an_unwritable_log_fails_closed_then_recovers_with_an_unbroken_chain(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let context = ctx(&[("t", "1")]);
    let dk = generate(&mut c, "k", &context).await;
    let pg = arca.postgres().is_some();
    let block = if pg {
        "CREATE TRIGGER audit_block BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION arca_refuse('blocked by the test')"
    } else {
        "CREATE TRIGGER audit_block BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'blocked by the test'); END"
    };
    arca.sql(block).unwrap();
    for _ in 0..3 {
        let st = unwrap(&mut c, &dk.wrapped_key, &context).await.unwrap_err();
        assert_eq!(st.code(), Code::Unavailable, "{st:?}");
        assert_eq!(st.message(), "audit log unavailable");
    }
    let st = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "k".into(),
            context: context.clone(),
            without_plaintext: false,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable);
    let mut h = arca.health().await;
    assert!(
        wait_health(&mut h, ServingStatus::NotServing, Duration::from_secs(5))
            .await
            .is_some(),
        "health while the audit log fails"
    );
    let drop_block = if pg {
        "DROP TRIGGER audit_block ON audit_log"
    } else {
        "DROP TRIGGER audit_block"
    };
    arca.sql(drop_block).unwrap();
    assert!(
        wait_health(&mut h, ServingStatus::Serving, Duration::from_secs(5))
            .await
            .is_some(),
        "health after recovery"
    );
    let back = unwrap(&mut c, &dk.wrapped_key, &context).await.unwrap();
    assert_eq!(back.plaintext, dk.plaintext);
    let v = verify(&arca).await;
    assert!(v.ok, "{v:?}");
    // The outage and the refused calls are in the log.
    let records = export(&arca).await;
    assert!(records.iter().any(|r| r.operation == "audit.write_failed"));
    let refused = records
        .iter()
        .filter(|r| r.result == "UNAVAILABLE" && r.detail.contains("audit write failed"))
        .count();
    assert_eq!(refused, 4, "{records:?}");
    assert!(arca.log_text().contains("audit log write failed"));
}

/// Accepts HTTP POSTs on loopback and counts them (bodies kept).
async fn webhook_receiver() -> (String, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c2, b2) = (Arc::clone(&count), Arc::clone(&bodies));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        c2.fetch_add(1, Ordering::SeqCst);
                        b2.lock().unwrap().push(body.to_string());
                        let _ = s
                            .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        break;
                    }
                }
            }
        }
    });
    (url, count, bodies)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_unwrap_raises_one_alert_with_one_webhook_call_and_metrics_show_it() {
    let (url, hits, bodies) = webhook_receiver().await;
    let port = free_port();
    let arca = TestArca::builder()
        .arg("--alert-webhook")
        .arg(&url)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let context = ctx(&[("x", "y")]);
    let dk = generate(&mut c, "k", &context).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = c.clone();
        let (w, context) = (dk.wrapped_key.clone(), context.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                unwrap(&mut c, &w, &context).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let start = Instant::now();
    while hits.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "webhook calls");
    let body = bodies.lock().unwrap()[0].clone();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rule"], "mass_unwrap");
    assert_eq!(v["group"], "dev-admin");
    assert_eq!(v["count"], 101);
    let records = export(&arca).await;
    let alerts: Vec<_> = records.iter().filter(|r| r.kind == "alert").collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].detail.contains("rule=mass_unwrap"));
    assert_eq!(alerts[0].principal, "dev-admin");
    assert!(arca.log_text().contains("ALERT"));

    let text = http_get(&format!("127.0.0.1:{port}")).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for needle in [
        "arca_requests_total{operation=\"UnwrapKey\",result=\"OK\"} 200",
        "arca_request_duration_seconds_bucket{operation=\"UnwrapKey\",le=\"+Inf\"} 200",
        "arca_hsm_operation_duration_seconds_count",
        "arca_hsm_errors_total",
        "arca_hsm_sessions 1",
        "arca_sealed 0",
        "arca_audit_queue_depth",
        "arca_audit_commit_duration_seconds_count",
        "arca_audit_records_total",
        "arca_alerts_total{rule=\"mass_unwrap\"} 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // Sessions in use: a live gauge, between none and the one configured.
    let in_use: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("arca_hsm_sessions_in_use "))
        .expect("arca_hsm_sessions_in_use")
        .trim()
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&in_use), "{in_use}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_bad_totp_codes_raise_an_alert() {
    let (url, hits, bodies) = webhook_receiver().await;
    let arca = TestArca::builder()
        .arg("--custodians")
        .arg("2")
        .arg("--threshold")
        .arg("2")
        .arg("--alert-webhook")
        .arg(&url)
        .start()
        .await;
    let kit = Kit::custodian(&arca, 1);
    let mut q = arca.quorum(Auth::none()).await;
    for i in 0..5 {
        let st = q
            .unseal(req(
                pb::UnsealRequest {
                    share: kit.share.clone(),
                    totp: "000000".into(),
                },
                Some(&kit.token),
                &format!("totp-{i}"),
            ))
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    }
    // Two alerts: the repeated failures, and the lock-out the fifth one caused (its
    // `custodian.locked` record).
    let start = Instant::now();
    while hits.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let posted = bodies.lock().unwrap().join("\n");
    assert!(posted.contains("failed_custodian_check"), "{posted}");
    assert!(posted.contains("custodian_lockout"), "{posted}");
    // Sealed: the records are in clear, the alerts among them.
    wait_rows(&arca, 9).await;
    let alerts = arca
        .sql("SELECT body FROM audit_log WHERE kind = 'alert' ORDER BY seq")
        .unwrap();
    let bodies: Vec<String> = alerts
        .lines()
        .map(|l| {
            let b = base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .unwrap();
            String::from_utf8(b).unwrap()
        })
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    for rule in ["failed_custodian_check", "custodian_lockout"] {
        let body = bodies
            .iter()
            .find(|b| b.contains(&format!("rule={rule}")))
            .unwrap_or_else(|| panic!("no {rule} alert in {bodies:?}"));
        assert!(body.contains("custodian-1"), "{body}");
        assert!(arca.log_text().contains(rule));
    }
}

/// Two nodes on one PostgreSQL database write one gapless chain (the head is taken under
/// a row lock in each batch transaction), and either node verifies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_postgres_keep_one_gapless_chain() {
    if crate::support::postgres_url("audit::two_nodes_on_one_postgres_keep_one_gapless_chain")
        .is_none()
    {
        return;
    }
    let a = TestArca::start_on(Db::Postgres).await;
    let b = a.second_node().await;
    let mut ca = a.client().await;
    create_key(&mut ca, "k").await;
    let context = ctx(&[("n", "1")]);
    let dk = generate(&mut ca, "k", &context).await;
    let mut tasks = Vec::new();
    for node in [&a, &b] {
        for _ in 0..4 {
            let mut c = node.client().await;
            let (w, context) = (dk.wrapped_key.clone(), context.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    unwrap(&mut c, &w, &context).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let records = export(&b).await;
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let nodes: std::collections::BTreeSet<&str> = records
        .iter()
        .filter(|r| r.operation == "UnwrapKey")
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(
        records
            .iter()
            .filter(|r| r.operation == "UnwrapKey")
            .count(),
        320
    );
    let v = verify(&a).await;
    assert!(v.ok, "{v:?}");
    let v = verify(&b).await;
    assert!(v.ok, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_queries_and_exports() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "cli-k").await;
    let context = ctx(&[("c", "d")]);
    let dk = generate(&mut c, "cli-k", &context).await;
    unwrap(&mut c, &dk.wrapped_key, &context).await.unwrap();
    let eve = auditor(&arca).await;
    let verify_out = arca.cli(&eve).run(&["audit", "verify"]).await;
    let query_out = arca
        .cli(&eve)
        .run(&[
            "audit",
            "query",
            "--op",
            "UnwrapKey",
            "--since",
            "1h",
            "--output",
            "json",
        ])
        .await;
    let export_out = arca
        .cli(&eve)
        .run(&["audit", "export", "--format", "jsonl"])
        .await;
    let denied = arca.cli("arca_wrong").run(&["audit", "export"]).await;
    // Administering keys and tokens does not make one an auditor.
    let admin = arca.cli(arca.token()).run(&["audit", "verify"]).await;
    assert!(verify_out.ok, "{verify_out:?}");
    assert!(verify_out.out.starts_with("OK: "), "{}", verify_out.out);
    let lines: Vec<serde_json::Value> = query_out
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["operation"], "UnwrapKey");
    assert_eq!(lines[0]["key_name"], "cli-k");
    assert_eq!(lines[0]["principal"], "dev-admin");
    let exported: Vec<serde_json::Value> = export_out
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(exported.len() >= 6, "{exported:?}");
    let seqs: Vec<u64> = exported
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(!denied.ok);
    assert!(denied.err.contains("Unauthenticated"));
    assert!(!admin.ok);
    assert!(admin.err.contains("PermissionDenied"), "{admin:?}");
}

/// The gRPC code name an audit record uses.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_deadline_passes_cannot_skip_the_record() {
    let arca = TestArca::start().await;
    let mut keys = arca.keys(Auth::none()).await;
    let t = arca.token().to_string();
    // CreateKey makes an HSM key and commits: longer than these deadlines, so tonic
    // drops the calls' futures while the handlers run.
    let mut late = Vec::new();
    for i in 0..20 {
        let mut r = req(
            pb::CreateKeyRequest {
                name: format!("dl-{i}"),
                ..Default::default()
            },
            Some(&t),
            &format!("dl-{i}"),
        );
        r.set_timeout(Duration::from_micros(300));
        if let Err(s) = keys.create_key(r).await {
            assert!(
                matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{s:?}"
            );
            late.push(format!("dl-{i}"));
        }
    }
    // Let the handlers that outlived their callers finish (20 key creations at once
    // take a while on a loaded machine, on PostgreSQL more so).
    let settled = |records: &[pb::AuditRecord]| {
        (0..20).all(|i| {
            let rid = format!("dl-{i}");
            records.iter().any(|r| r.request_id == rid)
        })
    };
    let mut records = export(&arca).await;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) && !settled(&records) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        records = export(&arca).await;
    }
    let mut c = arca.client().await;
    let mut late_and_recorded = 0;
    for i in 0..20 {
        let rid = format!("dl-{i}");
        let mine: Vec<_> = records.iter().filter(|r| r.request_id == rid).collect();
        // What the handler did is what the record says.
        let exists = c
            .get_key(pb::GetKeyRequest { name: rid.clone() })
            .await
            .is_ok();
        if mine.is_empty() {
            // A client that gives up this fast can reset its stream before the server
            // dispatches the call: no handler ran, so there is nothing to record, and
            // nothing was created.
            assert!(late.contains(&rid), "{rid}: answered, yet no record");
            assert!(
                !exists,
                "{rid}: the key was created and the call has no record"
            );
            continue;
        }
        assert_eq!(mine.len(), 1, "{rid}: {mine:?}");
        assert_eq!(exists, mine[0].result == "OK", "{rid}: {:?}", mine[0]);
        if late.contains(&rid) {
            late_and_recorded += 1;
        }
    }
    assert!(
        late_and_recorded > 0,
        "no call that hit its deadline reached a handler; the test proves nothing"
    );
}

/// With `--audit-queue 2` and SQLite's write lock held by someone else (so the writer's
/// appends wait, and the queue's places stay taken), a burst of CreateKey calls: a call
/// that finds no place is refused before it runs (its key does not exist), every call that
/// ran has its record, and the refused calls are counted in `audit.records_lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_queue_refuses_calls_before_they_run_and_records_the_loss() {
    use std::io::{BufRead, Write};
    let arca = TestArca::builder()
        .arg("--audit-queue")
        .arg("2")
        .start()
        .await;
    let c = arca.client().await;
    create_key(&mut c.clone(), "warm").await;
    let mut holder = Command::new("sqlite3")
        .arg(arca.sqlite_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sqlite3");
    let mut stdin = holder.stdin.take().unwrap();
    writeln!(stdin, ".timeout 5000\nBEGIN IMMEDIATE;\nSELECT 'locked';").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut c = c.clone();
        calls.spawn(async move {
            let name = format!("q{i}");
            let r = c
                .create_key(pb::CreateKeyRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await;
            (name, r.map(|_| ()).map_err(|s| s.code()))
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writeln!(stdin, "COMMIT;\n.quit").unwrap();
    drop(stdin);
    holder.wait().unwrap();
    let mut outcomes = Vec::new();
    while let Some(r) = calls.join_next().await {
        outcomes.push(r.unwrap());
    }
    for (name, r) in &outcomes {
        assert!(
            matches!(r, Ok(()) | Err(Code::Unavailable)),
            "{name}: {r:?}"
        );
    }
    let mut missing = 0u64;
    let mut exists = std::collections::BTreeSet::new();
    for (name, _) in &outcomes {
        match c
            .clone()
            .get_key(pb::GetKeyRequest { name: name.clone() })
            .await
        {
            Ok(_) => {
                exists.insert(name.clone());
            }
            Err(s) if s.code() == Code::NotFound => missing += 1,
            Err(s) => panic!("GetKey {name}: {s:?}"),
        }
    }
    assert!(
        missing >= 1,
        "no call was refused before it ran: {outcomes:?}"
    );
    // The refused calls' keys are the missing ones: a call answered OK has its key.
    for (name, r) in &outcomes {
        if r.is_ok() {
            assert!(exists.contains(name), "{name} answered OK but absent");
        }
    }
    let mut records = Vec::new();
    let mut lost = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        records = export(&arca).await;
        lost = records
            .iter()
            .filter(|r| r.operation == "audit.records_lost")
            .map(|r| {
                r.detail
                    .strip_prefix("count=")
                    .and_then(|d| d.split(':').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        if lost >= missing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lost, missing, "{records:?}");
    assert!(
        records
            .iter()
            .any(|r| r.operation == "audit.records_lost" && r.result == "DATA_LOSS"),
        "{records:?}"
    );
    // Every call that ran is in the log, once.
    let recorded: Vec<&str> = records
        .iter()
        .filter(|r| r.operation == "CreateKey" && r.key_name.starts_with('q'))
        .map(|r| r.key_name.as_str())
        .collect();
    let mut unique: Vec<&str> = recorded.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), recorded.len(), "{recorded:?}");
    assert_eq!(
        unique
            .iter()
            .map(|s| s.to_string())
            .collect::<std::collections::BTreeSet<_>>(),
        exists
    );
    let v = verify(&arca).await;
    assert!(v.ok, "{v:?}");
}
