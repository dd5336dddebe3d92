//! What an audit record names (DESIGN §6, docs/audit.md "What a record holds"): every
//! record of a call on a key the caller may use names that key and version, refused or
//! not, so that `QueryAudit --key K` (and `arca audit query --key K`) finds every attempt
//! on K: unwraps and rewraps of a wrapped key whose version was disabled, retired or
//! crypto-shredded, and wraps under a key whose primary version cannot wrap. A caller
//! that may not use the key still learns nothing, and its record names nothing it did
//! not name itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use tonic::Code;

use crate::support::{
    assert_code, create_key, ctx, generate, lifecycle_policy, mint_token, reason, version_state,
    Auth, Db, KeyClient, TestArca,
};

/// `msg` with `x-request-id: rid` (the client adds the credentials).
fn rid<T>(msg: T, rid: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-request-id", rid.parse().unwrap());
    r
}

/// Unwraps `blob` (as `rid`); the status of the refusal, with the reason `why`.
async fn refused_unwrap(
    c: &mut KeyClient,
    blob: &[u8],
    context: &HashMap<String, String>,
    id: &str,
    why: &str,
) {
    let r = c
        .unwrap_key(rid(
            pb::UnwrapKeyRequest {
                wrapped_key: blob.to_vec(),
                context: context.clone(),
            },
            id,
        ))
        .await;
    let s = assert_code(r, Code::FailedPrecondition, id);
    assert_eq!(reason(&s), Some(why), "{id}: {s:?}");
}

/// Rewraps `blob` (as `rid`); refused with the reason `why`.
async fn refused_rewrap(
    c: &mut KeyClient,
    blob: &[u8],
    context: &HashMap<String, String>,
    id: &str,
    why: &str,
) {
    let r = c
        .rewrap_key(rid(
            pb::RewrapKeyRequest {
                wrapped_key: blob.to_vec(),
                context: context.clone(),
            },
            id,
        ))
        .await;
    let s = assert_code(r, Code::FailedPrecondition, id);
    assert_eq!(reason(&s), Some(why), "{id}: {s:?}");
}

/// Every record naming key `name`, through `QueryAudit` with the key filter.
async fn records_of_key(arca: &TestArca, auditor: &str, name: &str) -> Vec<pb::AuditRecord> {
    let mut c = arca.audit(auditor).await;
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .query_audit(pb::QueryAuditRequest {
                key_name: name.into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// The one record of request `id` among `records`.
fn one<'a>(records: &'a [pb::AuditRecord], id: &str) -> &'a pb::AuditRecord {
    let found: Vec<_> = records.iter().filter(|r| r.request_id == id).collect();
    assert_eq!(found.len(), 1, "records of {id} found by key: {records:#?}");
    found[0]
}

/// Polls until version `v` of `name` is DESTROYED.
async fn wait_destroyed(arca: &TestArca, name: &str, v: u32) {
    let started = Instant::now();
    while version_state(&arca.key(name).await, v) != pb::KeyVersionState::Destroyed {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "v{v} of {name} not destroyed\n{}",
            arca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    refused_attempts_on_a_key_are_found_by_its_name_and_version
);

async fn refused_attempts_on_a_key_are_found_by_its_name_and_version(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let policy = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let arca = TestArca::builder()
        .backend(db)
        .fast_jobs(&policy, "2s")
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "phi").await;
    let cx = ctx(&[("patient", "p-17")]);
    let dk = generate(&mut c, "phi", &cx).await;
    assert_eq!(dk.key_version, 1);
    c.rotate_key(rid(pb::RotateKeyRequest { name: "phi".into() }, "rotate"))
        .await
        .unwrap();

    // v1 disabled: unwrap and rewrap of the blob are refused.
    c.disable_key_version(pb::KeyVersionRequest {
        name: "phi".into(),
        version: 1,
    })
    .await
    .unwrap();
    refused_unwrap(
        &mut c,
        &dk.wrapped_key,
        &cx,
        "u-disabled",
        "VERSION_DISABLED",
    )
    .await;
    refused_rewrap(
        &mut c,
        &dk.wrapped_key,
        &cx,
        "r-disabled",
        "VERSION_DISABLED",
    )
    .await;

    // v1 retired (dev mode needs no quorum), an hour to wait: refused while scheduled.
    c.retire_key_version(pb::RetireKeyVersionRequest {
        name: "phi".into(),
        version: 1,
        waiting_period_seconds: 3600,
    })
    .await
    .unwrap();
    let scheduled = "VERSION_SCHEDULED_FOR_DESTRUCTION";
    refused_unwrap(&mut c, &dk.wrapped_key, &cx, "u-scheduled", scheduled).await;
    refused_rewrap(&mut c, &dk.wrapped_key, &cx, "r-scheduled", scheduled).await;

    // Cancelled, then retired again with a second to wait: crypto-shredded by the
    // destroyer job, and refused ever after.
    c.cancel_retirement(pb::CancelRetirementRequest {
        name: "phi".into(),
        version: 1,
    })
    .await
    .unwrap();
    c.retire_key_version(pb::RetireKeyVersionRequest {
        name: "phi".into(),
        version: 1,
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    wait_destroyed(&arca, "phi", 1).await;
    refused_unwrap(
        &mut c,
        &dk.wrapped_key,
        &cx,
        "u-destroyed",
        "VERSION_DESTROYED",
    )
    .await;
    refused_rewrap(
        &mut c,
        &dk.wrapped_key,
        &cx,
        "r-destroyed",
        "VERSION_DESTROYED",
    )
    .await;

    // A data key under v2, for after the whole key is retired.
    let dk2 = generate(&mut c, "phi", &cx).await;
    assert_eq!(dk2.key_version, 2);

    // The primary (v2) disabled: wraps under the key are refused.
    c.disable_key_version(pb::KeyVersionRequest {
        name: "phi".into(),
        version: 2,
    })
    .await
    .unwrap();
    let r = c
        .generate_data_key(rid(
            pb::GenerateDataKeyRequest {
                key_name: "phi".into(),
                context: cx.clone(),
                without_plaintext: true,
            },
            "g-primary",
        ))
        .await;
    let s = assert_code(
        r,
        Code::FailedPrecondition,
        "generate under a disabled primary",
    );
    assert_eq!(reason(&s), Some("PRIMARY_NOT_ENABLED"), "{s:?}");
    let r = c
        .wrap_key(rid(
            pb::WrapKeyRequest {
                key_name: "phi".into(),
                plaintext: vec![7; 32],
                context: cx.clone(),
            },
            "w-primary",
        ))
        .await;
    let s = assert_code(r, Code::FailedPrecondition, "wrap under a disabled primary");
    assert_eq!(reason(&s), Some("PRIMARY_NOT_ENABLED"), "{s:?}");

    // The whole key retired and shredded: its last version refuses too.
    c.retire_key(pb::RetireKeyRequest {
        name: "phi".into(),
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    wait_destroyed(&arca, "phi", 2).await;
    refused_unwrap(
        &mut c,
        &dk2.wrapped_key,
        &cx,
        "u-shredded",
        "VERSION_DESTROYED",
    )
    .await;
    let r = c
        .generate_data_key(rid(
            pb::GenerateDataKeyRequest {
                key_name: "phi".into(),
                context: cx.clone(),
                without_plaintext: true,
            },
            "g-shredded",
        ))
        .await;
    assert_code(r, Code::FailedPrecondition, "generate under a shredded key");

    // A service that may use only other keys is answered as if phi's blob named no key;
    // its record names the key (no version) and says the answer stands for a refusal.
    let outsider = arca
        .access(arca.token())
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "svc:outsider".into(),
            roles: vec!["service".into()],
            key_globs: vec!["other/*".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let r = arca
        .keys(Auth::bearer(&outsider))
        .await
        .unwrap_key(rid(
            pb::UnwrapKeyRequest {
                wrapped_key: dk.wrapped_key.clone(),
                context: cx.clone(),
            },
            "o-phi",
        ))
        .await;
    let s = assert_code(r, Code::InvalidArgument, "the outsider");
    assert_eq!(
        (s.message(), reason(&s)),
        ("invalid wrapped key or encryption context", None),
        "{s:?}"
    );

    let auditor = mint_token(&arca, "auditor:keys", &[]).await;
    let found = records_of_key(&arca, &auditor, "phi").await;
    let refused = "FAILED_PRECONDITION";
    let cases = [
        ("rotate", "RotateKey", "OK", 2),
        ("u-disabled", "UnwrapKey", refused, 1),
        ("r-disabled", "RewrapKey", refused, 1),
        ("u-scheduled", "UnwrapKey", refused, 1),
        ("r-scheduled", "RewrapKey", refused, 1),
        ("u-destroyed", "UnwrapKey", refused, 1),
        ("r-destroyed", "RewrapKey", refused, 1),
        ("g-primary", "GenerateDataKey", refused, 2),
        ("w-primary", "WrapKey", refused, 2),
        ("u-shredded", "UnwrapKey", refused, 2),
        ("g-shredded", "GenerateDataKey", refused, 2),
    ];
    for (id, op, result, version) in cases {
        let r = one(&found, id);
        assert_eq!(
            (
                r.operation.as_str(),
                r.result.as_str(),
                r.principal.as_str(),
                r.key_name.as_str(),
                r.key_version,
            ),
            (op, result, "dev-admin", "phi", version),
            "{id}"
        );
        if op != "RotateKey" {
            assert_eq!(r.context_digest.len(), 64, "{id}: the context's digest");
        }
    }
    // A forbidden attempt is found by the key it probed (its answer said nothing).
    assert_eq!(one(&found, "o-phi").principal, "svc:outsider");
    let all = arca
        .audit(&auditor)
        .await
        .query_audit(pb::QueryAuditRequest {
            principal: "svc:outsider".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let r = one(&all, "o-phi");
    assert_eq!(
        (
            r.result.as_str(),
            r.key_name.as_str(),
            r.key_version,
            r.detail.as_str()
        ),
        (
            "INVALID_ARGUMENT",
            "phi",
            0,
            arca::service::POLICY_REFUSED_AS_INVALID
        ),
        "the outsider's record"
    );

    // The command line finds the shredded key's refused unwraps the same way.
    let out = arca
        .cli(&auditor)
        .run(&[
            "audit",
            "query",
            "--key",
            "phi",
            "--op",
            "UnwrapKey",
            "--result",
            "FAILED_PRECONDITION",
            "--output",
            "json",
        ])
        .await;
    assert!(out.ok, "{out:?}");
    let lines: Vec<serde_json::Value> = out
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["u-disabled", "u-scheduled", "u-destroyed", "u-shredded"],
        "{lines:#?}"
    );
    let versions: Vec<u64> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["key_name"], "phi", "{l}");
            l["key_version"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 1, 1, 2], "{lines:#?}");
}
