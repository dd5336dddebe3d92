//! Key lifecycle: rotation and rewrap, disable and enable, and a restart on the same
//! data dir.

use tonic::Code;

use crate::support::{
    assert_code, create_key, ctx, generate, rotate, unwrap, uuid_bytes, version_state, Db, TestArca,
};
use arca::grpc::pb;

fn version_in(blob: &[u8]) -> u32 {
    u32::from_be_bytes(blob[17..21].try_into().expect("4 bytes"))
}

on_both_backends!(
    #[tokio::test]
    rotation_wraps_under_v2_keeps_v1_unwrapping_and_rewrap_moves_blobs
);

async fn rotation_wraps_under_v2_keeps_v1_unwrapping_and_rewrap_moves_blobs(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    let key = create_key(&mut c, "rotating").await;
    let context = ctx(&[("tenant", "t-9")]);
    let old = generate(&mut c, "rotating", &context).await;
    assert_eq!(old.key_version, 1);
    let old_wrapped = c
        .wrap_key(pb::WrapKeyRequest {
            key_name: "rotating".into(),
            plaintext: vec![7u8; 24],
            context: context.clone(),
        })
        .await
        .expect("WrapKey v1")
        .into_inner();
    assert_eq!(old_wrapped.key_version, 1);

    let rotated = rotate(&mut c, "rotating").await;
    assert_eq!(rotated.primary_version, 2);
    assert_eq!(rotated.id, key.id, "rotation changed the key id");
    assert_eq!(rotated.versions.len(), 2);
    assert_eq!(version_state(&rotated, 1), pb::KeyVersionState::Enabled);
    assert_eq!(version_state(&rotated, 2), pb::KeyVersionState::Enabled);
    let got = c
        .get_key(pb::GetKeyRequest {
            name: "rotating".into(),
        })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(got.primary_version, 2);

    // New wraps carry v2.
    let new = generate(&mut c, "rotating", &context).await;
    assert_eq!(new.key_version, 2);
    assert_eq!(version_in(&new.wrapped_key), 2);
    assert_eq!(new.wrapped_key[1..17], uuid_bytes(&key.id));
    let new_wrapped = c
        .wrap_key(pb::WrapKeyRequest {
            key_name: "rotating".into(),
            plaintext: vec![9u8; 40],
            context: context.clone(),
        })
        .await
        .expect("WrapKey v2")
        .into_inner();
    assert_eq!(new_wrapped.key_version, 2);
    assert_eq!(version_in(&new_wrapped.wrapped_key), 2);
    let u = unwrap(&mut c, &new.wrapped_key, &context)
        .await
        .expect("unwrap v2");
    assert_eq!((u.plaintext, u.key_version), (new.plaintext.clone(), 2));

    // v1 blobs still unwrap.
    let u = unwrap(&mut c, &old.wrapped_key, &context)
        .await
        .expect("unwrap v1 after rotation");
    assert_eq!((u.plaintext, u.key_version), (old.plaintext.clone(), 1));
    let u = unwrap(&mut c, &old_wrapped.wrapped_key, &context)
        .await
        .expect("unwrap v1 WrapKey");
    assert_eq!(u.plaintext, vec![7u8; 24]);

    // RewrapKey moves a v1 blob to v2; the result unwraps to the same key.
    let rw = c
        .rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: old.wrapped_key.clone(),
            context: context.clone(),
        })
        .await
        .expect("RewrapKey")
        .into_inner();
    assert_eq!(rw.key_version, 2);
    assert_eq!(rw.key_name, "rotating");
    assert_eq!(version_in(&rw.wrapped_key), 2);
    assert_eq!(rw.wrapped_key[1..17], uuid_bytes(&key.id));
    assert_ne!(rw.wrapped_key, old.wrapped_key);
    let u = unwrap(&mut c, &rw.wrapped_key, &context)
        .await
        .expect("unwrap rewrapped");
    assert_eq!((u.plaintext, u.key_version), (old.plaintext.clone(), 2));
    let rw2 = c
        .rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: old_wrapped.wrapped_key.clone(),
            context: context.clone(),
        })
        .await
        .expect("RewrapKey of WrapKey output")
        .into_inner();
    let u = unwrap(&mut c, &rw2.wrapped_key, &context)
        .await
        .expect("unwrap rewrapped 2");
    assert_eq!(u.plaintext, vec![7u8; 24]);

    // Rewrap keeps the context binding: the wrong context is refused, and the rewrapped
    // blob does not unwrap under another context either.
    let s = assert_code(
        c.rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: old.wrapped_key.clone(),
            context: ctx(&[("tenant", "other")]),
        })
        .await,
        Code::InvalidArgument,
        "RewrapKey with the wrong context",
    );
    assert_eq!(s.message(), crate::support::INVALID_WRAPPED);
    assert_code(
        unwrap(&mut c, &rw.wrapped_key, &ctx(&[])).await,
        Code::InvalidArgument,
        "rewrapped blob under another context",
    );

    // A third rotation: v3 primary, v1 and v2 blobs still unwrap, and rewrap goes to v3.
    let r3 = rotate(&mut c, "rotating").await;
    assert_eq!(r3.primary_version, 3);
    for (blob, pt) in [
        (&old.wrapped_key, &old.plaintext),
        (&new.wrapped_key, &new.plaintext),
    ] {
        let u = unwrap(&mut c, blob, &context)
            .await
            .expect("unwrap after 2nd rotation");
        assert_eq!(&u.plaintext, pt);
    }
    let rw3 = c
        .rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: new.wrapped_key.clone(),
            context: context.clone(),
        })
        .await
        .expect("RewrapKey v2 -> v3")
        .into_inner();
    assert_eq!(rw3.key_version, 3);
    let u = unwrap(&mut c, &rw3.wrapped_key, &context)
        .await
        .expect("unwrap v3");
    assert_eq!(u.plaintext, new.plaintext);
}

on_both_backends!(
    #[tokio::test]
    a_disabled_version_refuses_unwrap_and_enabling_restores_it
);

async fn a_disabled_version_refuses_unwrap_and_enabling_restores_it(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "suspend").await;
    let context = ctx(&[("patient", "p-1")]);
    let v1 = generate(&mut c, "suspend", &context).await;
    rotate(&mut c, "suspend").await;
    let v2 = generate(&mut c, "suspend", &context).await;
    assert_eq!(v2.key_version, 2);

    let admin = c.clone();
    let set = move |version: u32, enable: bool| {
        let mut c = admin.clone();
        async move {
            let req = pb::KeyVersionRequest {
                name: "suspend".into(),
                version,
            };
            let r = if enable {
                c.enable_key_version(req).await
            } else {
                c.disable_key_version(req).await
            };
            r.expect("Disable/EnableKeyVersion")
                .into_inner()
                .key
                .expect("key in AdminResponse")
        }
    };

    // Disable v1: its blobs are refused with FAILED_PRECONDITION, at once.
    let k = set(1, false).await;
    assert_eq!(version_state(&k, 1), pb::KeyVersionState::Disabled);
    assert_eq!(version_state(&k, 2), pb::KeyVersionState::Enabled);
    assert_code(
        unwrap(&mut c, &v1.wrapped_key, &context).await,
        Code::FailedPrecondition,
        "unwrap under disabled v1",
    );
    assert_code(
        c.rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: v1.wrapped_key.clone(),
            context: context.clone(),
        })
        .await,
        Code::FailedPrecondition,
        "rewrap from disabled v1",
    );
    // The other version is unaffected, and the primary still wraps.
    let u = unwrap(&mut c, &v2.wrapped_key, &context)
        .await
        .expect("v2 while v1 disabled");
    assert_eq!(u.plaintext, v2.plaintext);
    generate(&mut c, "suspend", &context).await;
    let got = c
        .get_key(pb::GetKeyRequest {
            name: "suspend".into(),
        })
        .await
        .expect("GetKey")
        .into_inner();
    assert_eq!(version_state(&got, 1), pb::KeyVersionState::Disabled);

    // Disabling again is harmless; enabling restores unwrap.
    set(1, false).await;
    let k = set(1, true).await;
    assert_eq!(version_state(&k, 1), pb::KeyVersionState::Enabled);
    let u = unwrap(&mut c, &v1.wrapped_key, &context)
        .await
        .expect("v1 after enable");
    assert_eq!(u.plaintext, v1.plaintext);

    // Disabling the primary stops wrapping and unwrapping under it; enabling restores both.
    set(2, false).await;
    assert_code(
        unwrap(&mut c, &v2.wrapped_key, &context).await,
        Code::FailedPrecondition,
        "unwrap under disabled primary",
    );
    assert_code(
        c.generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "suspend".into(),
            context: context.clone(),
            without_plaintext: false,
        })
        .await,
        Code::FailedPrecondition,
        "generate under a disabled primary",
    );
    assert_code(
        c.wrap_key(pb::WrapKeyRequest {
            key_name: "suspend".into(),
            plaintext: vec![1; 32],
            context: context.clone(),
        })
        .await,
        Code::FailedPrecondition,
        "wrap under a disabled primary",
    );
    set(2, true).await;
    let u = unwrap(&mut c, &v2.wrapped_key, &context)
        .await
        .expect("v2 after enable");
    assert_eq!(u.plaintext, v2.plaintext);
    generate(&mut c, "suspend", &context).await;

    // Versions that do not exist.
    for v in [0u32, 3, 99] {
        let r = c
            .disable_key_version(pb::KeyVersionRequest {
                name: "suspend".into(),
                version: v,
            })
            .await;
        assert_code(r, Code::NotFound, &format!("disable version {v}"));
    }
}

on_both_backends!(
    #[tokio::test]
    restart_on_the_same_data_dir_keeps_keys_tokens_and_blobs
);

async fn restart_on_the_same_data_dir_keeps_keys_tokens_and_blobs(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    let key = create_key(&mut c, "durable").await;
    create_key(&mut c, "durable-2").await;
    let context = ctx(&[("tenant", "t-1")]);
    let v1 = generate(&mut c, "durable", &context).await;
    rotate(&mut c, "durable").await;
    let v2 = generate(&mut c, "durable", &context).await;
    c.disable_key_version(pb::KeyVersionRequest {
        name: "durable-2".into(),
        version: 1,
    })
    .await
    .expect("disable");
    let token_before = arca.token().to_string();
    drop(c);

    arca.restart().await; // asserts a clean exit 0 on SIGTERM
    assert_eq!(
        arca.token(),
        token_before,
        "dev token changed across restart"
    );
    let mut c = arca.client().await;

    let k = c
        .get_key(pb::GetKeyRequest {
            name: "durable".into(),
        })
        .await
        .expect("GetKey after restart")
        .into_inner();
    assert_eq!(k.id, key.id);
    assert_eq!(k.primary_version, 2);
    assert_eq!(k.versions.len(), 2);
    let k2 = c
        .get_key(pb::GetKeyRequest {
            name: "durable-2".into(),
        })
        .await
        .expect("GetKey durable-2")
        .into_inner();
    assert_eq!(
        version_state(&k2, 1),
        pb::KeyVersionState::Disabled,
        "state lost on restart"
    );

    for (blob, pt, v) in [
        (&v1.wrapped_key, &v1.plaintext, 1),
        (&v2.wrapped_key, &v2.plaintext, 2),
    ] {
        let u = unwrap(&mut c, blob, &context)
            .await
            .expect("old blob after restart");
        assert_eq!(&u.plaintext, pt);
        assert_eq!(u.key_version, v);
    }
    let fresh = generate(&mut c, "durable", &context).await;
    assert_eq!(fresh.key_version, 2);
    let u = unwrap(&mut c, &fresh.wrapped_key, &context)
        .await
        .expect("new blob");
    assert_eq!(u.plaintext, fresh.plaintext);
    assert_code(
        c.create_key(pb::CreateKeyRequest {
            name: "durable".into(),
            description: String::new(),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
        "name reuse after restart",
    );

    // And once more, to be sure the second start did not change anything either.
    drop(c);
    arca.restart().await;
    let mut c = arca.client().await;
    let u = unwrap(&mut c, &v1.wrapped_key, &context)
        .await
        .expect("v1 after 2nd restart");
    assert_eq!(u.plaintext, v1.plaintext);
}

fn wrap_count(key: &pb::Key, version: u32) -> u64 {
    key.versions
        .iter()
        .find(|v| v.version == version)
        .unwrap_or_else(|| panic!("no version {version}"))
        .wrap_count
}

on_both_backends!(
    #[tokio::test]
    the_stored_wrap_count_is_never_below_the_wraps_made
);

async fn the_stored_wrap_count_is_never_below_the_wraps_made(db: Db) {
    // Small reservation blocks, so that the count is refilled many times.
    const BLOCK: u64 = 4;
    let mut arca = TestArca::builder()
        .backend(db)
        .arg("--wrap-reservation")
        .arg(BLOCK.to_string())
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "counted").await;
    let context = ctx(&[]);

    let get = |c: &mut crate::support::KeyClient| {
        let mut c = c.clone();
        async move {
            c.get_key(pb::GetKeyRequest {
                name: "counted".into(),
            })
            .await
            .expect("GetKey")
            .into_inner()
        }
    };
    let fresh = get(&mut c).await;
    assert_eq!(wrap_count(&fresh, 1), 0, "no wraps yet");

    // 30 wraps, 10 callers at a time, mixing GenerateDataKey and WrapKey.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let mut c = c.clone();
        let context = context.clone();
        set.spawn(async move {
            for n in 0..3 {
                if (i + n) % 2 == 0 {
                    generate(&mut c, "counted", &context).await;
                } else {
                    c.wrap_key(pb::WrapKeyRequest {
                        key_name: "counted".into(),
                        plaintext: vec![3; 32],
                        context: context.clone(),
                    })
                    .await
                    .expect("WrapKey");
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("caller");
    }
    let made = 30u64;
    let k = get(&mut c).await;
    let count = wrap_count(&k, 1);
    assert!(count >= made, "wrap_count {count} < {made} wraps made");
    assert!(
        count <= made + 3 * BLOCK,
        "wrap_count {count} far above {made} wraps made"
    );

    // Rewraps count against the target version; unwraps count nothing.
    let dk = generate(&mut c, "counted", &context).await;
    rotate(&mut c, "counted").await;
    for _ in 0..5 {
        c.rewrap_key(pb::RewrapKeyRequest {
            wrapped_key: dk.wrapped_key.clone(),
            context: context.clone(),
        })
        .await
        .expect("RewrapKey");
        unwrap(&mut c, &dk.wrapped_key, &context)
            .await
            .expect("unwrap");
    }
    let k = get(&mut c).await;
    assert!(
        wrap_count(&k, 2) >= 5,
        "rewraps not counted: {}",
        wrap_count(&k, 2)
    );
    let v1_count = wrap_count(&k, 1);
    assert!(v1_count > made, "v1 count {v1_count}");

    // The count survives a restart, and wraps after it are counted on top.
    drop(c);
    arca.restart().await;
    let mut c = arca.client().await;
    let k = get(&mut c).await;
    assert!(
        wrap_count(&k, 1) >= v1_count,
        "v1 count went down across restart"
    );
    let before = wrap_count(&k, 2);
    for _ in 0..3 {
        generate(&mut c, "counted", &context).await;
    }
    let k = get(&mut c).await;
    assert!(
        wrap_count(&k, 2) >= before + 3,
        "wraps after restart not counted on top: {} -> {}",
        before,
        wrap_count(&k, 2)
    );
}

on_both_backends!(
    #[tokio::test]
    concurrent_rotations_each_make_one_new_version
);

async fn concurrent_rotations_each_make_one_new_version(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "spun").await;
    let context = ctx(&[]);
    let v1 = generate(&mut c, "spun", &context).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let mut c = c.clone();
        set.spawn(async move {
            c.rotate_key(pb::RotateKeyRequest {
                name: "spun".into(),
            })
            .await
            .map(|r| r.into_inner().key.map(|k| k.primary_version))
            .map_err(|s| s.code())
        });
    }
    let mut primaries = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.expect("join") {
            Ok(Some(p)) => primaries.push(p),
            Ok(None) => panic!("RotateKey answered without a key"),
            // A lost race may be reported as ABORTED (retry); never anything else.
            Err(code) => assert_eq!(code, Code::Aborted, "concurrent RotateKey"),
        }
    }
    primaries.sort_unstable();
    let k = c
        .get_key(pb::GetKeyRequest {
            name: "spun".into(),
        })
        .await
        .expect("GetKey")
        .into_inner();
    let versions: Vec<u32> = k.versions.iter().map(|v| v.version).collect();
    let expected: Vec<u32> = (1..=(1 + primaries.len() as u32)).collect();
    assert_eq!(
        versions, expected,
        "versions are 1..=n without gaps or duplicates"
    );
    assert_eq!(
        primaries,
        expected[1..].to_vec(),
        "each rotation made its own version"
    );
    assert_eq!(k.primary_version, *expected.last().expect("versions"));
    let u = unwrap(&mut c, &v1.wrapped_key, &context)
        .await
        .expect("v1 after rotations");
    assert_eq!(u.plaintext, v1.plaintext);
    let dk = generate(&mut c, "spun", &context).await;
    assert_eq!(dk.key_version, k.primary_version);
}
