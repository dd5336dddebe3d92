//! Concurrency: many callers at once, not a single error.

use std::time::Instant;

use tokio::task::JoinSet;

use crate::support::{create_key, ctx, generate, unwrap, Db, TestArca};

const CALLERS: usize = 64;
const UNWRAPS_EACH: usize = 50;

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    sixty_four_concurrent_callers_unwrap_without_a_single_error
);

async fn sixty_four_concurrent_callers_unwrap_without_a_single_error(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "busy").await;
    create_key(&mut c, "busy-2").await;

    // Four connections, each shared by 16 callers; each caller has its own data key
    // (half under a second key) and context.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(arca.client().await);
    }
    let mut keys = Vec::new();
    for i in 0..CALLERS {
        let context = ctx(&[("caller", &i.to_string())]);
        let name = if i % 2 == 0 { "busy" } else { "busy-2" };
        let dk = generate(&mut c, name, &context).await;
        keys.push((context, dk));
    }

    let start = Instant::now();
    let mut set = JoinSet::new();
    for (i, (context, dk)) in keys.into_iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        set.spawn(async move {
            let mut errors = Vec::new();
            for n in 0..UNWRAPS_EACH {
                match unwrap(&mut c, &dk.wrapped_key, &context).await {
                    Ok(u) if u.plaintext == dk.plaintext => {}
                    Ok(_) => errors.push(format!("caller {i} call {n}: wrong plaintext")),
                    Err(s) => errors.push(format!(
                        "caller {i} call {n}: {:?} {}",
                        s.code(),
                        s.message()
                    )),
                }
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = set.join_next().await {
        errors.extend(r.expect("caller task"));
    }
    let elapsed = start.elapsed();
    assert!(
        errors.is_empty(),
        "{} of {} unwraps failed:\n{}",
        errors.len(),
        CALLERS * UNWRAPS_EACH,
        errors
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{} unwraps by {CALLERS} callers in {elapsed:?} ({:.0}/s)",
        CALLERS * UNWRAPS_EACH,
        (CALLERS * UNWRAPS_EACH) as f64 / elapsed.as_secs_f64()
    );
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    concurrent_generates_rotations_and_unwraps_stay_consistent
);

async fn concurrent_generates_rotations_and_unwraps_stay_consistent(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "mixed").await;
    let context = ctx(&[("t", "1")]);

    let mut set = JoinSet::new();
    for i in 0..16 {
        let mut c = c.clone();
        let context = context.clone();
        set.spawn(async move {
            let mut made = Vec::new();
            for _ in 0..10 {
                let dk = generate(&mut c, "mixed", &context).await;
                let u = unwrap(&mut c, &dk.wrapped_key, &context)
                    .await
                    .unwrap_or_else(|s| panic!("caller {i}: {s:?}"));
                assert_eq!(u.plaintext, dk.plaintext, "caller {i}");
                made.push(dk);
            }
            made
        });
    }
    // Rotations while the callers run.
    let mut versions = Vec::new();
    for _ in 0..3 {
        versions.push(
            crate::support::rotate(&mut c, "mixed")
                .await
                .primary_version,
        );
    }
    assert_eq!(
        versions,
        vec![2, 3, 4],
        "concurrent-safe rotation numbering"
    );
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("caller"));
    }
    // Every data key made during the rotations still unwraps.
    for dk in &all {
        let u = unwrap(&mut c, &dk.wrapped_key, &context)
            .await
            .expect("unwrap later");
        assert_eq!(u.plaintext, dk.plaintext);
        assert_eq!(u.key_version, dk.key_version);
    }
    assert_eq!(all.len(), 160);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hsm_sessions_serve_concurrent_callers_without_errors() {
    let arca = TestArca::builder()
        .arg("--hsm-sessions")
        .arg("3")
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "pooled").await;
    let context = ctx(&[("pool", "3")]);
    let mut set = JoinSet::new();
    for i in 0..32 {
        let mut c = c.clone();
        let context = context.clone();
        set.spawn(async move {
            let dk = generate(&mut c, "pooled", &context).await;
            for n in 0..20 {
                let u = unwrap(&mut c, &dk.wrapped_key, &context)
                    .await
                    .unwrap_or_else(|s| panic!("caller {i} call {n}: {s:?}"));
                assert_eq!(u.plaintext, dk.plaintext, "caller {i} call {n}");
            }
        });
    }
    // A rotation in the middle: the new version's object reaches every session.
    let k = crate::support::rotate(&mut c, "pooled").await;
    assert_eq!(k.primary_version, 2);
    while let Some(r) = set.join_next().await {
        r.expect("caller");
    }
    for _ in 0..12 {
        let dk = generate(&mut c, "pooled", &context).await;
        assert_eq!(dk.key_version, 2);
        let u = unwrap(&mut c, &dk.wrapped_key, &context)
            .await
            .expect("v2 unwrap");
        assert_eq!(u.plaintext, dk.plaintext);
    }
}
