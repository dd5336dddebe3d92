//! GenerateDataKey and UnwrapKey: the round trip, the wrapped-key layout, and
//! `without_plaintext`.

use crate::support::{create_key, ctx, generate, unwrap, uuid_bytes, Db, TestArca};
use arca::grpc::pb;

on_both_backends!(
    #[tokio::test]
    generate_then_unwrap_returns_the_same_32_bytes
);

async fn generate_then_unwrap_returns_the_same_32_bytes(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    let key = create_key(&mut c, "patients-db").await;
    let context = ctx(&[("tenant", "clinic-7"), ("table", "patients")]);

    let dk = generate(&mut c, "patients-db", &context).await;
    assert_eq!(dk.plaintext.len(), 32, "data key length");
    assert_ne!(dk.plaintext, vec![0u8; 32], "data key is all zeroes");
    assert_eq!(dk.key_name, "patients-db");
    assert_eq!(dk.key_version, 1);

    // Format v1: 0x01 | key id | version BE | IV (12) | ciphertext (32) || tag (16).
    let w = &dk.wrapped_key;
    assert_eq!(w.len(), 1 + 16 + 4 + 12 + 32 + 16, "wrapped key length");
    assert_eq!(w[0], 0x01, "format byte");
    assert_eq!(w[1..17], uuid_bytes(&key.id), "key id in the blob");
    assert_eq!(w[17..21], 1u32.to_be_bytes(), "version in the blob");
    assert!(
        !w.windows(32).any(|win| win == dk.plaintext.as_slice()),
        "the wrapped key contains the plaintext"
    );

    let u = unwrap(&mut c, w, &context).await.expect("UnwrapKey");
    assert_eq!(u.plaintext, dk.plaintext, "unwrap returned other bytes");
    assert_eq!(u.key_name, "patients-db");
    assert_eq!(u.key_version, 1);

    // A second data key is a different key under a different IV.
    let dk2 = generate(&mut c, "patients-db", &context).await;
    assert_ne!(dk2.plaintext, dk.plaintext, "two data keys are equal");
    assert_ne!(dk2.wrapped_key[21..33], w[21..33], "IV reused");
    let u2 = unwrap(&mut c, &dk2.wrapped_key, &context)
        .await
        .expect("UnwrapKey 2");
    assert_eq!(u2.plaintext, dk2.plaintext);

    // The empty context is a context like any other.
    let empty = ctx(&[]);
    let dk3 = generate(&mut c, "patients-db", &empty).await;
    let u3 = unwrap(&mut c, &dk3.wrapped_key, &empty)
        .await
        .expect("UnwrapKey 3");
    assert_eq!(u3.plaintext, dk3.plaintext);
}

on_both_backends!(
    #[tokio::test]
    without_plaintext_returns_only_a_wrapped_key_that_unwraps
);

async fn without_plaintext_returns_only_a_wrapped_key_that_unwraps(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "billing/ssn").await;
    let context = ctx(&[("tenant", "t-1")]);

    let r = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "billing/ssn".into(),
            context: context.clone(),
            without_plaintext: true,
        })
        .await
        .expect("GenerateDataKey without_plaintext")
        .into_inner();
    assert!(
        r.plaintext.is_empty(),
        "plaintext returned although not asked for"
    );
    assert_eq!(r.wrapped_key.len(), 81);
    assert_eq!(r.key_name, "billing/ssn");
    assert_eq!(r.key_version, 1);

    let u = unwrap(&mut c, &r.wrapped_key, &context)
        .await
        .expect("UnwrapKey of a without_plaintext data key");
    assert_eq!(u.plaintext.len(), 32);
    assert_ne!(u.plaintext, vec![0u8; 32]);
}
