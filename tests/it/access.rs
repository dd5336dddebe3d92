//! Authentication, health, request ids, and the dev server's loopback-only rule.

use std::collections::HashSet;
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    arca_command, assert_code, create_key, ctx, generate, health_status, output_of, TestArca,
};
use arca::grpc::pb;

#[tokio::test]
async fn missing_or_wrong_tokens_are_unauthenticated_and_change_nothing() {
    let arca = TestArca::start().await;
    let token = arca.token().to_string();
    let mut good = arca.client().await;
    create_key(&mut good, "guarded").await;
    let blob = generate(&mut good, "guarded", &ctx(&[])).await.wrapped_key;

    // A token that differs from the real one in its last character.
    let mut near = token.clone();
    let last = near.pop().expect("token");
    near.push(if last == 'A' { 'B' } else { 'A' });

    let headers: Vec<(String, Option<String>)> = vec![
        ("no authorization header".into(), None),
        ("empty header".into(), Some(String::new())),
        ("scheme only".into(), Some("Bearer".into())),
        ("scheme and space".into(), Some("Bearer ".into())),
        (
            "made-up token".into(),
            Some("Bearer arca_notarealtoken0000000000000000000000".into()),
        ),
        (
            "real token, last char changed".into(),
            Some(format!("Bearer {near}")),
        ),
        ("real token without scheme".into(), Some(token.clone())),
        (
            "real token, Basic scheme".into(),
            Some(format!("Basic {token}")),
        ),
        (
            "real token with prefix cut".into(),
            Some(format!("Bearer {}", &token[5..])),
        ),
        (
            "real token with a suffix".into(),
            Some(format!("Bearer {token}x")),
        ),
    ];
    for (what, header) in &headers {
        let mut c = arca.client_with_header(header.as_deref()).await;
        let s = assert_code(
            c.get_key(pb::GetKeyRequest {
                name: "guarded".into(),
            })
            .await,
            Code::Unauthenticated,
            &format!("GetKey, {what}"),
        );
        assert!(!s.message().contains(&token), "the error echoes the token");
        assert_code(
            c.list_keys(pb::ListKeysRequest::default()).await,
            Code::Unauthenticated,
            &format!("ListKeys, {what}"),
        );
        assert_code(
            c.generate_data_key(pb::GenerateDataKeyRequest {
                key_name: "guarded".into(),
                context: ctx(&[]),
                without_plaintext: false,
            })
            .await,
            Code::Unauthenticated,
            &format!("GenerateDataKey, {what}"),
        );
        assert_code(
            c.unwrap_key(pb::UnwrapKeyRequest {
                wrapped_key: blob.clone(),
                context: ctx(&[]),
            })
            .await,
            Code::Unauthenticated,
            &format!("UnwrapKey, {what}"),
        );
        assert_code(
            c.create_key(pb::CreateKeyRequest {
                name: "sneaky".into(),
                description: String::new(),
                ..Default::default()
            })
            .await,
            Code::Unauthenticated,
            &format!("CreateKey, {what}"),
        );
        assert_code(
            c.rotate_key(pb::RotateKeyRequest {
                name: "guarded".into(),
            })
            .await,
            Code::Unauthenticated,
            &format!("RotateKey, {what}"),
        );
    }

    // Nothing above reached the handlers.
    assert_code(
        good.get_key(pb::GetKeyRequest {
            name: "sneaky".into(),
        })
        .await,
        Code::NotFound,
        "key created without credentials",
    );
    let k = good
        .get_key(pb::GetKeyRequest {
            name: "guarded".into(),
        })
        .await
        .expect("GetKey with the dev token")
        .into_inner();
    assert_eq!(k.primary_version, 1, "rotated without credentials");
    // The scheme is case-insensitive (RFC 7235).
    let mut lower = arca
        .client_with_header(Some(&format!("bearer {token}")))
        .await;
    lower
        .get_key(pb::GetKeyRequest {
            name: "guarded".into(),
        })
        .await
        .expect("lower-case scheme");
}

#[tokio::test]
async fn health_answers_without_credentials() {
    let arca = TestArca::start().await;
    let mut h = arca.health().await;
    for service in ["", "arca.v1.KeyService"] {
        let s = tokio::time::timeout(Duration::from_secs(5), health_status(&mut h, service))
            .await
            .expect("health timed out")
            .unwrap_or_else(|s| panic!("health {service:?}: {s:?}"));
        assert_eq!(s, ServingStatus::Serving, "health of {service:?}");
    }
    let unknown = health_status(&mut h, "no.such.Service").await;
    assert_code(unknown, Code::NotFound, "health of an unknown service");
}

fn request_id(md: &MetadataMap, what: &str) -> String {
    let v = md
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{what}: no x-request-id in {md:?}"));
    let s = v.to_str().expect("ascii request id").to_string();
    assert!(!s.is_empty(), "{what}: empty x-request-id");
    s
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    let mut ids = Vec::new();

    // Successes.
    let r = c
        .create_key(pb::CreateKeyRequest {
            name: "rid".into(),
            description: String::new(),
            ..Default::default()
        })
        .await
        .expect("CreateKey");
    ids.push(request_id(r.metadata(), "CreateKey"));
    let r = c
        .get_key(pb::GetKeyRequest { name: "rid".into() })
        .await
        .expect("GetKey");
    ids.push(request_id(r.metadata(), "GetKey"));
    let r = c
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("ListKeys");
    ids.push(request_id(r.metadata(), "ListKeys"));
    let r = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "rid".into(),
            context: ctx(&[]),
            without_plaintext: false,
        })
        .await
        .expect("GenerateDataKey");
    ids.push(request_id(r.metadata(), "GenerateDataKey"));
    let blob = r.into_inner().wrapped_key;
    let r = c
        .unwrap_key(pb::UnwrapKeyRequest {
            wrapped_key: blob.clone(),
            context: ctx(&[]),
        })
        .await
        .expect("UnwrapKey");
    ids.push(request_id(r.metadata(), "UnwrapKey"));
    let r = c
        .rotate_key(pb::RotateKeyRequest { name: "rid".into() })
        .await
        .expect("RotateKey");
    ids.push(request_id(r.metadata(), "RotateKey"));

    // Errors of every class the API can produce here.
    let mut bad = blob.clone();
    bad[40] ^= 1;
    let errors = vec![
        (
            "NotFound",
            c.get_key(pb::GetKeyRequest {
                name: "nope".into(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "InvalidArgument (name)",
            c.get_key(pb::GetKeyRequest {
                name: "NOPE".into(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "InvalidArgument (blob)",
            c.unwrap_key(pb::UnwrapKeyRequest {
                wrapped_key: bad,
                context: ctx(&[]),
            })
            .await
            .map(|_| ()),
        ),
        (
            "AlreadyExists",
            c.create_key(pb::CreateKeyRequest {
                name: "rid".into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ];
    for (what, r) in errors {
        let s = r.expect_err(what);
        ids.push(request_id(s.metadata(), what));
    }
    c.disable_key_version(pb::KeyVersionRequest {
        name: "rid".into(),
        version: 1,
    })
    .await
    .expect("disable");
    let s = c
        .unwrap_key(pb::UnwrapKeyRequest {
            wrapped_key: blob,
            context: ctx(&[]),
        })
        .await
        .expect_err("unwrap under a disabled version");
    assert_eq!(s.code(), Code::FailedPrecondition);
    ids.push(request_id(s.metadata(), "FailedPrecondition"));
    let mut anon = arca.client_with_header(None).await;
    let s = anon
        .get_key(pb::GetKeyRequest { name: "rid".into() })
        .await
        .expect_err("anonymous");
    assert_eq!(s.code(), Code::Unauthenticated);
    ids.push(request_id(s.metadata(), "Unauthenticated"));

    // Health too.
    let mut h = arca.health().await;
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
    ids.push(request_id(r.metadata(), "Health"));

    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "request ids repeat: {ids:?}");

    // A well-formed id from the caller is kept, so logs can be joined across services.
    let mut req = tonic::Request::new(pb::GetKeyRequest { name: "rid".into() });
    req.metadata_mut().insert(
        "x-request-id",
        "caller-chosen-id-42".parse().expect("value"),
    );
    let r = c.get_key(req).await.expect("GetKey with a request id");
    assert_eq!(request_id(r.metadata(), "echo"), "caller-chosen-id-42");
    // A malformed one is replaced by a fresh id (it would otherwise reach the logs).
    for bad in ["has spaces in it", "semi;colon", &"x".repeat(65)] {
        let mut req = tonic::Request::new(pb::GetKeyRequest { name: "rid".into() });
        req.metadata_mut()
            .insert("x-request-id", bad.parse().expect("value"));
        let r = c.get_key(req).await.expect("GetKey with a bad request id");
        let got = request_id(r.metadata(), "replaced");
        assert_ne!(got, bad, "malformed request id echoed");
        assert!(!ids.contains(&got), "fresh id repeats an earlier one");
    }
}

#[tokio::test]
async fn dev_mode_refuses_a_non_loopback_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let mut cmd = arca_command();
        cmd.args(["server", "--dev", "--listen", listen, "--data-dir"])
            .arg(&data_dir);
        let out = output_of(cmd).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(2),
            "exit code for --listen {listen}; stderr: {stderr}"
        );
        assert!(
            stderr.contains("loopback"),
            "message for --listen {listen}: {stderr}"
        );
        assert!(
            !stdout.contains("listening"),
            "it listened anyway: {stdout}"
        );
        assert!(!data_dir.exists(), "a refused start made the data dir");
    }
}
