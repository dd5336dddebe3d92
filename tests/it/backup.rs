//! Backup and restore, drilled as docs/operations.md ("Backing up", "Restoring a backup")
//! tells operators to: the database backed up while the server runs (`sqlite3 .backup`,
//! `pg_dump -Fc`), the server stopped, the SoftHSM token directory copied, the live state
//! lost or rolled back, both halves restored (a new checkpoint file holding the old lines
//! up to the restored head), the server started again, and the checks the runbook asks
//! for after a restore: health, unwraps of known blobs, key metadata, `arca audit verify`.
//!
//! The second test pins down the known gap the runbook states: a restore rolls back every
//! decision made after the backup, and nothing refuses the older database yet (rollback
//! detection is issue 17, item 3). It asserts today's behaviour, and where the operator
//! finds what to re-apply: the audit trail exported before the restore.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::backup::{pg_dump_custom, pg_restore, pg_url_as};
use crate::support::database::psql_query;
use crate::support::{
    assert_code, create_key, ctx, generate, get_key, mint_token, postgres_url, random_bytes,
    reason, rotate, unwrap, version_state, wait_health, Builder, Db, Restore, TestArca,
};
use arca::grpc::pb;

/// A data key wrapped before the backup: key, version, wrapped key, context, plaintext.
struct Blob {
    key: &'static str,
    version: u32,
    wrapped: Vec<u8>,
    context: HashMap<String, String>,
    plaintext: Vec<u8>,
}

/// Generates `n` data keys under `key`'s primary version.
async fn wrap_some(c: &mut crate::support::KeyClient, key: &'static str, n: usize) -> Vec<Blob> {
    let mut out = Vec::new();
    for i in 0..n {
        let context = ctx(&[("record", &format!("{key}-{i}"))]);
        let dk = generate(c, key, &context).await;
        out.push(Blob {
            key,
            version: dk.key_version,
            wrapped: dk.wrapped_key,
            context,
            plaintext: dk.plaintext,
        });
    }
    out
}

async fn disable(c: &mut crate::support::KeyClient, key: &str, version: u32) {
    c.disable_key_version(pb::KeyVersionRequest {
        name: key.into(),
        version,
    })
    .await
    .unwrap_or_else(|s| panic!("DisableKeyVersion {key} v{version}: {s:?}"));
}

/// Starts the stopped server again on its restored state and waits until it serves.
async fn start_restored(arca: &mut TestArca, db: Db) {
    arca.start_with(Builder::default().backend(db)).await;
    let mut h = arca.health().await;
    assert!(
        wait_health(&mut h, ServingStatus::Serving, Duration::from_secs(30))
            .await
            .is_some(),
        "the restored server does not serve"
    );
}

/// `arca audit verify` as `auditor`: (it passed, what it printed).
async fn verify(arca: &TestArca, auditor: &str) -> (bool, String) {
    let r = arca.cli(auditor).run(&["audit", "verify"]).await;
    (r.ok, format!("{}{}", r.out, r.err))
}

/// Waits until the checkpoint file holds a line for `seq` or later, so that the file
/// has seen everything the database has.
async fn wait_for_checkpoint(arca: &TestArca, seq: u64) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(arca.checkpoint_file()).unwrap_or_default();
        let last = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["seq"].as_u64())
            .max()
            .unwrap_or(0);
        if last >= seq {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no checkpoint reaches seq {seq} (last {last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_restored_backup_of_database_and_token_unwraps_every_blob_and_keeps_every_key_as_it_was
);

async fn a_restored_backup_of_database_and_token_unwraps_every_blob_and_keeps_every_key_as_it_was(
    db: Db,
) {
    let mut arca = TestArca::start_on(db).await;
    let auditor = mint_token(&arca, "auditor:backup", &[]).await;
    let mut c = arca.client().await;
    let names = ["backup/rotated", "backup/disabled", "backup/plain"];
    for name in names {
        create_key(&mut c, name).await;
    }
    // rotated: v1, v2, v3 (primary); disabled: v1 DISABLED, v2 primary; plain: v1.
    let mut blobs = Vec::new();
    for name in names {
        blobs.extend(wrap_some(&mut c, name, 3).await);
    }
    rotate(&mut c, "backup/rotated").await;
    rotate(&mut c, "backup/disabled").await;
    blobs.extend(wrap_some(&mut c, "backup/rotated", 3).await);
    blobs.extend(wrap_some(&mut c, "backup/disabled", 3).await);
    rotate(&mut c, "backup/rotated").await;
    blobs.extend(wrap_some(&mut c, "backup/rotated", 3).await);
    disable(&mut c, "backup/disabled", 1).await;
    let mut at_backup = Vec::new();
    for name in names {
        at_backup.push(get_key(&mut c, name).await);
    }
    assert_eq!(at_backup[0].versions.len(), 3);
    assert_eq!(
        version_state(&at_backup[1], 1),
        pb::KeyVersionState::Disabled
    );

    // Backing up: the database while the server runs, then the token with it stopped.
    let backup = tempfile::tempdir().expect("backup dir");
    arca.back_up_database(backup.path()).await;
    drop(c);
    let status = arca.stop().await;
    assert!(status.success(), "arca server exit on SIGTERM: {status}");
    arca.back_up_token(backup.path());

    // Both halves lost, then restored.
    arca.lose_database_and_token();
    arca.restore_database(backup.path(), Restore::Fresh).await;
    arca.restore_token(backup.path());
    let old_checkpoints = arca.keep_checkpoints_through_restored_head();
    let kept = std::fs::read_to_string(arca.checkpoint_file()).unwrap();
    assert!(
        !kept.trim().is_empty(),
        "no checkpoint from before the backup to verify the restored trail against (old file: {})",
        std::fs::read_to_string(&old_checkpoints).unwrap_or_default()
    );
    start_restored(&mut arca, db).await;

    // Every key as it was at the backup, every blob as it was.
    let mut c = arca.client().await;
    for (name, then) in names.iter().zip(&at_backup) {
        assert_eq!(
            &get_key(&mut c, name).await,
            then,
            "{name} after the restore"
        );
    }
    for b in &blobs {
        let r = unwrap(&mut c, &b.wrapped, &b.context).await;
        if b.key == "backup/disabled" && b.version == 1 {
            let s = assert_code(
                r,
                Code::FailedPrecondition,
                "a blob under a disabled version",
            );
            assert_eq!(reason(&s), Some("VERSION_DISABLED"), "{s:?}");
        } else {
            let u =
                r.unwrap_or_else(|s| panic!("{} v{} after the restore: {s:?}", b.key, b.version));
            assert_eq!(u.plaintext, b.plaintext, "{} v{}", b.key, b.version);
            assert_eq!(u.key_version, b.version);
        }
    }
    // The restored trail checks out against its seals and the checkpoints it had.
    let (ok, report) = verify(&arca, &auditor).await;
    assert!(ok, "audit verify after the restore: {report}");
    assert!(report.starts_with("OK: "), "{report}");
    // And the restored node goes on working: the primary still wraps.
    let after = generate(&mut c, "backup/rotated", &ctx(&[("record", "after")])).await;
    assert_eq!(after.key_version, 3);
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    known_gap_a_restore_re_enables_a_version_disabled_after_the_backup
);

/// Issue 17, item 3 (rollback detection) is not built: the restored node serves the older
/// database without a word. This test asserts what the runbook says happens today, so
/// that it fails, and is rewritten, when that item lands.
async fn known_gap_a_restore_re_enables_a_version_disabled_after_the_backup(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    let auditor = mint_token(&arca, "auditor:backup", &[]).await;
    let mut c = arca.client().await;
    create_key(&mut c, "rollback").await;
    let v1 = wrap_some(&mut c, "rollback", 1).await.remove(0);
    rotate(&mut c, "rollback").await;
    let backup = tempfile::tempdir().expect("backup dir");
    arca.back_up_database(backup.path()).await;

    // After the backup: v1 is disabled (say, suspected compromise).
    disable(&mut c, "rollback", 1).await;
    let s = assert_code(
        unwrap(&mut c, &v1.wrapped, &v1.context).await,
        Code::FailedPrecondition,
        "v1 disabled",
    );
    assert_eq!(reason(&s), Some("VERSION_DISABLED"), "{s:?}");
    // The runbook's first restore step: while the live database can still be read, keep
    // its audit trail; it is the list of what the restore will roll back.
    let export = arca
        .cli(&auditor)
        .run(&["audit", "export", "--format", "jsonl"])
        .await;
    assert!(export.ok, "{export:?}");
    let is_the_disable = |l: &serde_json::Value| {
        l["operation"] == "DisableKeyVersion" && l["key_name"] == "rollback" && l["result"] == "OK"
    };
    let exported: Vec<serde_json::Value> = export
        .out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(exported.iter().any(is_the_disable), "{}", export.out);
    wait_for_checkpoint(&arca, arca.audit_head_seq()).await;
    drop(c);
    let status = arca.stop().await;
    assert!(status.success(), "arca server exit on SIGTERM: {status}");
    arca.back_up_token(backup.path());

    // Restored over the live database (SQLite: the live files moved aside; PostgreSQL:
    // pg_restore --clean --if-exists).
    arca.restore_database(backup.path(), Restore::OverLive)
        .await;
    arca.restore_token(backup.path());
    let restored_head = arca.audit_head_seq();
    let old_checkpoints = arca.keep_checkpoints_through_restored_head();
    start_restored(&mut arca, db).await;

    // The gap: v1 is ENABLED again and unwraps; nothing refused the older database.
    let mut c = arca.client().await;
    let key = get_key(&mut c, "rollback").await;
    assert_eq!(version_state(&key, 1), pb::KeyVersionState::Enabled);
    let u = unwrap(&mut c, &v1.wrapped, &v1.context)
        .await
        .expect("v1 unwraps again after the restore");
    assert_eq!(u.plaintext, v1.plaintext);
    // The restored trail is consistent by itself, and does not hold the disable: the
    // export taken before the restore is where the operator reads what to re-apply.
    let (ok, report) = verify(&arca, &auditor).await;
    assert!(ok, "audit verify after the restore: {report}");
    let restored = arca
        .cli(&auditor)
        .run(&["audit", "export", "--format", "jsonl"])
        .await;
    assert!(restored.ok, "{restored:?}");
    assert!(
        !restored
            .out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .any(|l| is_the_disable(&l)),
        "the restored trail holds the disable made after the backup"
    );
    // Re-applied by hand, as the runbook says.
    disable(&mut c, "rollback", 1).await;
    let s = assert_code(
        unwrap(&mut c, &v1.wrapped, &v1.context).await,
        Code::FailedPrecondition,
        "v1 disabled again",
    );
    assert_eq!(reason(&s), Some("VERSION_DISABLED"), "{s:?}");

    // The checkpoint file kept from before the restore does see the rollback: verified
    // against it, the restored trail fails after the backup point.
    drop(c);
    let status = arca.stop().await;
    assert!(status.success(), "arca server exit on SIGTERM: {status}");
    let copy = arca.root().join("old-checkpoints-copy.jsonl");
    std::fs::copy(&old_checkpoints, &copy).unwrap();
    arca.start_with(
        Builder::default()
            .backend(db)
            .arg("--audit-checkpoints")
            .arg(&copy),
    )
    .await;
    let (ok, report) = verify(&arca, &auditor).await;
    assert!(
        !ok,
        "the pre-restore checkpoints accepted the rolled-back trail: {report}"
    );
    assert!(
        report.contains("truncated") || report.contains("checkpoint rewritten"),
        "{report}"
    );
    let first_bad: u64 = report
        .split("seq ")
        .nth(1)
        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seq in the report: {report}"));
    assert!(
        first_bad > restored_head,
        "the first bad seq {first_bad} is not after the backup point {restored_head}: {report}"
    );
}

/// The PostgreSQL restore of the runbook with the roles of docs/deployment.md ("Connecting
/// to PostgreSQL"): an owner role that applies migrations, dumps and restores, and a
/// runtime role without DDL rights that the server uses. No superuser touches Arca's
/// tables: a migration that needed one to restore would fail here.
mod a_dump_by_the_owner_role_restores_into_a_fresh_database_that_the_runtime_role_serves {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::owner_role_restore().await;
    }
}

async fn owner_role_restore() {
    let Some(admin) = postgres_url(
        "backup::a_dump_by_the_owner_role_restores_into_a_fresh_database_that_the_runtime_role_serves::postgres",
    ) else {
        return;
    };
    let admin_sql = |url: &str, sql: &str| {
        psql_query(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    };
    let id = hex::encode(random_bytes(6));
    let (owner, runtime) = (format!("arca_own_{id}"), format!("arca_rt_{id}"));
    let (live, fresh) = (format!("arca_bk_{id}"), format!("arca_bk_{id}_restored"));
    let schema_rights = format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT USAGE, CREATE ON SCHEMA public TO {owner}"
    );
    admin_sql(&admin, &format!("CREATE ROLE {owner} LOGIN"));
    admin_sql(&admin, &format!("CREATE ROLE {runtime} LOGIN"));
    admin_sql(&admin, &format!("CREATE DATABASE {live} OWNER {owner}"));
    admin_sql(&pg_url_as(&admin, "postgres", &live), &schema_rights);
    let owner_url = pg_url_as(&admin, &owner, &live);
    let runtime_url = pg_url_as(&admin, &runtime, &live);

    // The owner applies the migrations; the runtime role gets its rows.
    let on = |url: &str| {
        Builder::default()
            .backend(Db::Sqlite)
            .arg("--database")
            .arg(url)
    };
    let mut arca = on(&owner_url).start().await;
    assert!(arca.stop().await.success());
    admin_sql(
        &owner_url,
        &format!(
            "GRANT USAGE ON SCHEMA public TO {runtime}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {runtime}; \
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {runtime}"
        ),
    );
    arca.start_with(on(&runtime_url)).await;
    let auditor = mint_token(&arca, "auditor:backup", &[]).await;
    let mut c = arca.client().await;
    create_key(&mut c, "roles").await;
    let blobs = wrap_some(&mut c, "roles", 2).await;
    let key = get_key(&mut c, "roles").await;
    let backup = tempfile::tempdir().expect("backup dir");
    let dump = backup.path().join("arca.dump");
    pg_dump_custom(&owner_url, &dump).await;
    drop(c);
    assert!(arca.stop().await.success());

    // Into a fresh database owned by the owner role, restored by it, then the names
    // swapped; the runtime role's grants come with the dump.
    admin_sql(&admin, &format!("CREATE DATABASE {fresh} OWNER {owner}"));
    admin_sql(&pg_url_as(&admin, "postgres", &fresh), &schema_rights);
    pg_restore(&pg_url_as(&admin, &owner, &fresh), &dump, Restore::Fresh).await;
    admin_sql(
        &admin,
        &format!("ALTER DATABASE {live} RENAME TO {live}_before"),
    );
    admin_sql(&admin, &format!("ALTER DATABASE {fresh} RENAME TO {live}"));
    let head: u64 = psql_query(&owner_url, "SELECT seq FROM audit_head")
        .unwrap()
        .parse()
        .unwrap();
    arca.keep_checkpoints_through(head);
    arca.start_with(on(&runtime_url)).await;

    let mut c = arca.client().await;
    assert_eq!(get_key(&mut c, "roles").await, key);
    for b in &blobs {
        let u = unwrap(&mut c, &b.wrapped, &b.context).await.unwrap();
        assert_eq!(u.plaintext, b.plaintext);
    }
    let (ok, report) = verify(&arca, &auditor).await;
    assert!(ok, "audit verify after the restore: {report}");
    drop(c);
    assert!(arca.stop().await.success());
    for db in [live.clone(), format!("{live}_before")] {
        admin_sql(&admin, &format!("DROP DATABASE {db} WITH (FORCE)"));
    }
    admin_sql(&admin, &format!("DROP ROLE {owner}"));
    admin_sql(&admin, &format!("DROP ROLE {runtime}"));
}
