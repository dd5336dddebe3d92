//! Two nodes on one PostgreSQL database and one SoftHSM token directory (DESIGN §7): keys
//! made on one node work on the other, a state change on one node takes effect on the
//! other within a second, and rotations and wrap reservations from both nodes at once
//! stay consistent.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::{create_key, ctx, generate, postgres_url, unwrap, Db, KeyClient, TestArca};
use arca::grpc::pb;

/// How long a change on one node may take to reach the other (DESIGN §7).
const PROPAGATION: Duration = Duration::from_secs(1);

async fn get_key(c: &mut KeyClient, name: &str) -> pb::Key {
    c.get_key(pb::GetKeyRequest { name: name.into() })
        .await
        .unwrap_or_else(|s| panic!("GetKey {name}: {s:?}"))
        .into_inner()
}

async fn set_enabled(c: &mut KeyClient, name: &str, version: u32, enabled: bool) {
    let req = pb::KeyVersionRequest {
        name: name.into(),
        version,
    };
    let r = if enabled {
        c.enable_key_version(req).await
    } else {
        c.disable_key_version(req).await
    };
    r.unwrap_or_else(|s| panic!("enable={enabled} {name} v{version}: {s:?}"));
}

/// Polls `probe` until it returns true; returns how long that took, or panics after
/// `PROPAGATION` plus a little slack for the polling itself.
async fn within_propagation<F, Fut>(what: &str, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            let took = start.elapsed();
            assert!(took <= PROPAGATION, "{what} took {took:?}");
            return took;
        }
        assert!(
            start.elapsed() <= PROPAGATION,
            "{what}: not seen after {PROPAGATION:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_keys_and_see_each_others_changes_within_a_second() {
    if postgres_url("cluster::two_nodes_share_keys_and_see_each_others_changes_within_a_second")
        .is_none()
    {
        return;
    }
    let a = TestArca::start_on(Db::Postgres).await;
    let b = a.second_node().await;
    assert_ne!(a.addr(), b.addr());
    assert_eq!(a.token(), b.token(), "the nodes share the dev token");
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let context = ctx(&[("tenant", "t-2")]);

    // A key made on A wraps on A and unwraps on B, and the other way round.
    let key = create_key(&mut ca, "shared").await;
    let dk = generate(&mut ca, "shared", &context).await;
    let u = unwrap(&mut cb, &dk.wrapped_key, &context)
        .await
        .expect("unwrap on B of a data key made on A");
    assert_eq!(u.plaintext, dk.plaintext);
    let kb = get_key(&mut cb, "shared").await;
    assert_eq!(kb.id, key.id);
    create_key(&mut cb, "from-b").await;
    let dkb = generate(&mut cb, "from-b", &context).await;
    let u = unwrap(&mut ca, &dkb.wrapped_key, &context)
        .await
        .expect("unwrap on A of a data key made under a key made on B");
    assert_eq!(u.plaintext, dkb.plaintext);
    // Names are unique across nodes.
    let r = cb
        .create_key(pb::CreateKeyRequest {
            name: "shared".into(),
            description: String::new(),
            ..Default::default()
        })
        .await;
    assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::AlreadyExists);

    // Disable v1 on A: B (which has the key cached) refuses within a second.
    set_enabled(&mut ca, "shared", 1, false).await;
    let took = within_propagation("disable on A reaching B", || {
        let mut cb = cb.clone();
        let (blob, context) = (dk.wrapped_key.clone(), context.clone());
        async move {
            match unwrap(&mut cb, &blob, &context).await {
                Ok(_) => false,
                Err(s) => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    true
                }
            }
        }
    })
    .await;
    eprintln!("disable on A refused on B after {took:?}");
    // Enable on B: A unwraps again within a second.
    set_enabled(&mut cb, "shared", 1, true).await;
    within_propagation("enable on B reaching A", || {
        let mut ca = ca.clone();
        let (blob, context) = (dk.wrapped_key.clone(), context.clone());
        async move { unwrap(&mut ca, &blob, &context).await.is_ok() }
    })
    .await;

    // Rotate on B: A wraps under v2 within a second, and v2 blobs unwrap on both.
    let rotated = cb
        .rotate_key(pb::RotateKeyRequest {
            name: "shared".into(),
        })
        .await
        .expect("RotateKey on B")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(rotated.primary_version, 2);
    within_propagation("rotation on B reaching A", || {
        let mut ca = ca.clone();
        let context = context.clone();
        async move { generate(&mut ca, "shared", &context).await.key_version == 2 }
    })
    .await;
    let v2 = generate(&mut ca, "shared", &context).await;
    assert_eq!(v2.key_version, 2);
    let u = unwrap(&mut cb, &v2.wrapped_key, &context)
        .await
        .expect("v2 made on A unwraps on B");
    assert_eq!(u.plaintext, v2.plaintext);

    // Rotations on both nodes at once: each makes its own version, none is lost or
    // doubled (the loser of a race retries with the next number).
    let mut set = tokio::task::JoinSet::new();
    for i in 0..6 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        set.spawn(async move {
            c.rotate_key(pb::RotateKeyRequest {
                name: "shared".into(),
            })
            .await
            .map(|r| r.into_inner().key.map(|k| k.primary_version))
            .map_err(|s| s.code())
        });
    }
    let mut made = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.expect("join") {
            Ok(Some(v)) => made.push(v),
            Ok(None) => panic!("RotateKey answered without a key"),
            Err(code) => assert_eq!(code, Code::Aborted, "concurrent RotateKey"),
        }
    }
    made.sort_unstable();
    made.dedup();
    let k = get_key(&mut ca, "shared").await;
    let versions: Vec<u32> = k.versions.iter().map(|v| v.version).collect();
    let expected: Vec<u32> = (1..=(2 + made.len() as u32)).collect();
    assert_eq!(versions, expected, "versions without gaps or duplicates");
    assert_eq!(
        made,
        expected[2..].to_vec(),
        "each rotation its own version"
    );

    // Wraps on both nodes are all counted (each node reserves its own blocks).
    let before = get_key(&mut ca, "from-b").await.versions[0].wrap_count;
    for _ in 0..10 {
        generate(&mut ca, "from-b", &context).await;
        generate(&mut cb, "from-b", &context).await;
    }
    let after = get_key(&mut cb, "from-b").await.versions[0].wrap_count;
    assert!(
        after >= before + 20,
        "wrap_count {before} -> {after} after 20 wraps on two nodes"
    );

    // Every blob made so far still unwraps on both nodes.
    for c in [&mut ca, &mut cb] {
        for d in [&dk, &dkb, &v2] {
            let u = unwrap(c, &d.wrapped_key, &context)
                .await
                .expect("old blob on either node");
            assert_eq!(u.plaintext, d.plaintext);
        }
    }
}
