//! Two nodes on one PostgreSQL database and one SoftHSM token directory (DESIGN §7): keys
//! made on one node work on the other, a state change on one node takes effect on the
//! other within a second, and rotations and wrap reservations from both nodes at once
//! stay consistent.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::database::{psql_query, PrivatePg};
use crate::support::{
    create_key, ctx, generate, get_key, lifecycle_policy, mint_token, postgres_url, reason,
    request_rotation, three_of_five, unsealed, unwrap, version_state, Builder, Db, KeyClient,
    TestArca,
};
use arca::grpc::pb;

/// How long a change on one node may take to reach the other (DESIGN §7).
const PROPAGATION: Duration = Duration::from_secs(1);

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

/// Job options for two-node lifecycle tests: any waiting period from 1 s, passes every
/// 200 ms, and a lease of `lease`.
fn lifecycle_nodes(root: &std::path::Path, lease: &str) -> Builder {
    TestArca::builder()
        .backend(Db::Postgres)
        .fast_jobs(&lifecycle_policy(root, "7d", 1 << 30), lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_and_destroy_on_a_and_revoke_on_b_reach_the_other_node_within_a_second() {
    if postgres_url("cluster::retire_and_destroy").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = lifecycle_nodes(dir.path(), "2s").start().await;
    let b = a.second_node().await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let context = ctx(&[("tenant", "t-9")]);
    create_key(&mut ca, "shred").await;
    let dk = generate(&mut ca, "shred", &context).await;
    // B has v1 cached and unwraps.
    unwrap(&mut cb, &dk.wrapped_key, &context).await.unwrap();
    ca.rotate_key(pb::RotateKeyRequest {
        name: "shred".into(),
    })
    .await
    .unwrap();

    // Retire v1 on A: B refuses within a second, then it is destroyed (by either node)
    // and B still refuses, now as destroyed.
    ca.retire_key_version(pb::RetireKeyVersionRequest {
        name: "shred".into(),
        version: 1,
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    within_propagation("retirement on A reaching B", || {
        let mut cb = cb.clone();
        let (blob, context) = (dk.wrapped_key.clone(), context.clone());
        async move { unwrap(&mut cb, &blob, &context).await.is_err() }
    })
    .await;
    let started = Instant::now();
    loop {
        let k = get_key(&mut ca, "shred").await;
        if version_state(&k, 1) == pb::KeyVersionState::Destroyed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not destroyed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within_propagation("destruction reaching B", || {
        let mut cb = cb.clone();
        let (blob, context) = (dk.wrapped_key.clone(), context.clone());
        async move {
            matches!(unwrap(&mut cb, &blob, &context).await,
                Err(s) if reason(&s) == Some("VERSION_DESTROYED"))
        }
    })
    .await;
    let logs = format!("{}\n{}", a.log_text(), b.log_text());
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("key version destroyed"))
            .count(),
        1,
        "destroyed exactly once across the nodes"
    );

    // A token made and used on A, revoked on B: A refuses it within a second.
    let t = a
        .access(a.token())
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "svc:cluster".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut with_token = a.keys(&t.token).await;
    get_key(&mut with_token, "shred").await;
    b.access(b.token())
        .await
        .revoke_token(pb::RevokeTokenRequest { id: t.id.clone() })
        .await
        .unwrap();
    let took = within_propagation("revocation on B reaching A", || {
        let mut c = with_token.clone();
        async move {
            match c
                .get_key(pb::GetKeyRequest {
                    name: "shred".into(),
                })
                .await
            {
                Ok(_) => false,
                Err(s) => {
                    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                    true
                }
            }
        }
    })
    .await;
    eprintln!("revocation on B refused on A after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_lease_holder_hands_the_jobs_to_the_other_node_after_the_lease() {
    let Some(_) = postgres_url("cluster::kill_9_of_the_lease_holder") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = lifecycle_nodes(dir.path(), "3s").start().await;
    let url = a.postgres().unwrap().url().to_string();
    // A starts first and takes the jobs' lease; B starts after and waits for it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = a.second_node().await;
    let mut cb = b.client().await;
    create_key(&mut cb, "handover").await;
    cb.rotate_key(pb::RotateKeyRequest {
        name: "handover".into(),
    })
    .await
    .unwrap();
    let holder = |url: &str| {
        psql_query(
            url,
            "SELECT holder FROM job_leases WHERE name = 'lifecycle'",
        )
        .unwrap()
    };
    let first = holder(&url);
    assert!(!first.is_empty(), "no lease holder");
    assert!(
        a.log_text().contains(&first),
        "A ({first}) should hold the lease: it started first"
    );
    // Kill A (holding the lease) and retire v1 through B with a 1 s waiting period: the
    // destruction waits for A's lease to run out (3 s), then B does it.
    a.kill();
    let killed = Instant::now();
    cb.retire_key_version(pb::RetireKeyVersionRequest {
        name: "handover".into(),
        version: 1,
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    let destroyed_after = loop {
        let k = get_key(&mut cb, "handover").await;
        if version_state(&k, 1) == pb::KeyVersionState::Destroyed {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "B never took the jobs over:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        destroyed_after >= Duration::from_millis(2000),
        "destroyed {destroyed_after:?} after the kill: before A's lease could have ended"
    );
    assert_ne!(holder(&url), first, "B holds the lease now");
    assert!(b.log_text().contains("key version destroyed"));
    eprintln!("jobs handed over; destruction {destroyed_after:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_on_two_nodes_with_the_last_two_at_once_run_the_operation_once() {
    if postgres_url("cluster::approvals_on_two_nodes").is_none() {
        return;
    }
    let (a, cs) = unsealed(three_of_five(Db::Postgres)).await;
    let b = a.second_node().await;
    // Sealing is per node: B needs its own unseal.
    cs.unseal(&b, &[3, 4, 5]).await;
    let req = request_rotation(&a).await;
    // Custodian 4 approves on A, custodian 5 on B: still pending.
    assert_eq!(cs.approve(&a, 4, &req).await.unwrap().state, "PENDING");
    assert_eq!(cs.approve(&b, 5, &req).await.unwrap().state, "PENDING");
    // Custodians 1 (on A) and 2 (on B) at once: both would be the third vote.
    let (r1, r2) = tokio::join!(cs.approve(&a, 1, &req), cs.approve(&b, 2, &req));
    let results = [r1, r2];
    // The vote that reached the threshold executed the rotation; the other either found
    // it executed (FAILED_PRECONDITION) or arrived while it was being carried out and
    // was answered with the executed request. Either way three votes are on record.
    for r in &results {
        match r {
            Ok(r) => {
                assert_eq!(r.state, "EXECUTED", "{r:?}");
                assert_eq!(r.approvals.len(), 3, "{r:?}");
            }
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        }
    }
    assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
    // One new version, seen the same on both nodes.
    for n in [&a, &b] {
        let k = n.key("phi").await;
        let versions: Vec<u32> = k.versions.iter().map(|v| v.version).collect();
        assert_eq!(versions, vec![1, 2], "the rotation ran once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_times_8_callers_rotating_one_key_50_times_make_50_consecutive_versions() {
    if postgres_url("cluster::two_nodes_times_8_callers_rotating").is_none() {
        return;
    }
    let a = TestArca::start_on(Db::Postgres).await;
    let b = a.second_node().await;
    let mut ca = a.client().await;
    let cb = b.client().await;
    create_key(&mut ca, "spun").await;
    // 16 callers (8 per node) take turns from one budget of 50 rotations; every
    // RotateKey must succeed (a lost race is retried inside the server).
    let left = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(50));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let left = std::sync::Arc::clone(&left);
        set.spawn(async move {
            let mut made = Vec::new();
            while left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                let k = c
                    .rotate_key(pb::RotateKeyRequest {
                        name: "spun".into(),
                    })
                    .await
                    .expect("RotateKey under concurrency")
                    .into_inner()
                    .key
                    .expect("the rotated key");
                made.push(k.primary_version);
            }
            made
        });
    }
    let mut made = Vec::new();
    while let Some(r) = set.join_next().await {
        made.extend(r.expect("caller"));
    }
    made.sort_unstable();
    assert_eq!(
        made,
        (2..=51).collect::<Vec<u32>>(),
        "each rotation its own version"
    );
    for c in [&mut ca, &mut cb.clone()] {
        let k = get_key(c, "spun").await;
        let versions: Vec<u32> = k.versions.iter().map(|v| v.version).collect();
        assert_eq!(
            versions,
            (1..=51).collect::<Vec<u32>>(),
            "no gap, no duplicate"
        );
        assert_eq!(k.primary_version, 51);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_64_callers_fails_cleanly_and_recovers_without_restarting_arca() {
    if postgres_url("cluster::postgres_restarted").is_none() {
        return;
    }
    let pg = PrivatePg::start();
    let mut arca = TestArca::builder()
        .arg("--database")
        .arg(pg.url())
        .start()
        .await;
    let pid_before = arca.is_running();
    let mut c = arca.client().await;
    create_key(&mut c, "under-load").await;
    let context = ctx(&[("tenant", "t-1")]);
    let mut blobs = Vec::new();
    for _ in 0..64 {
        blobs.push(generate(&mut c, "under-load", &context).await);
    }

    // 64 callers unwrap in a loop; each outcome is recorded with its time.
    let t0 = Instant::now();
    let run_for = Duration::from_secs(9);
    let mut set = tokio::task::JoinSet::new();
    for dk in blobs {
        let mut c = c.clone();
        let context = context.clone();
        set.spawn(async move {
            let mut seen = Vec::new();
            while t0.elapsed() < run_for {
                let r = unwrap(&mut c, &dk.wrapped_key, &context).await;
                let at = t0.elapsed();
                match r {
                    Ok(u) => {
                        assert_eq!(u.plaintext, dk.plaintext);
                        seen.push((at, None));
                    }
                    Err(s) => {
                        seen.push((at, Some(s.code())));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            seen
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = t0.elapsed();
    pg.stop().await;
    let down_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.resume().await;
    let up_at = t0.elapsed();

    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        outcomes.extend(r.expect("caller"));
    }
    let errors: Vec<_> = outcomes.iter().filter(|(_, e)| e.is_some()).collect();
    let ok_before = outcomes
        .iter()
        .filter(|(at, e)| e.is_none() && *at < stopped_at)
        .count();
    // Recovery: everything after a short reconnect window succeeds.
    let settle = up_at + Duration::from_secs(2);
    let late_ok = outcomes
        .iter()
        .filter(|(at, e)| e.is_none() && *at > settle)
        .count();
    let late_err = outcomes
        .iter()
        .filter(|(at, e)| e.is_some() && *at > settle)
        .count();
    eprintln!(
        "stop at {stopped_at:?} (down by {down_at:?}), up at {up_at:?}: {} calls, {} ok before, \
         {} errors, {late_ok} ok after {settle:?}",
        outcomes.len(),
        ok_before,
        errors.len()
    );
    assert!(ok_before > 100, "the load ran before the stop");
    assert!(
        !errors.is_empty(),
        "no call failed while PostgreSQL was down"
    );
    for (at, code) in &errors {
        assert_eq!(*code, Some(Code::Unavailable), "error at {at:?}");
        assert!(
            *at >= stopped_at && *at <= settle,
            "an error at {at:?}, outside the outage ({stopped_at:?}..{up_at:?})"
        );
    }
    assert_eq!(late_err, 0);
    assert!(late_ok > 100, "no recovery after the restart");
    assert!(pid_before && arca.is_running(), "Arca restarted or exited");
    // New writes work too.
    create_key(&mut c, "after-restart").await;
    generate(&mut c, "after-restart", &context).await;

    // No audit record was lost: every call answered has its record (the refused ones
    // are written after the outage, with their refusal), every answer that carried a
    // data key has an OK record, and the chain verifies.
    let counted = |sql: &str| -> u64 { psql_query(pg.url(), sql).unwrap().parse().unwrap() };
    let calls = outcomes.len() as u64;
    let ok_calls = outcomes.iter().filter(|(_, e)| e.is_none()).count() as u64;
    let records = counted("SELECT COUNT(*) FROM audit_log WHERE operation = 'UnwrapKey'");
    let ok_records =
        counted("SELECT COUNT(*) FROM audit_log WHERE operation = 'UnwrapKey' AND result = 0");
    let auditor = mint_token(&arca, "auditor:pg-restart", &[]).await;
    // An OK record whose caller was refused all the same (its batch committed after the
    // caller's time ran out, or was found stored after being reported failed) is named by
    // an `audit.responses_withheld` or `audit.late_commit` record.
    let withheld = withheld_seqs(&arca, &auditor).await;
    let ok_seqs = psql_query(
        pg.url(),
        "SELECT seq FROM audit_log WHERE operation = 'UnwrapKey' AND result = 0",
    )
    .unwrap();
    let ok_withheld = ok_seqs
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .filter(|s| withheld.contains(s))
        .count() as u64;
    eprintln!(
        "{calls} unwrap calls ({ok_calls} ok); {records} records ({ok_records} ok, {ok_withheld} of them withheld)"
    );
    assert_eq!(records, calls, "one record per unwrap call");
    assert_eq!(
        ok_records - ok_withheld,
        ok_calls,
        "one OK record, not named withheld, per unwrap answered OK"
    );
    let v = arca
        .audit(&auditor)
        .await
        .verify_audit(pb::VerifyAuditRequest { from_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.records >= records, "{v:?}");
}

/// The seqs that `audit.responses_withheld` and `audit.late_commit` records name.
async fn withheld_seqs(arca: &TestArca, auditor: &str) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    let mut c = arca.audit(auditor).await;
    for op in ["audit.responses_withheld", "audit.late_commit"] {
        let mut token = String::new();
        loop {
            let page = c
                .query_audit(pb::QueryAuditRequest {
                    operation: op.into(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for r in &page.records {
                // "the callers of seq 3,5-7 gave up …" or "seq 10..=20 were stored …"
                let list = r
                    .detail
                    .split("seq ")
                    .nth(1)
                    .and_then(|t| t.split(' ').next())
                    .unwrap_or_default();
                for part in list.split(',') {
                    let (a, b) = part
                        .split_once("..=")
                        .or_else(|| part.split_once('-'))
                        .unwrap_or((part, part));
                    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                    out.extend(a..=b);
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    out
}

/// Issue 18, item 13 ("Destroy reaches every node"), as the attack: node B reaches the
/// token through `p11-kit server`, which is stopped (SIGSTOP) while A destroys a version
/// B has used, so B's forget of its session copies cannot complete. B must keep the
/// tombstone pending (retrying, never counting it applied), refuse the version meanwhile,
/// and apply it once its HSM answers again; and with the database row forced back to
/// ENABLED (triggers disabled, the pre-retirement `state_seq` and MAC replayed), neither
/// node unwraps under the version: A's HSM object is gone, B's pending tombstone refuses
/// it, and the state-MAC check of ADR 12 refuses the replayed row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_reaches_a_node_whose_forget_is_delayed_even_with_the_database_forced_back() {
    let Some(_) = postgres_url("cluster::destroy_reaches_a_node_whose_forget_is_delayed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = lifecycle_nodes(dir.path(), "3s").start().await;
    let url = a.postgres().unwrap().url().to_string();
    // A starts first and holds the jobs' lease (so A is the destroyer).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let data_dir = a.data_dir().to_path_buf();
    let socket = a.root().join("p11-b.sock");
    let p11 = crate::outage::P11KitServer::start(&data_dir, &socket);
    let b = a
        .second_node_with(|o| {
            o.arg("--hsm-module")
                .arg(crate::outage::client_module())
                .arg("--hsm-pin-file")
                .arg(data_dir.join("hsm-pin"))
                .arg("--hsm-timeout-ms")
                .arg("500")
                .env(
                    "P11_KIT_SERVER_ADDRESS",
                    format!("unix:path={}", socket.display()),
                )
        })
        .await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let context = ctx(&[("tenant", "t-13")]);
    let key = create_key(&mut ca, "gone").await;
    let dk = generate(&mut ca, "gone", &context).await;
    // B uses v1: its session holds a handle (and, where GCM goes through, a copy).
    let on_b = unwrap(&mut cb, &dk.wrapped_key, &context).await;
    match &on_b {
        Ok(u) => assert_eq!(u.plaintext, dk.plaintext),
        Err(s) => eprintln!(
            "NOTE: B cannot unwrap through this p11-kit ({:?}: {}); the test still checks \
             that its forget is retried and that nothing unwraps",
            s.code(),
            s.message()
        ),
    }
    ca.rotate_key(pb::RotateKeyRequest {
        name: "gone".into(),
    })
    .await
    .unwrap();
    let row = |url: &str| {
        psql_query(
            url,
            &format!(
                "SELECT state_seq || ' ' || COALESCE(mac, '') FROM key_versions \
                 WHERE key_id = '{}' AND version = 1",
                key.id
            ),
        )
        .unwrap()
    };
    let enabled_row = row(&url);
    let (seq, mac) = enabled_row.split_once(' ').unwrap();
    let (seq, mac) = (seq.to_string(), mac.to_string());

    // B's HSM hangs; A retires v1 with a 1 s waiting period and destroys it.
    p11.signal_group("STOP");
    ca.retire_key_version(pb::RetireKeyVersionRequest {
        name: "gone".into(),
        version: 1,
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        let k = get_key(&mut ca, "gone").await;
        if version_state(&k, 1) == pb::KeyVersionState::Destroyed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "not destroyed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.log_text().contains("key version destroyed"),
        "A destroyed it"
    );
    // B cannot forget while its HSM hangs: the tombstone stays pending.
    let started = Instant::now();
    while !b.log_text().contains("could not forget a destroyed object") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never tried (and failed) to forget:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !b.log_text().contains("destroyed object forgotten"),
        "B counted the forget done while its HSM hung"
    );

    // The database row is forced back to what it was while ENABLED (an attacker with
    // write access to the database, triggers off, the old state_seq and MAC replayed).
    psql_query(
        &url,
        &format!(
            "ALTER TABLE key_versions DISABLE TRIGGER USER; \
             UPDATE key_versions SET state = 'ENABLED', destroy_at = NULL, \
             destroying_at = NULL, destroyed_at = NULL, retire_request = NULL, \
             state_seq = {seq}, mac = NULLIF('{mac}', '') \
             WHERE key_id = '{}' AND version = 1; \
             ALTER TABLE key_versions ENABLE TRIGGER USER",
            key.id
        ),
    )
    .unwrap();
    let refused_everywhere = |phase: &'static str| {
        let (ca, cb) = (ca.clone(), cb.clone());
        let (blob, context) = (dk.wrapped_key.clone(), context.clone());
        async move {
            let mut reasons = Vec::new();
            for (node, mut c) in [("A", ca), ("B", cb)] {
                for _ in 0..5 {
                    match unwrap(&mut c, &blob, &context).await {
                        Ok(_) => panic!("{phase}: node {node} unwrapped under destroyed v1"),
                        Err(s) => reasons.push(format!(
                            "{node}: {:?} {}",
                            s.code(),
                            reason(&s).unwrap_or("-")
                        )),
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            reasons.dedup();
            eprintln!("{phase}: {reasons:?}");
        }
    };
    refused_everywhere("B's forget pending").await;

    // B's HSM answers again: the forget is retried and confirmed (or B tore its sessions
    // down), and still nothing unwraps.
    p11.signal_group("CONT");
    let started = Instant::now();
    loop {
        let log = b.log_text();
        if log.contains("destroyed object forgotten") || log.contains("hsm-sessions-reset") {
            let failed = log.matches("could not forget a destroyed object").count();
            eprintln!(
                "B applied the tombstone {:?} after its HSM answered again ({failed} failed \
                 forget passes; sessions torn down: {}; forget confirmed: {})",
                started.elapsed(),
                log.contains("hsm-sessions-reset"),
                log.contains("destroyed object forgotten")
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "B never applied the tombstone:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused_everywhere("after B applied the tombstone").await;
    // A forgery that is newer than anything the nodes saw (state_seq ahead, no MAC): the
    // nodes reload the row, and the state-MAC check (ADR 12) refuses it.
    psql_query(
        &url,
        &format!(
            "ALTER TABLE key_versions DISABLE TRIGGER USER; \
             UPDATE key_versions SET state_seq = state_seq + 100, mac = NULL \
             WHERE key_id = '{}' AND version = 1; \
             ALTER TABLE key_versions ENABLE TRIGGER USER",
            key.id
        ),
    )
    .unwrap();
    refused_everywhere("forged row, newer state_seq, no MAC").await;
    // v2 still works on both nodes.
    let v2 = generate(&mut ca, "gone", &context).await;
    assert_eq!(v2.key_version, 2);
    unwrap(&mut ca, &v2.wrapped_key, &context).await.unwrap();
    if on_b.is_ok() {
        unwrap(&mut cb, &v2.wrapped_key, &context).await.unwrap();
    }
    drop(p11);
}
