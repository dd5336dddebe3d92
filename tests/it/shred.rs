//! Key lifecycle (DESIGN §3) end to end, on real SoftHSM and SQLite: retirement under
//! quorum, the waiting period, crypto-shredding proved through PKCS#11 and on a copy of
//! the database and token, cancellation, illegal transitions, scheduled rotation and the
//! usage limit, two processes sharing the jobs, kill -9 inside a destruction, and
//! retention dates.

use std::time::{Duration, Instant};

use arca::grpc::pb;
use tonic::Code;

use crate::support::hsm::{secret_key_ids, so_set_user_pin};
use crate::support::{
    assert_code, create_key, ctx, generate, get_key, lifecycle_policy, reason, request_rotation,
    sqlite_query, three_of_five, unsealed, unwrap, version_state, CliOutput, Db, KeyClient,
    TestArca,
};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("arca-it-policy-")
        .tempdir()
        .unwrap()
}

/// Polls until version `v` of `name` is DESTROYED (at most `limit`).
async fn wait_destroyed(arca: &TestArca, name: &str, v: u32, limit: Duration) -> pb::Key {
    let started = Instant::now();
    loop {
        let k = arca.key(name).await;
        if version_state(&k, v) == pb::KeyVersionState::Destroyed {
            return k;
        }
        assert!(
            started.elapsed() < limit,
            "v{v} of {name} not destroyed after {limit:?}: {k:?}\n{}",
            arca.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

async fn retire_version(
    c: &mut KeyClient,
    name: &str,
    version: u32,
    wait_s: u64,
) -> Result<pb::AdminResponse, tonic::Status> {
    c.retire_key_version(pb::RetireKeyVersionRequest {
        name: name.into(),
        version,
        waiting_period_seconds: wait_s,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn retired_versions_are_crypto_shredded_and_stay_unrecoverable() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let (mut arca, cs) = unsealed(three_of_five(Db::Sqlite).fast_jobs(&p, "2s")).await;
    let mut c = arca.client().await;

    // 100 data keys under v1, each with its own context.
    let mut v1_blobs = Vec::new();
    for i in 0..100 {
        let cx = ctx(&[("patient", &format!("p-{i}"))]);
        let dk = generate(&mut c, "phi", &cx).await;
        assert_eq!(dk.key_version, 1);
        v1_blobs.push((dk.wrapped_key, cx, dk.plaintext));
    }
    let v1_id = get_key(&mut c, "phi").await.id;

    // Rotate under quorum; 10 data keys under v2.
    let req = request_rotation(&arca).await;
    for n in [1, 2, 3] {
        cs.approve(&arca, n, &req).await.unwrap();
    }
    let mut v2_blobs = Vec::new();
    for i in 0..10 {
        let cx = ctx(&[("patient", &format!("q-{i}"))]);
        let dk = generate(&mut c, "phi", &cx).await;
        assert_eq!(dk.key_version, 2);
        v2_blobs.push((dk.wrapped_key, cx, dk.plaintext));
    }

    // Retiring the primary while v1 is enabled is refused, saying why.
    let e = retire_version(&mut c, "phi", 2, 1).await;
    let s = assert_code(e, Code::FailedPrecondition, "retire the primary");
    assert_eq!(reason(&s), Some("PRIMARY_IN_USE"), "{s:?}");
    // A waiting period outside the policy is refused.
    let e = retire_version(&mut c, "phi", 1, 91 * 86_400).await;
    assert_code(e, Code::InvalidArgument, "waiting period over the maximum");

    // Retire v1 with a 1 s waiting period: a quorum request.
    let r = retire_version(&mut c, "phi", 1, 1).await.unwrap();
    let req = r.approval_request.expect("retirement waits for quorum");
    assert_eq!(req.operation, "RetireKeyVersion");
    assert_eq!(
        req.parameters.get("waiting_period_ms").map(String::as_str),
        Some("1000")
    );
    assert_eq!(
        version_state(&arca.key("phi").await, 1),
        pb::KeyVersionState::Enabled
    );
    for n in [4, 5] {
        assert_eq!(cs.approve(&arca, n, &req).await.unwrap().state, "PENDING");
    }
    let done = cs.approve(&arca, 1, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");

    // From now on v1 refuses unwrap (first scheduled, then destroyed).
    let e = unwrap(&mut c, &v1_blobs[0].0, &v1_blobs[0].1).await;
    assert_code(
        e,
        Code::FailedPrecondition,
        "unwrap under a retired version",
    );

    let k = wait_destroyed(&arca, "phi", 1, Duration::from_secs(15)).await;
    let v1 = k.versions.iter().find(|v| v.version == 1).unwrap();
    assert!(!v1.destroyed_at.is_empty(), "{v1:?}");
    assert_eq!(
        v1.retire_request, req.id,
        "the tombstone names the approval"
    );
    assert_eq!(k.primary_version, 2);

    for (blob, cx, _) in &v1_blobs {
        let s = assert_code(
            unwrap(&mut c, blob, cx).await,
            Code::FailedPrecondition,
            "v1",
        );
        assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{s:?}");
    }
    for (blob, cx, plain) in &v2_blobs {
        let u = unwrap(&mut c, blob, cx).await.unwrap();
        assert_eq!(&u.plaintext, plain);
    }
    assert_eq!(count(&arca.log_text(), "key version destroyed"), 1);
    // The tombstone row, as the database holds it.
    let db = arca.sqlite_file();
    let t = sqlite_query(
        &db,
        &format!("SELECT version, retire_request FROM key_tombstones WHERE key_id = '{v1_id}'"),
    )
    .unwrap();
    assert_eq!(t.trim(), format!("1|{}", req.id));

    // A copy of the SQLite file and the token directory taken now, opened by a fresh
    // server: v1 stays unrecoverable even after the copy's database is forced to call
    // v1 ENABLED (as an attacker with the files could), because the HSM object is gone.
    arca.stop().await;
    let copy_opts = three_of_five(Db::Sqlite).fast_jobs(&p, "2s");
    let mut copy = arca.start_on_copy(copy_opts.clone()).await;
    copy.stop().await;
    sqlite_query(
        &copy.sqlite_file(),
        "DROP TRIGGER key_versions_state_transition; \
         UPDATE key_versions SET state = 'ENABLED', destroyed_at = NULL WHERE version = 1;",
    )
    .unwrap();
    copy.start_with(copy_opts).await;
    // The same custodians (their kits were copied too); `cs` remembers which TOTP steps
    // each has spent, and the copy's database remembers them as well.
    cs.unseal(&copy, &[2, 3, 4]).await;
    let mut cc = copy.client().await;
    assert_eq!(
        version_state(&get_key(&mut cc, "phi").await, 1),
        pb::KeyVersionState::Enabled
    );
    for (blob, cx, _) in v1_blobs.iter().take(20) {
        let s = assert_code(
            unwrap(&mut cc, blob, cx).await,
            Code::FailedPrecondition,
            "v1 on the copy",
        );
        assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{s:?}");
    }
    let (blob, cx, plain) = &v2_blobs[0];
    assert_eq!(&unwrap(&mut cc, blob, cx).await.unwrap().plaintext, plain);
    copy.stop().await;

    // Through PKCS#11 directly (pkcs11-tool, with the user PIN reset by the SO on the
    // copy's token): no object with v1's CKA_ID; v2's is there.
    let v1_hsm = hex_id(
        &sqlite_query(
            &copy.sqlite_file(),
            "SELECT hsm_id FROM key_versions WHERE version = 1",
        )
        .unwrap(),
    );
    let v2_hsm = hex_id(
        &sqlite_query(
            &copy.sqlite_file(),
            "SELECT hsm_id FROM key_versions WHERE version = 2",
        )
        .unwrap(),
    );
    so_set_user_pin(copy.data_dir().to_path_buf(), "0000-test".into()).await;
    let ids = secret_key_ids(copy.data_dir().to_path_buf(), "0000-test".into()).await;
    assert!(ids.contains(&v2_hsm), "v2 object missing: {ids:?}");
    assert!(
        !ids.contains(&v1_hsm),
        "v1 object still on the token: {ids:?}"
    );
}

fn hex_id(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

#[tokio::test]
async fn unwrap_refuses_while_waiting_and_cancel_then_enable_restores_it() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let arca = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let cx = ctx(&[("tenant", "t1")]);
    let dk = generate(&mut c, "k", &cx).await;
    c.rotate_key(pb::RotateKeyRequest { name: "k".into() })
        .await
        .unwrap();

    // Dev mode runs the retirement at once; an hour's wait.
    let r = retire_version(&mut c, "k", 1, 3600).await.unwrap();
    let k = r.key.expect("done at once in dev mode");
    assert_eq!(
        version_state(&k, 1),
        pb::KeyVersionState::ScheduledForDestruction
    );
    assert!(!k.versions[0].destroy_at.is_empty());
    let s = assert_code(
        unwrap(&mut c, &dk.wrapped_key, &cx).await,
        Code::FailedPrecondition,
        "unwrap while waiting",
    );
    assert_eq!(
        reason(&s),
        Some("VERSION_SCHEDULED_FOR_DESTRUCTION"),
        "{s:?}"
    );

    // Cancel: DISABLED (still refusing), then enable: unwraps again.
    let r = c
        .cancel_retirement(pb::CancelRetirementRequest {
            name: "k".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let k = r.key.unwrap();
    assert_eq!(version_state(&k, 1), pb::KeyVersionState::Disabled);
    assert!(k.versions[0].destroy_at.is_empty());
    assert_code(
        unwrap(&mut c, &dk.wrapped_key, &cx).await,
        Code::FailedPrecondition,
        "unwrap while disabled",
    );
    c.enable_key_version(pb::KeyVersionRequest {
        name: "k".into(),
        version: 1,
    })
    .await
    .unwrap();
    let u = unwrap(&mut c, &dk.wrapped_key, &cx).await.unwrap();
    assert_eq!(u.plaintext, dk.plaintext);
    // Nothing was destroyed meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count(&arca.log_text(), "key version destroyed"), 0);
}

#[tokio::test]
async fn illegal_transitions_are_refused_and_change_nothing() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let arca = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    c.rotate_key(pb::RotateKeyRequest { name: "k".into() })
        .await
        .unwrap();
    retire_version(&mut c, "k", 1, 1).await.unwrap();
    // Retire twice.
    let before = get_key(&mut c, "k").await;
    let s = assert_code(
        retire_version(&mut c, "k", 1, 1).await,
        Code::FailedPrecondition,
        "retire twice",
    );
    assert_eq!(
        reason(&s),
        Some("VERSION_SCHEDULED_FOR_DESTRUCTION"),
        "{s:?}"
    );
    let k = wait_destroyed(&arca, "k", 1, Duration::from_secs(10)).await;
    assert_eq!(before.versions[1], k.versions[1]);
    let destroyed = k.versions[0].clone();

    for (what, r) in [
        (
            "enable a destroyed version",
            c.enable_key_version(pb::KeyVersionRequest {
                name: "k".into(),
                version: 1,
            })
            .await,
        ),
        (
            "disable a destroyed version",
            c.disable_key_version(pb::KeyVersionRequest {
                name: "k".into(),
                version: 1,
            })
            .await,
        ),
        (
            "cancel after destruction",
            c.cancel_retirement(pb::CancelRetirementRequest {
                name: "k".into(),
                version: 1,
            })
            .await,
        ),
        (
            "retire after destruction",
            retire_version(&mut c, "k", 1, 1)
                .await
                .map(tonic::Response::new),
        ),
    ] {
        let s = assert_code(r, Code::FailedPrecondition, what);
        assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{what}");
    }
    // Cancelling a version that is not scheduled; an unknown version.
    let s = assert_code(
        c.cancel_retirement(pb::CancelRetirementRequest {
            name: "k".into(),
            version: 2,
        })
        .await,
        Code::FailedPrecondition,
        "cancel an enabled version",
    );
    assert_eq!(reason(&s), Some("VERSION_NOT_SCHEDULED"), "{s:?}");
    assert_code(
        retire_version(&mut c, "k", 9, 1).await,
        Code::NotFound,
        "retire an unknown version",
    );
    let after = get_key(&mut c, "k").await;
    assert_eq!(
        after.versions[0], destroyed,
        "the destroyed version changed"
    );
    assert_eq!(version_state(&after, 2), pb::KeyVersionState::Enabled);
    // The name is never reusable, even with every version destroyed.
    c.retire_key(pb::RetireKeyRequest {
        name: "k".into(),
        waiting_period_seconds: 1,
    })
    .await
    .unwrap();
    wait_destroyed(&arca, "k", 2, Duration::from_secs(10)).await;
    let e = c
        .create_key(pb::CreateKeyRequest {
            name: "k".into(),
            ..Default::default()
        })
        .await;
    assert_code(e, Code::AlreadyExists, "reuse of a destroyed key's name");
    let e = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "k".into(),
            ..Default::default()
        })
        .await;
    assert_code(e, Code::FailedPrecondition, "wrap under a destroyed key");
    // A retired key is not rotated back to life.
    let s = assert_code(
        c.rotate_key(pb::RotateKeyRequest { name: "k".into() })
            .await,
        Code::FailedPrecondition,
        "rotate a retired key",
    );
    assert_eq!(reason(&s), Some("KEY_RETIRED"), "{s:?}");
    assert_eq!(get_key(&mut c, "k").await.versions.len(), 2);
}

#[tokio::test]
async fn the_usage_limit_rotates_after_exactly_100_wraps() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 100);
    let arca = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    for i in 0..100 {
        let dk = generate(&mut c, "k", &ctx(&[])).await;
        assert_eq!(dk.key_version, 1, "wrap {i}");
    }
    let dk = generate(&mut c, "k", &ctx(&[])).await;
    assert_eq!(dk.key_version, 2, "the 101st wrap");
    let k = get_key(&mut c, "k").await;
    assert_eq!(k.primary_version, 2);
    assert_eq!(k.versions[0].wrap_count, 100, "{k:?}");
    assert_eq!(count(&arca.log_text(), "reason=\"usage limit\""), 1);
    // Wraps with caller material count too.
    for _ in 0..99 {
        c.wrap_key(pb::WrapKeyRequest {
            key_name: "k".into(),
            plaintext: vec![7; 32],
            context: Default::default(),
        })
        .await
        .unwrap();
    }
    assert_eq!(get_key(&mut c, "k").await.primary_version, 2);
    let w = c
        .wrap_key(pb::WrapKeyRequest {
            key_name: "k".into(),
            plaintext: vec![7; 32],
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.key_version, 3);
}

#[tokio::test]
async fn two_processes_rotate_on_schedule_and_destroy_exactly_once() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let a = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let b = a.second_node().await;
    let mut c = a.client().await;
    let started = Instant::now();
    c.create_key(pb::CreateKeyRequest {
        name: "sched".into(),
        rotation_period_seconds: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let k = get_key(&mut c, "sched").await;
    assert_eq!(k.rotation_period_seconds, 2);
    // Rotations at ~2 s and ~4 s, by whichever node holds the lease: looked at as soon as
    // the second one is there (a loaded machine may run the job pass late), so a third
    // one, ~2 s later, is not yet due.
    let mut k = get_key(&mut c, "sched").await;
    while k.versions.len() < 3 && started.elapsed() < Duration::from_secs(9) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        k = get_key(&mut c, "sched").await;
    }
    let versions: Vec<u32> = k.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2, 3], "{k:?}");
    let logs = format!("{}\n{}", a.log_text(), b.log_text());
    assert_eq!(
        count(&logs, "reason=\"rotation period\""),
        2,
        "each rotation exactly once across the two processes"
    );
    // Version ages: one period apart (never two rotations for one period).
    let ms = |s: &str| arca::clock::parse_rfc3339(s).unwrap();
    for w in k.versions.windows(2) {
        let gap = ms(&w[1].created_at) - ms(&w[0].created_at);
        assert!((1900..3000).contains(&gap), "rotation gap {gap} ms: {k:?}");
    }

    // Retire v1 (1 s): destroyed once, by one of the two.
    retire_version(&mut c, "sched", 1, 1).await.unwrap();
    wait_destroyed(&a, "sched", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let logs = format!("{}\n{}", a.log_text(), b.log_text());
    assert_eq!(count(&logs, "key version destroyed"), 1, "{logs}");
    let t = a
        .sql("SELECT COUNT(*) FROM key_tombstones WHERE version = 1")
        .unwrap();
    assert_eq!(t, "1");
    // The other node refuses v1 too.
    let mut cb = b.client().await;
    assert_eq!(
        version_state(&get_key(&mut cb, "sched").await, 1),
        pb::KeyVersionState::Destroyed
    );
}

#[tokio::test]
async fn kill_9_inside_a_destruction_finishes_it_after_the_restart() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let opts = TestArca::builder().fast_jobs(&p, "2s");
    let mut arca = opts
        .clone()
        .env("ARCA_FAULT_ABORT_AT", "after-hsm-destroy")
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let cx = ctx(&[("a", "b")]);
    let dk = generate(&mut c, "k", &cx).await;
    c.rotate_key(pb::RotateKeyRequest { name: "k".into() })
        .await
        .unwrap();
    retire_version(&mut c, "k", 1, 1).await.unwrap();
    // The destroyer aborts the process right after C_DestroyObject.
    let started = Instant::now();
    while arca.is_running() {
        assert!(started.elapsed() < Duration::from_secs(15), "no abort");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(arca.log_text().contains("aborting at after-hsm-destroy"));
    let row = arca
        .sql(
            "SELECT state, CASE WHEN destroying_at IS NULL THEN 0 ELSE 1 END \
             FROM key_versions WHERE version = 1",
        )
        .unwrap();
    assert_eq!(row, "SCHEDULED_FOR_DESTRUCTION|1", "half-done state");
    arca.kill();
    arca.start_with(opts).await;
    let k = wait_destroyed(&arca, "k", 1, Duration::from_secs(10)).await;
    assert!(!k.versions[0].destroyed_at.is_empty());
    assert!(
        arca.log_text().contains("object_existed=false"),
        "the restart found the object already gone"
    );
    let mut c = arca.client().await;
    let s = assert_code(
        unwrap(&mut c, &dk.wrapped_key, &cx).await,
        Code::FailedPrecondition,
        "unwrap after the restart",
    );
    assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{s:?}");
    let t = arca.sql("SELECT COUNT(*) FROM key_tombstones").unwrap();
    assert_eq!(t, "1");
}

#[tokio::test]
async fn a_past_retention_date_destroys_the_key_without_anyone_asking() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "1s", 1 << 30);
    let arca = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let mut c = arca.client().await;
    // Far in the future: nothing happens; listing shows it.
    c.create_key(pb::CreateKeyRequest {
        name: "kept".into(),
        retain_until: "2090-01-01".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c
        .create_key(pb::CreateKeyRequest {
            name: "bad-date".into(),
            retain_until: "next tuesday".into(),
            ..Default::default()
        })
        .await;
    assert_code(
        e,
        Code::InvalidArgument,
        "a retention date that does not parse",
    );
    // Already past: the key is retired at the next job pass, then destroyed after the
    // policy's default waiting period (1 s here).
    let k = c
        .create_key(pb::CreateKeyRequest {
            name: "expired".into(),
            retain_until: "2020-01-01T00:00:00Z".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.retain_until, "2020-01-01T00:00:00.000Z");
    let cx = ctx(&[("x", "y")]);
    // Generated before the job's first pass, or refused if it already ran.
    let dk = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "expired".into(),
            context: cx.clone(),
            without_plaintext: false,
        })
        .await;
    let k = wait_destroyed(&arca, "expired", 1, Duration::from_secs(10)).await;
    assert!(k.versions[0].retire_request.is_empty());
    if let Ok(dk) = dk {
        let s = assert_code(
            unwrap(&mut c, &dk.into_inner().wrapped_key, &cx).await,
            Code::FailedPrecondition,
            "unwrap after retention",
        );
        assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{s:?}");
    }
    let list = c
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let kept = list.keys.iter().find(|k| k.name == "kept").unwrap();
    assert_eq!(kept.retain_until, "2090-01-01T00:00:00.000Z");
    assert_eq!(version_state(kept, 1), pb::KeyVersionState::Enabled);
    assert!(arca.log_text().contains("retention date reached"));
}

#[tokio::test]
async fn the_cli_shows_versions_and_retires_and_cancels() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let arca = TestArca::builder().fast_jobs(&p, "2s").start().await;
    let cli = arca.cli(arca.token());
    let CliOutput { ok, out, err } = cli
        .run(&[
            "key",
            "create",
            "cli",
            "--rotate-every",
            "90d",
            "--retain-until",
            "2090-01-01",
        ])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("rotate every:    7776000s"), "{out}");
    assert!(
        out.contains("retain until:    2090-01-01T00:00:00.000Z"),
        "{out}"
    );
    let CliOutput { ok, err, .. } = cli.run(&["key", "rotate", "cli"]).await;
    assert!(ok, "{err}");
    let CliOutput { ok, out, err } = cli
        .run(&[
            "key",
            "retire",
            "cli",
            "--version",
            "1",
            "--waiting-period",
            "2d",
        ])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("SCHEDULED_FOR_DESTRUCTION"), "{out}");
    let CliOutput { ok, out, err } = cli.run(&["key", "versions", "cli"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("destroy at "), "{out}");
    assert!(out.contains("v2*"), "{out}");
    let CliOutput { ok, err, .. } = cli
        .run(&[
            "key",
            "retire",
            "cli",
            "--version",
            "1",
            "--waiting-period",
            "1s",
        ])
        .await;
    assert!(
        !ok && err.contains("[VERSION_SCHEDULED_FOR_DESTRUCTION]"),
        "{err}"
    );
    let CliOutput { ok, err, .. } = cli.run(&["key", "cancel-retirement", "cli"]).await;
    assert!(ok, "{err}");
    let CliOutput { ok, out, .. } = cli
        .run(&["key", "versions", "cli", "--output", "json"])
        .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["versions"][0]["state"], "DISABLED");
    assert_eq!(v["retain_until"], "2090-01-01T00:00:00.000Z");
    let CliOutput { ok, err, .. } = cli.run(&["key", "set-retention", "cli", "--clear"]).await;
    assert!(ok, "{err}");
    let CliOutput { ok, err, .. } = cli
        .run(&["key", "create", "bad", "--rotate-every", "1x"])
        .await;
    assert!(!ok && err.contains("invalid duration"), "{err}");
}

#[tokio::test]
async fn a_destruction_due_while_the_server_was_down_happens_after_the_restart() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let opts = TestArca::builder().fast_jobs(&p, "2s");
    let mut arca = opts.clone().start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    c.rotate_key(pb::RotateKeyRequest { name: "k".into() })
        .await
        .unwrap();
    retire_version(&mut c, "k", 1, 1).await.unwrap();
    // Down before destroy_at, up again after it.
    arca.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    arca.start_with(opts).await;
    wait_destroyed(&arca, "k", 1, Duration::from_secs(5)).await;
    assert_eq!(count(&arca.log_text(), "key version destroyed"), 1);
}

#[tokio::test]
async fn a_rotation_due_while_sealed_happens_once_after_the_unseal() {
    let dir = tmp();
    let p = lifecycle_policy(dir.path(), "7d", 1 << 30);
    let (arca, cs) = unsealed(three_of_five(Db::Sqlite).fast_jobs(&p, "2s")).await;
    let mut c = arca.client().await;
    c.create_key(pb::CreateKeyRequest {
        name: "sealed-away".into(),
        rotation_period_seconds: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    cs.seal(&arca, 1).await;
    // Three periods pass while sealed: the jobs do nothing (no HSM to rotate with).
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let versions = |arca: &TestArca| {
        sqlite_query(
            &arca.sqlite_file(),
            "SELECT COUNT(*) FROM key_versions v JOIN keys k ON k.id = v.key_id \
             WHERE k.name = 'sealed-away'",
        )
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(versions(&arca), "1", "rotated while sealed");
    cs.unseal(&arca, &[3, 4, 5]).await;
    // Caught up at the first pass: one rotation for the missed periods, not three...
    let started = Instant::now();
    while versions(&arca) == "1" {
        assert!(started.elapsed() < Duration::from_secs(5), "no catch-up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let k = get_key(&mut c, "sealed-away").await;
    assert_eq!(k.versions.len(), 2, "{k:?}");
    // ...and the next one a period after it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get_key(&mut c, "sealed-away").await.versions.len(), 2);
}
