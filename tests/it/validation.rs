//! Input validation and the status codes of the key API: WrapKey sizes, key names,
//! unknown keys, duplicate names and ListKeys pagination.

use std::collections::BTreeSet;

use tonic::Code;

use crate::support::{assert_code, create_key, ctx, random_bytes, unwrap, Db, TestArca};
use arca::grpc::pb;

on_both_backends!(
    #[tokio::test]
    wrap_key_takes_16_to_64_bytes
);

async fn wrap_key_takes_16_to_64_bytes(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "wrapper").await;
    let context = ctx(&[("app", "billing")]);

    for n in [16usize, 17, 32, 48, 63, 64] {
        let material = random_bytes(n);
        let w = c
            .wrap_key(pb::WrapKeyRequest {
                key_name: "wrapper".into(),
                plaintext: material.clone(),
                context: context.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("WrapKey of {n} bytes: {s:?}"))
            .into_inner();
        assert_eq!(w.key_version, 1);
        assert_eq!(w.key_name, "wrapper");
        assert_eq!(
            w.wrapped_key.len(),
            21 + 12 + n + 16,
            "blob length for {n} bytes"
        );
        let u = unwrap(&mut c, &w.wrapped_key, &context)
            .await
            .expect("unwrap");
        assert_eq!(u.plaintext, material, "{n} bytes round trip");
    }
    for n in [0usize, 1, 15, 65, 128, 4096] {
        let r = c
            .wrap_key(pb::WrapKeyRequest {
                key_name: "wrapper".into(),
                plaintext: random_bytes(n),
                context: context.clone(),
            })
            .await;
        assert_code(r, Code::InvalidArgument, &format!("WrapKey of {n} bytes"));
    }
}

const BAD_NAMES: &[&str] = &[
    "",
    "A",
    "Patients",
    "-lead",
    "_lead",
    "/lead",
    "has space",
    "dot.name",
    "colon:name",
    "tab\tname",
    "new\nline",
    "é",
    "ü-key",
    "a\0b",
];

on_both_backends!(
    #[tokio::test]
    invalid_key_names_are_invalid_argument_everywhere
);

async fn invalid_key_names_are_invalid_argument_everywhere(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "real").await;
    let too_long = "a".repeat(129);
    let mut names: Vec<&str> = BAD_NAMES.to_vec();
    names.push(&too_long);

    for name in names {
        let what = |op: &str| format!("{op} {name:?}");
        assert_code(
            c.create_key(pb::CreateKeyRequest {
                name: name.into(),
                description: String::new(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &what("CreateKey"),
        );
        assert_code(
            c.get_key(pb::GetKeyRequest { name: name.into() }).await,
            Code::InvalidArgument,
            &what("GetKey"),
        );
        assert_code(
            c.generate_data_key(pb::GenerateDataKeyRequest {
                key_name: name.into(),
                context: ctx(&[]),
                without_plaintext: false,
            })
            .await,
            Code::InvalidArgument,
            &what("GenerateDataKey"),
        );
        assert_code(
            c.wrap_key(pb::WrapKeyRequest {
                key_name: name.into(),
                plaintext: vec![1; 32],
                context: ctx(&[]),
            })
            .await,
            Code::InvalidArgument,
            &what("WrapKey"),
        );
        assert_code(
            c.rotate_key(pb::RotateKeyRequest { name: name.into() })
                .await,
            Code::InvalidArgument,
            &what("RotateKey"),
        );
        assert_code(
            c.disable_key_version(pb::KeyVersionRequest {
                name: name.into(),
                version: 1,
            })
            .await,
            Code::InvalidArgument,
            &what("DisableKeyVersion"),
        );
    }

    // The edges of the rule are accepted.
    let longest = "z".repeat(128);
    for name in [
        "a",
        "0",
        "0_x",
        "billing/ssn",
        "a-b_c/d-9",
        longest.as_str(),
    ] {
        let k = create_key(&mut c, name).await;
        assert_eq!(k.name, name);
    }

    // Nothing invalid was created.
    let all = c
        .list_keys(pb::ListKeysRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(
        all.keys.len(),
        7,
        "keys: {:?}",
        all.keys.iter().map(|k| &k.name).collect::<Vec<_>>()
    );
}

on_both_backends!(
    #[tokio::test]
    unknown_keys_are_not_found_and_names_are_never_reused
);

async fn unknown_keys_are_not_found_and_names_are_never_reused(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    let first = create_key(&mut c, "taken").await;

    let missing = "no-such-key";
    assert_code(
        c.get_key(pb::GetKeyRequest {
            name: missing.into(),
        })
        .await,
        Code::NotFound,
        "GetKey unknown",
    );
    assert_code(
        c.generate_data_key(pb::GenerateDataKeyRequest {
            key_name: missing.into(),
            context: ctx(&[]),
            without_plaintext: false,
        })
        .await,
        Code::NotFound,
        "GenerateDataKey unknown",
    );
    assert_code(
        c.wrap_key(pb::WrapKeyRequest {
            key_name: missing.into(),
            plaintext: vec![1; 32],
            context: ctx(&[]),
        })
        .await,
        Code::NotFound,
        "WrapKey unknown",
    );
    assert_code(
        c.rotate_key(pb::RotateKeyRequest {
            name: missing.into(),
        })
        .await,
        Code::NotFound,
        "RotateKey unknown",
    );
    assert_code(
        c.enable_key_version(pb::KeyVersionRequest {
            name: missing.into(),
            version: 1,
        })
        .await,
        Code::NotFound,
        "EnableKeyVersion unknown",
    );

    // Duplicate CreateKey: ALREADY_EXISTS, and the existing key is untouched.
    for description in ["", "another description"] {
        assert_code(
            c.create_key(pb::CreateKeyRequest {
                name: "taken".into(),
                description: description.into(),
                ..Default::default()
            })
            .await,
            Code::AlreadyExists,
            "duplicate CreateKey",
        );
    }
    let k = c
        .get_key(pb::GetKeyRequest {
            name: "taken".into(),
        })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(k.id, first.id);
    assert_eq!(k.versions.len(), 1);
    assert_eq!(k.description, first.description);

    // Concurrent creates of one name: exactly one wins.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = c.clone();
        set.spawn(async move {
            c.create_key(pb::CreateKeyRequest {
                name: "raced".into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code())
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        match r.expect("join") {
            Ok(()) => ok += 1,
            Err(code) => assert_eq!(code, Code::AlreadyExists, "racing CreateKey"),
        }
    }
    assert_eq!(ok, 1, "racing CreateKey of one name");
}

on_both_backends!(
    #[tokio::test]
    list_keys_pages_through_every_key_once
);

async fn list_keys_pages_through_every_key_once(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    let mut created = BTreeSet::new();
    for name in ["kb", "ka", "kg", "kd", "kc", "kf", "ke"] {
        create_key(&mut c, name).await;
        created.insert(name.to_string());
    }

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    for _page in 0..10 {
        let r = c
            .list_keys(pb::ListKeysRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .expect("ListKeys")
            .into_inner();
        assert!(r.keys.len() <= 3, "page larger than asked");
        sizes.push(r.keys.len());
        seen.extend(r.keys.into_iter().map(|k| k.name));
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(token.is_empty(), "pagination did not end");
    assert_eq!(sizes, vec![3, 3, 1], "page sizes");
    assert_eq!(
        seen,
        created.iter().cloned().collect::<Vec<_>>(),
        "keys in name order, each once"
    );

    // One page holds all when asked; size 0 means the default.
    for size in [0u32, 7, 100] {
        let r = c
            .list_keys(pb::ListKeysRequest {
                page_size: size,
                page_token: String::new(),
            })
            .await
            .expect("ListKeys")
            .into_inner();
        let names: Vec<String> = r.keys.into_iter().map(|k| k.name).collect();
        assert_eq!(
            names,
            created.iter().cloned().collect::<Vec<_>>(),
            "page_size {size}"
        );
        if size != 7 {
            assert!(
                r.next_page_token.is_empty(),
                "page_size {size}: token on the last page"
            );
        }
    }

    assert_code(
        c.list_keys(pb::ListKeysRequest {
            page_size: 3,
            page_token: "%%% not a token %%%".into(),
        })
        .await,
        Code::InvalidArgument,
        "garbage page token",
    );
}

on_both_backends!(
    #[tokio::test]
    oversized_or_malformed_inputs_are_refused_and_change_nothing
);

async fn oversized_or_malformed_inputs_are_refused_and_change_nothing(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "limits").await;
    let dk = crate::support::generate(&mut c, "limits", &ctx(&[])).await;

    // Encryption contexts over the limits, or with an empty key.
    let many: std::collections::HashMap<String, String> = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let huge = ctx(&[("k", &"v".repeat(9 * 1024))]);
    let empty_key = ctx(&[("", "v")]);
    for (what, context) in [
        ("65 entries", &many),
        ("9 KiB value", &huge),
        ("empty key", &empty_key),
    ] {
        assert_code(
            c.generate_data_key(pb::GenerateDataKeyRequest {
                key_name: "limits".into(),
                context: context.clone(),
                without_plaintext: false,
            })
            .await,
            Code::InvalidArgument,
            &format!("GenerateDataKey, context {what}"),
        );
        assert_code(
            unwrap(&mut c, &dk.wrapped_key, context).await,
            Code::InvalidArgument,
            &format!("UnwrapKey, context {what}"),
        );
    }
    // 64 entries is within the limit.
    let max: std::collections::HashMap<String, String> = (0..64)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let d = crate::support::generate(&mut c, "limits", &max).await;
    assert_eq!(
        unwrap(&mut c, &d.wrapped_key, &max)
            .await
            .expect("64 entries")
            .plaintext,
        d.plaintext
    );

    // A description over 1 KiB.
    assert_code(
        c.create_key(pb::CreateKeyRequest {
            name: "described".into(),
            description: "d".repeat(1025),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "description of 1025 bytes",
    );
    let k = c
        .create_key(pb::CreateKeyRequest {
            name: "described".into(),
            description: "d".repeat(1024),
            ..Default::default()
        })
        .await
        .expect("description of 1024 bytes")
        .into_inner();
    assert_eq!(k.description.len(), 1024);

    // A request message far over the server's limit: refused with a clear status (not
    // INTERNAL or UNKNOWN), and the server carries on.
    let r = unwrap(&mut c, &vec![1u8; 256 * 1024], &ctx(&[])).await;
    let s = r.expect_err("oversized UnwrapKey accepted");
    assert!(
        matches!(
            s.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
        ),
        "oversized request: {s:?}"
    );
    let u = unwrap(&mut c, &dk.wrapped_key, &ctx(&[]))
        .await
        .expect("after an oversized request");
    assert_eq!(u.plaintext, dk.plaintext);

    // Version numbers that do not exist, for the admin calls.
    assert_code(
        c.enable_key_version(pb::KeyVersionRequest {
            name: "limits".into(),
            version: 2,
        })
        .await,
        Code::NotFound,
        "enable v2 of a key with one version",
    );
    let k = c
        .get_key(pb::GetKeyRequest {
            name: "limits".into(),
        })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(k.versions.len(), 1);
    assert_eq!(k.primary_version, 1);
}

/// `CreateKeyRequest` as the wire sees it, with a name of raw bytes (a client can send any).
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateKey {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

#[tokio::test]
async fn an_undecodable_message_is_invalid_argument_in_arcas_words() {
    let arca = TestArca::start().await;
    let mut grpc = tonic::client::Grpc::new(arca.channel().await);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(RawCreateKey {
        name: vec![b'k', 0xff, 0xfe],
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", arca.token()).parse().unwrap(),
    );
    let path = http::uri::PathAndQuery::from_static("/arca.v1.KeyService/CreateKey");
    let codec = tonic_prost::ProstCodec::<RawCreateKey, pb::Key>::default();
    let e = grpc.unary(req, path, codec).await.unwrap_err();
    // Not tonic's INTERNAL "failed to decode Protobuf message: CreateKeyRequest.name: …".
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "invalid request message"),
        "{e:?}"
    );
    assert_eq!(
        crate::support::reason(&e),
        Some("MALFORMED_REQUEST"),
        "{e:?}"
    );
    for word in [
        "decode",
        "Protobuf",
        "CreateKeyRequest",
        "invalid string",
        "UTF",
    ] {
        assert!(!e.message().contains(word), "tonic's words: {e:?}");
    }
    // The audit trail records what the caller saw.
    let auditor = crate::support::mint_token(&arca, "auditor:it", &[]).await;
    let recs = arca
        .audit(&auditor)
        .await
        .query_audit(pb::QueryAuditRequest {
            operation: "CreateKey".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(
        recs.iter().map(|r| r.result.as_str()).collect::<Vec<_>>(),
        ["INVALID_ARGUMENT"]
    );
}
