//! Scoped tokens (DESIGN §5): key-name globs, expiry, immediate revocation, source
//! networks, admin-only administration, hashes only at rest, and existence never leaking
//! through a scope refusal.

use std::time::Duration;

use arca::grpc::pb;
use tonic::Code;

use crate::support::{contains, ctx, generate_wrapped, TestArca};

async fn create(arca: &TestArca, req: pb::CreateTokenRequest) -> pb::CreateTokenResponse {
    arca.access(arca.token())
        .await
        .create_token(req)
        .await
        .unwrap()
        .into_inner()
}

/// A call any service token may make: list the keys it may see.
async fn use_token(arca: &TestArca, token: &str) -> Result<(), tonic::Status> {
    arca.keys(token)
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .map(|_| ())
}

async fn create_key(arca: &TestArca, token: &str, name: &str) -> Result<(), tonic::Status> {
    arca.keys(token)
        .await
        .create_key(pb::CreateKeyRequest {
            name: name.into(),
            description: String::new(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn key_globs_scope_a_token_and_hide_existence() {
    let arca = TestArca::start().await;
    create_key(&arca, arca.token(), "patients/records")
        .await
        .unwrap();
    let mut admin = arca.client().await;
    let patients_blob = generate_wrapped(&mut admin, "patients/records", &ctx(&[])).await;

    let t = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:billing".into(),
            roles: vec!["service".into()],
            key_globs: vec!["billing/*".into()],
            ..Default::default()
        },
    )
    .await;
    assert!(t.token.starts_with("arca_"));
    // Services use keys; a key administrator (here the dev admin) makes them.
    create_key(&arca, arca.token(), "billing/ssn")
        .await
        .unwrap();
    let mut c = arca.keys(&t.token).await;
    c.generate_data_key(pb::GenerateDataKeyRequest {
        key_name: "billing/ssn".into(),
        context: ctx(&[]),
        without_plaintext: false,
    })
    .await
    .unwrap();

    // A key outside the scope: refused the same way whether it exists or not.
    let existing = c
        .get_key(pb::GetKeyRequest {
            name: "patients/records".into(),
        })
        .await
        .unwrap_err();
    let missing = c
        .get_key(pb::GetKeyRequest {
            name: "patients/nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(existing.code(), Code::PermissionDenied);
    assert_eq!(
        (existing.code(), existing.message()),
        (missing.code(), missing.message())
    );
    let e = c
        .unwrap_key(pb::UnwrapKeyRequest {
            wrapped_key: patients_blob,
            context: ctx(&[]),
        })
        .await
        .unwrap_err();
    // A blob is no oracle: a key outside the scope answers as a key that does not exist.
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        create_key(&arca, &t.token, "patients/new")
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let names: Vec<String> = c
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["billing/ssn"]);

    // Only an admin administers tokens.
    let e = arca
        .access(&t.token)
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Nobody mints a custodian identity outside the init ceremony.
    for (principal, role) in [("custodian:alice", "service"), ("svc:x", "custodian")] {
        let e = arca
            .access(arca.token())
            .await
            .create_token(pb::CreateTokenRequest {
                principal: principal.into(),
                roles: vec![role.into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{principal} {role}");
    }

    // The database holds hashes, never tokens.
    for (f, bytes) in arca.stored_bytes() {
        assert!(!contains(&bytes, t.token.as_bytes()), "token in {f}");
    }
}

#[tokio::test]
async fn expiry_revocation_and_source_networks() {
    let arca = TestArca::start().await;
    let short = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:a".into(),
            ttl_seconds: 1,
            ..Default::default()
        },
    )
    .await;
    assert!(!short.expires_at.is_empty());
    use_token(&arca, &short.token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        use_token(&arca, &short.token).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let t = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:b".into(),
            ..Default::default()
        },
    )
    .await;
    use_token(&arca, &t.token).await.unwrap();
    arca.access(arca.token())
        .await
        .revoke_token(pb::RevokeTokenRequest { id: t.id.clone() })
        .await
        .unwrap();
    // At once, not after a cache expiry.
    assert_eq!(
        use_token(&arca, &t.token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let e = arca
        .access(arca.token())
        .await
        .revoke_token(pb::RevokeTokenRequest { id: t.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let far = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:c".into(),
            cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        use_token(&arca, &far.token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let near = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:d".into(),
            cidrs: vec!["127.0.0.0/8".into()],
            ..Default::default()
        },
    )
    .await;
    use_token(&arca, &near.token).await.unwrap();

    let e = arca
        .access(arca.token())
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "svc:e".into(),
            cidrs: vec!["not-a-cidr".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let listed = arca
        .access(arca.token())
        .await
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let revoked = listed.iter().find(|x| x.id == t.id).unwrap();
    assert!(!revoked.revoked_at.is_empty());
    assert!(
        !format!("{listed:?}").contains("arca_"),
        "a token appears in ListTokens"
    );
}

/// The existence oracle on wrapped keys (issue 18, item 8): a caller that may unwrap some
/// keys presents a blob of a key outside its scope and a blob naming a key id that does
/// not exist. Both answers must be the same in every respect a client sees (code,
/// message, reason), for UnwrapKey and RewrapKey alike.
#[tokio::test]
async fn a_blob_of_a_forbidden_key_answers_as_a_blob_of_no_key() {
    let arca = TestArca::start().await;
    for name in ["patients/x", "other/y"] {
        create_key(&arca, arca.token(), name).await.unwrap();
    }
    let mut admin = arca.client().await;
    let patients = generate_wrapped(&mut admin, "patients/x", &ctx(&[])).await;
    let mut nobodys = patients.clone();
    nobodys[1..17].copy_from_slice(&crate::support::random_bytes(16));
    let t = create(
        &arca,
        pb::CreateTokenRequest {
            principal: "svc:other".into(),
            roles: vec!["service".into()],
            key_globs: vec!["other/*".into()],
            ..Default::default()
        },
    )
    .await;
    let mut c = arca.keys(&t.token).await;
    // The token does unwrap its own keys.
    let own = generate_wrapped(&mut c, "other/y", &ctx(&[])).await;
    c.unwrap_key(pb::UnwrapKeyRequest {
        wrapped_key: own,
        context: ctx(&[]),
    })
    .await
    .expect("its own key");

    let seen = |s: tonic::Status| {
        (
            s.code(),
            s.message().to_string(),
            crate::support::reason(&s).map(str::to_string),
        )
    };
    for blob_of in ["unwrap", "rewrap"] {
        let mut answers = Vec::new();
        for blob in [&patients, &nobodys] {
            let e = match blob_of {
                "unwrap" => c
                    .unwrap_key(pb::UnwrapKeyRequest {
                        wrapped_key: blob.clone(),
                        context: ctx(&[]),
                    })
                    .await
                    .map(|_| ())
                    .unwrap_err(),
                _ => c
                    .rewrap_key(pb::RewrapKeyRequest {
                        wrapped_key: blob.clone(),
                        context: ctx(&[]),
                    })
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            };
            answers.push(seen(e));
        }
        assert_eq!(answers[0], answers[1], "{blob_of}: forbidden vs unknown");
        assert_eq!(
            answers[0],
            (
                Code::InvalidArgument,
                "invalid wrapped key or encryption context".to_string(),
                None
            ),
            "{blob_of}"
        );
    }

    // Timing: interleaved, the medians stay in the same class (neither calls the HSM).
    let mut forbidden = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..200 {
        let (blob, into) = if i % 2 == 0 {
            (&patients, &mut forbidden)
        } else {
            (&nobodys, &mut unknown)
        };
        let t = std::time::Instant::now();
        let _ = c
            .unwrap_key(pb::UnwrapKeyRequest {
                wrapped_key: blob.clone(),
                context: ctx(&[]),
            })
            .await;
        into.push(t.elapsed());
    }
    forbidden.sort();
    unknown.sort();
    let (a, b) = (forbidden[50], unknown[50]);
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    crate::support::note(&format!(
        "blob oracle timing: median {a:?} (forbidden key) vs {b:?} (unknown key id)"
    ));
    assert!(
        hi <= lo * 2 + Duration::from_micros(300),
        "refusal medians differ: forbidden {a:?}, unknown {b:?}"
    );
}
