//! Every way a wrapped key can be wrong fails the same way: `INVALID_ARGUMENT` with one
//! fixed message, whatever part was wrong (format, key id, version, IV, ciphertext, tag,
//! length or encryption context). Nothing tells an attacker which part failed.

use std::collections::{BTreeMap, HashMap};

use tokio::task::JoinSet;
use tonic::Code;

use crate::support::{
    create_key, ctx, generate, rotate, unwrap, KeyClient, TestArca, INVALID_WRAPPED,
};

/// Calls in flight at once.
const IN_FLIGHT: usize = 32;

/// Which field of a v1 blob byte `i` belongs to.
fn field(i: usize) -> &'static str {
    match i {
        0 => "format",
        1..=16 => "key id",
        17..=20 => "version",
        21..=32 => "IV",
        33..=64 => "ciphertext",
        _ => "tag",
    }
}

/// A case's description and its outcome: `Ok(())` for an unexpected success,
/// `Err((code, message))` otherwise.
type Outcome = (String, Result<(), (Code, String)>);

/// Unwraps every case concurrently, [`IN_FLIGHT`] at a time.
async fn unwrap_all(
    c: &KeyClient,
    cases: Vec<(String, Vec<u8>, HashMap<String, String>)>,
) -> Vec<Outcome> {
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(cases.len());
    for (what, blob, context) in cases {
        if set.len() >= IN_FLIGHT {
            out.push(set.join_next().await.expect("task").expect("join"));
        }
        let mut c = c.clone();
        set.spawn(async move {
            let r = unwrap(&mut c, &blob, &context)
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_string()));
            (what, r)
        });
    }
    while let Some(r) = set.join_next().await {
        out.push(r.expect("join"));
    }
    out
}

/// Asserts every outcome is INVALID_ARGUMENT with the one message.
fn assert_all_invalid(outcomes: &[Outcome]) {
    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (what, r) in outcomes {
        match r {
            Ok(()) => wrong.push(format!("{what}: unwrapped successfully")),
            Err((code, msg)) => {
                *messages.entry(msg.clone()).or_default() += 1;
                if *code != Code::InvalidArgument {
                    wrong.push(format!("{what}: {code:?} {msg:?}"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} tampered wrapped keys were not INVALID_ARGUMENT:\n{}",
        wrong.len(),
        outcomes.len(),
        wrong.join("\n")
    );
    assert_eq!(
        messages.len(),
        1,
        "the error message differs between cases (it tells which part failed): {messages:?}"
    );
    assert_eq!(
        messages.keys().next().map(String::as_str),
        Some(INVALID_WRAPPED),
        "the one message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bit_flip_truncation_and_extension_is_one_invalid_argument() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "tamper").await;
    let context = ctx(&[("tenant", "t-1"), ("record", "42")]);
    let dk = generate(&mut c, "tamper", &context).await;
    let blob = dk.wrapped_key.clone();
    assert_eq!(blob.len(), 81);
    // Versions 2 and 3 exist too, so some flipped version numbers (1 -> 3) name a real,
    // enabled version: those must fail authentication, not merely lookup.
    rotate(&mut c, "tamper").await;
    rotate(&mut c, "tamper").await;
    // A second key, so that the server has more than one key id to confuse.
    create_key(&mut c, "tamper-other").await;

    let mut cases = Vec::new();
    for i in 0..blob.len() {
        for bit in 0..8 {
            let mut b = blob.clone();
            b[i] ^= 1 << bit;
            cases.push((
                format!("byte {i} ({}) bit {bit} flipped", field(i)),
                b,
                context.clone(),
            ));
        }
    }
    for n in 0..blob.len() {
        cases.push((
            format!("truncated to {n} bytes"),
            blob[..n].to_vec(),
            context.clone(),
        ));
    }
    for extra in [0x00u8, 0x01, 0xff] {
        let mut b = blob.clone();
        b.push(extra);
        cases.push((format!("byte {extra:#04x} appended"), b, context.clone()));
    }
    let mut doubled = blob.clone();
    doubled.extend_from_slice(&blob);
    cases.push(("blob repeated twice".into(), doubled, context.clone()));
    assert_eq!(cases.len(), 81 * 8 + 81 + 4);

    let outcomes = unwrap_all(&c, cases).await;
    assert_all_invalid(&outcomes);

    // The original still unwraps: the failures above were about the tampering.
    let u = unwrap(&mut c, &blob, &context)
        .await
        .expect("untampered blob");
    assert_eq!(u.plaintext, dk.plaintext);
}

#[tokio::test]
async fn a_changed_missing_or_extra_context_entry_is_invalid_argument() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "ctx").await;
    let context = ctx(&[("tenant", "t-1"), ("record", "42")]);
    let dk = generate(&mut c, "ctx", &context).await;
    let no_ctx = generate(&mut c, "ctx", &ctx(&[])).await;

    let b = dk.wrapped_key.clone();
    let cases = vec![
        (
            "value changed",
            b.clone(),
            ctx(&[("tenant", "t-2"), ("record", "42")]),
        ),
        (
            "value case changed",
            b.clone(),
            ctx(&[("tenant", "T-1"), ("record", "42")]),
        ),
        (
            "value emptied",
            b.clone(),
            ctx(&[("tenant", ""), ("record", "42")]),
        ),
        (
            "key renamed",
            b.clone(),
            ctx(&[("tenant2", "t-1"), ("record", "42")]),
        ),
        (
            "key and value swapped",
            b.clone(),
            ctx(&[("t-1", "tenant"), ("record", "42")]),
        ),
        ("entry missing", b.clone(), ctx(&[("tenant", "t-1")])),
        ("other entry missing", b.clone(), ctx(&[("record", "42")])),
        ("no context", b.clone(), ctx(&[])),
        (
            "extra entry",
            b.clone(),
            ctx(&[("tenant", "t-1"), ("record", "42"), ("x", "y")]),
        ),
        (
            "extra empty entry",
            b.clone(),
            ctx(&[("tenant", "t-1"), ("record", "42"), ("z", "")]),
        ),
        (
            "boundary moved between key and value",
            b.clone(),
            ctx(&[("tenan", "tt-1"), ("record", "42")]),
        ),
        (
            "context added to a blob made without one",
            no_ctx.wrapped_key.clone(),
            ctx(&[("tenant", "t-1")]),
        ),
    ];
    let cases = cases
        .into_iter()
        .map(|(w, b, c)| (w.to_string(), b, c))
        .collect();
    let outcomes = unwrap_all(&c, cases).await;
    assert_all_invalid(&outcomes);

    // The right contexts still work.
    let u = unwrap(&mut c, &b, &context).await.expect("right context");
    assert_eq!(u.plaintext, dk.plaintext);
    let u = unwrap(&mut c, &no_ctx.wrapped_key, &ctx(&[]))
        .await
        .expect("empty context");
    assert_eq!(u.plaintext, no_ctx.plaintext);
}

#[tokio::test]
async fn a_blob_moved_to_another_key_or_version_is_invalid_argument() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    let a = create_key(&mut c, "key-a").await;
    let b = create_key(&mut c, "key-b").await;
    let context = ctx(&[("tenant", "t-1")]);
    let dk = generate(&mut c, "key-a", &context).await;
    rotate(&mut c, "key-a").await;
    let dk_v2 = generate(&mut c, "key-a", &context).await;
    let blob = dk.wrapped_key.clone();
    let id_b = crate::support::uuid_bytes(&b.id);
    assert_eq!(blob[1..17], crate::support::uuid_bytes(&a.id));

    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut x = blob.clone();
        f(&mut x);
        x
    };
    // A blob from another server: same layout, a key id this server never saw.
    let other = TestArca::start().await;
    let mut oc = other.client().await;
    create_key(&mut oc, "key-a").await;
    let foreign = generate(&mut oc, "key-a", &context).await.wrapped_key;

    let cases = vec![
        (
            "key id of another key",
            with(&|x| x[1..17].copy_from_slice(&id_b)),
        ),
        (
            "version 2 of the same key",
            with(&|x| x[17..21].copy_from_slice(&2u32.to_be_bytes())),
        ),
        (
            "version 0",
            with(&|x| x[17..21].copy_from_slice(&0u32.to_be_bytes())),
        ),
        (
            "version u32::MAX",
            with(&|x| x[17..21].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        ("format 0x02", with(&|x| x[0] = 0x02)),
        ("format 0x00", with(&|x| x[0] = 0x00)),
        (
            "IV of another blob",
            with(&|x| x[21..33].copy_from_slice(&dk_v2.wrapped_key[21..33])),
        ),
        ("all-zero IV", with(&|x| x[21..33].fill(0))),
        (
            "ciphertext of another blob",
            with(&|x| x[33..65].copy_from_slice(&dk_v2.wrapped_key[33..65])),
        ),
        ("tag zeroed", with(&|x| x[65..81].fill(0))),
        ("header of a v2 blob", {
            let mut x = dk_v2.wrapped_key[..21].to_vec();
            x.extend_from_slice(&blob[21..]);
            x
        }),
        ("a blob from another server", foreign),
        ("all zeroes", vec![0u8; 81]),
        ("empty", Vec::new()),
    ];
    let cases = cases
        .into_iter()
        .map(|(w, b)| (w.to_string(), b, context.clone()))
        .collect();
    let outcomes = unwrap_all(&c, cases).await;
    assert_all_invalid(&outcomes);
    // Rewrap refuses the same way.
    let mut bad = blob.clone();
    bad[1..17].copy_from_slice(&id_b);
    let s = crate::support::assert_code(
        c.rewrap_key(arca::grpc::pb::RewrapKeyRequest {
            wrapped_key: bad,
            context: context.clone(),
        })
        .await,
        Code::InvalidArgument,
        "rewrap of a moved blob",
    );
    assert_eq!(s.message(), INVALID_WRAPPED);
}
