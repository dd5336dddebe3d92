//! State the database cannot forge (issue 17, ADR 12), as an attacker with write access to
//! the database would try it on a running node, with the database's own shell: an
//! inserted role grant, an inserted access-policy version, a token row with a hash the
//! attacker chose, a revoked token un-revoked, a MAC copied from another row, a token row
//! moved to another principal and a field changed under a valid MAC. Each is refused with
//! `PERMISSION_DENIED` and a `STATE_FORGED`/`STATE_UNSTAMPED` reason, raises the
//! `state_forged` alert (log line and audit record), grants nothing, and the node keeps
//! serving everyone else.

use std::time::Duration;

use arca::grpc::pb;
use tonic::Code;

use crate::support::{assert_code, create_key, mint_token, reason, Auth, Db, TestArca};

/// Longer than every cache that could let a forged row in (tokens, grants, policies:
/// 500 ms each).
const SETTLE: Duration = Duration::from_millis(1200);

/// A call that needs a role: read key `phi`.
async fn get_phi(arca: &TestArca, token: &str) -> Result<(), tonic::Status> {
    arca.keys(token)
        .await
        .get_key(pb::GetKeyRequest { name: "phi".into() })
        .await
        .map(|_| ())
}

/// The one row `SELECT` gives, as text.
fn one(arca: &TestArca, stmt: &str) -> String {
    arca.sql(stmt).unwrap_or_else(|e| panic!("{stmt}: {e}"))
}

fn token_id(arca: &TestArca, principal: &str) -> String {
    one(
        arca,
        &format!("SELECT id FROM tokens WHERE principal = '{principal}'"),
    )
}

/// Asserts a refusal because of a row the HSM did not stamp.
#[track_caller]
fn assert_forged(r: Result<(), tonic::Status>, what: &str) {
    let s = assert_code(r, Code::PermissionDenied, what);
    assert!(
        matches!(reason(&s), Some("STATE_FORGED" | "STATE_UNSTAMPED")),
        "{what}: {s:?}"
    );
}

/// The node keeps serving the dev admin.
async fn still_serving(arca: &TestArca, what: &str) {
    get_phi(arca, arca.token())
        .await
        .unwrap_or_else(|s| panic!("after {what} the admin is refused: {s:?}"));
}

/// Every audit record's (kind, operation, detail), read with an auditor's token.
async fn audit_records(arca: &TestArca) -> Vec<(String, String, String)> {
    let auditor = mint_token(arca, "auditor:state", &[]).await;
    let mut c = arca.audit(Auth::from(auditor.as_str())).await;
    let mut out = Vec::new();
    let mut page = String::new();
    loop {
        let r = c
            .query_audit(pb::QueryAuditRequest {
                page_size: 1000,
                page_token: page.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(
            r.records
                .into_iter()
                .map(|r| (r.kind, r.operation, r.detail)),
        );
        if r.next_page_token.is_empty() {
            return out;
        }
        page = r.next_page_token;
    }
}

on_both_backends!(
    #[tokio::test]
    authority_rows_written_by_a_database_writer_are_refused
);

async fn authority_rows_written_by_a_database_writer_are_refused(db: Db) {
    let arca = TestArca::start_on(db).await;
    create_key(&mut arca.client().await, "phi").await;
    // ext:x is bound to nothing: its token proves who it is and grants nothing.
    let ext = mint_token(&arca, "ext:x", &[]).await;
    assert_code(get_phi(&arca, &ext).await, Code::PermissionDenied, "ext:x");

    // 1. A role grant inserted for ext:x (the statement, with the new columns
    //    left to their defaults).
    one(
        &arca,
        "INSERT INTO role_grants (id, principal, role, kind, reason, request_id, created_at, \
         expires_at) VALUES ('g1','ext:x','admin','elevation','x',NULL,0,9999999999999)",
    );
    tokio::time::sleep(SETTLE).await;
    assert_code(
        get_phi(&arca, &ext).await,
        Code::PermissionDenied,
        "an inserted grant",
    );
    still_serving(&arca, "an inserted grant").await;

    // 2. A newer access-policy version binding ext:x to a role that reads every key,
    //    with no MAC, then with the MAC of a version the node stamped.
    let policy = "version = 1\n[roles.all]\n[[roles.all.allow]]\noperations = [\"GetKey\"]\n\
                  keys = [\"*\"]\n[[bindings]]\nprincipals = [\"ext:x\", \"dev-admin\"]\n\
                  roles = [\"all\"]\n";
    one(
        &arca,
        &format!(
            "INSERT INTO access_policies (seq, text, request_id, created_at) \
             VALUES (1, '{policy}', NULL, 0)"
        ),
    );
    tokio::time::sleep(SETTLE).await;
    assert_code(
        get_phi(&arca, &ext).await,
        Code::PermissionDenied,
        "an inserted policy",
    );
    still_serving(&arca, "an inserted policy").await;

    // 3. A token row carrying a hash the attacker chose, unstamped, and with the dev
    //    admin token's MAC copied onto it.
    let admin_mac = one(
        &arca,
        "SELECT mac FROM tokens WHERE principal = 'dev-admin' AND revoked_at IS NULL",
    );
    assert_eq!(
        admin_mac.len(),
        64,
        "the admin token is stamped: {admin_mac}"
    );
    for (n, mac) in [(1, "NULL".to_string()), (2, format!("'{admin_mac}'"))] {
        let chosen = format!("arca_chosen_by_the_attacker_{n}");
        let hash = arca::secret::BearerToken::new(chosen.clone())
            .hash()
            .to_hex();
        one(
            &arca,
            &format!(
                "INSERT INTO tokens (id, token_hash, principal, roles, created_at, expires_at, \
                 revoked_at, key_globs, cidrs, bound_principal, description, state_seq, mac) \
                 VALUES ('tok_forged{n}', '{hash}', 'dev-admin', '', 0, NULL, NULL, '', '', \
                 NULL, '', 1, {mac})"
            ),
        );
        assert_forged(get_phi(&arca, &chosen).await, "a planted token");
    }

    // 4. A revoked token un-revoked.
    let svc = mint_token(&arca, "svc:y", &[]).await;
    let svc_id = token_id(&arca, "svc:y");
    arca.access(arca.token())
        .await
        .revoke_token(pb::RevokeTokenRequest { id: svc_id.clone() })
        .await
        .unwrap();
    one(
        &arca,
        &format!("UPDATE tokens SET revoked_at = NULL WHERE id = '{svc_id}'"),
    );
    tokio::time::sleep(SETTLE).await;
    assert_forged(
        arca.keys(svc.as_str())
            .await
            .list_keys(pb::ListKeysRequest::default())
            .await
            .map(|_| ()),
        "an un-revoked token",
    );

    // 5. ext:x's own row moved to the admin's principal, then a field changed under its
    //    valid MAC (its key globs widened back after narrowing).
    let ext_id = token_id(&arca, "ext:x");
    one(
        &arca,
        &format!("UPDATE tokens SET principal = 'dev-admin' WHERE id = '{ext_id}'"),
    );
    tokio::time::sleep(SETTLE).await;
    assert_forged(get_phi(&arca, &ext).await, "a token moved to the admin");
    one(
        &arca,
        &format!("UPDATE tokens SET principal = 'ext:x', roles = 'admin' WHERE id = '{ext_id}'"),
    );
    tokio::time::sleep(SETTLE).await;
    assert_forged(
        get_phi(&arca, &ext).await,
        "a field changed under a valid MAC",
    );
    // Put back as stamped, the row works again (for what it grants: nothing).
    one(
        &arca,
        &format!("UPDATE tokens SET roles = '' WHERE id = '{ext_id}'"),
    );
    tokio::time::sleep(SETTLE).await;
    assert_code(
        get_phi(&arca, &ext).await,
        Code::PermissionDenied,
        "ext:x again",
    );
    let s = get_phi(&arca, &ext).await.unwrap_err();
    assert_eq!(reason(&s), None, "the restored row verifies: {s:?}");

    still_serving(&arca, "every forgery").await;
    let log = arca.log_text();
    for table in ["role_grants", "access_policies", "tokens"] {
        assert!(
            log.lines()
                .any(|l| l.contains("state-forged") && l.contains(table)),
            "no alert line for {table}"
        );
    }
    let records = audit_records(&arca).await;
    for table in ["role_grants", "access_policies", "tokens"] {
        assert!(
            records
                .iter()
                .any(|(_, op, d)| op == "state.forged" && d.contains(&format!("table={table}"))),
            "no state.forged record for {table}"
        );
    }
    assert!(
        records
            .iter()
            .any(|(kind, _, d)| kind == "alert" && d.contains("rule=state_forged")),
        "no state_forged alert record"
    );
}

on_both_backends!(
    #[tokio::test]
    rows_stamped_by_the_node_survive_a_restart_and_an_approved_policy_stays_in_force
);

/// The honest path: what the node wrote verifies after a restart (the HSM key is found
/// again by its id): a token, and a policy stored without approval (dev mode's 1-of-1),
/// which stays in force.
async fn rows_stamped_by_the_node_survive_a_restart_and_an_approved_policy_stays_in_force(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    create_key(&mut arca.client().await, "phi").await;
    let svc = mint_token(&arca, "svc:z", &[]).await;
    let ext = mint_token(&arca, "ext:w", &[]).await;
    assert_code(get_phi(&arca, &ext).await, Code::PermissionDenied, "before");
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policy = format!(
        "{}\n{}\n[roles.reader]\n[[roles.reader.allow]]\noperations = [\"GetKey\"]\n\
         keys = [\"*\"]\n[[bindings]]\nprincipals = [\"ext:w\"]\nroles = [\"reader\"]\n",
        std::fs::read_to_string(shipped.join("roles.toml")).unwrap(),
        std::fs::read_to_string(shipped.join("bindings.toml"))
            .unwrap()
            .replace("version = 1\n", "")
    );
    arca.access(arca.token())
        .await
        .update_policy(pb::UpdatePolicyRequest { policy })
        .await
        .unwrap();
    get_phi(&arca, &ext).await.unwrap();
    let mac = one(&arca, "SELECT mac FROM access_policies WHERE seq = 1");
    assert_eq!(mac.len(), 64, "the stored policy is stamped: {mac}");
    arca.restart().await;
    get_phi(&arca, arca.token()).await.unwrap();
    get_phi(&arca, &ext).await.unwrap();
    // svc:z is a service: it may list keys.
    arca.keys(svc.as_str())
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();
    assert!(!arca.all_logs().contains("state-forged"));
}

on_both_backends!(
    #[tokio::test]
    a_deleted_totp_enrolment_is_not_a_fresh_start
);

/// `DELETE FROM principal_totp` would make a key admin "never enrolled", and the first
/// enrolment needs no code: MFA gone. The HSM-stamped roster of enrolled principals says
/// otherwise: the MFA check and the new enrolment are refused, alerted, and other
/// principals keep working. Emptying the roster too is refused as well.
async fn a_deleted_totp_enrolment_is_not_a_fresh_start(db: Db) {
    let arca = TestArca::start_on(db).await;
    let ann = mint_token(&arca, "key-admin:ann", &[]).await;
    let bob = mint_token(&arca, "key-admin:bob", &[]).await;
    let enroll = |token: String| {
        let arca = &arca;
        async move {
            arca.access(token.as_str())
                .await
                .enroll_totp(pb::EnrollTotpRequest {})
                .await
                .map(|r| r.into_inner().totp_uri)
        }
    };
    let create = |token: String, name: &'static str| {
        let arca = &arca;
        async move {
            arca.keys(token.as_str())
                .await
                .create_key(pb::CreateKeyRequest {
                    name: name.into(),
                    description: String::new(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
        }
    };
    enroll(ann.clone()).await.unwrap();
    one(
        &arca,
        "DELETE FROM principal_totp WHERE principal = 'key-admin:ann'",
    );
    assert_forged(create(ann.clone(), "k1").await, "MFA after the deletion");
    assert_forged(
        enroll(ann.clone()).await.map(|_| ()),
        "enrolling again without a code",
    );
    // Someone never enrolled is told to enrol, and may.
    let s = assert_code(
        create(bob.clone(), "k2").await,
        Code::Unauthenticated,
        "bob",
    );
    assert_eq!(reason(&s), Some("MFA_NOT_ENROLLED"), "{s:?}");
    enroll(bob.clone()).await.unwrap();
    // The roster emptied and its MAC dropped: nothing that depends on it is trusted.
    one(&arca, "UPDATE state_rosters SET members = '', mac = NULL");
    assert_forged(
        enroll(ann.clone()).await.map(|_| ()),
        "enrolling with the roster emptied",
    );
    still_serving_keys(&arca).await;
    assert!(arca
        .log_text()
        .lines()
        .any(|l| l.contains("state-forged") && l.contains("principal_totp")));
}

/// The dev admin still creates keys.
async fn still_serving_keys(arca: &TestArca) {
    create_key(&mut arca.client().await, "still-serving").await;
}

on_both_backends!(
    #[tokio::test]
    a_version_enabled_by_a_database_writer_does_not_unwrap
);

/// `UPDATE key_versions SET state = 'ENABLED'` undoes a disable (the triggers allow that
/// edge). Only the HSM's MAC makes a version ENABLED: the unwrap is refused as forged,
/// and so is a version given another version's MAC; other keys keep working, and an
/// enable through the API works again.
async fn a_version_enabled_by_a_database_writer_does_not_unwrap(db: Db) {
    let arca = TestArca::start_on(db).await;
    let mut c = arca.client().await;
    create_key(&mut c, "phi").await;
    create_key(&mut c, "other").await;
    let context = crate::support::ctx(&[("patient", "1")]);
    let phi_blob = crate::support::generate_wrapped(&mut c, "phi", &context).await;
    let other_blob = crate::support::generate_wrapped(&mut c, "other", &context).await;
    let disable = |name: &'static str| {
        let arca = &arca;
        async move {
            arca.client()
                .await
                .disable_key_version(pb::KeyVersionRequest {
                    name: name.into(),
                    version: 1,
                })
                .await
                .unwrap();
        }
    };
    disable("phi").await;
    one(
        &arca,
        "UPDATE key_versions SET state = 'ENABLED' WHERE version = 1 AND key_id = \
         (SELECT id FROM keys WHERE name = 'phi')",
    );
    tokio::time::sleep(SETTLE).await;
    let r = crate::support::unwrap(&mut c, &phi_blob, &context).await;
    assert_forged(r.map(|_| ()), "a version enabled in the database");
    // Wraps under it are refused too.
    let r = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "phi".into(),
            context: context.clone(),
            without_plaintext: true,
        })
        .await;
    assert_forged(
        r.map(|_| ()),
        "a wrap under a version enabled in the database",
    );
    // The other key is untouched.
    crate::support::unwrap(&mut c, &other_blob, &context)
        .await
        .unwrap();

    // Another version's MAC (other's v1, ENABLED and stamped) copied onto phi's v1, with
    // its sequence.
    one(
        &arca,
        "UPDATE key_versions SET mac = (SELECT v.mac FROM key_versions v JOIN keys k \
         ON k.id = v.key_id WHERE k.name = 'other' AND v.version = 1), state_seq = 1 \
         WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = 'phi')",
    );
    tokio::time::sleep(SETTLE).await;
    let r = crate::support::unwrap(&mut c, &phi_blob, &context).await;
    assert_forged(r.map(|_| ()), "a MAC copied from another key's version");

    // Put back to DISABLED by the writer, then enabled through the API: it works.
    one(
        &arca,
        "UPDATE key_versions SET state = 'DISABLED' WHERE version = 1 AND key_id = \
         (SELECT id FROM keys WHERE name = 'phi')",
    );
    tokio::time::sleep(SETTLE).await;
    c.enable_key_version(pb::KeyVersionRequest {
        name: "phi".into(),
        version: 1,
    })
    .await
    .unwrap();
    crate::support::unwrap(&mut c, &phi_blob, &context)
        .await
        .unwrap();
    assert!(arca
        .log_text()
        .lines()
        .any(|l| l.contains("state-forged") && l.contains("key_versions")));
}

on_both_backends!(
    #[tokio::test]
    a_destruction_scheduled_or_hastened_by_a_database_writer_destroys_nothing
);

/// Crypto-shredding is irreversible, so the destroyer acts only on a schedule the HSM
/// stamped (a retirement this service made). A database writer who schedules a version
/// (DISABLED → SCHEDULED_FOR_DESTRUCTION is a legal edge) or moves a real retirement's
/// date to now gets nothing destroyed; the alert fires; put back, both versions unwrap.
/// A real retirement that is due is still destroyed.
async fn a_destruction_scheduled_or_hastened_by_a_database_writer_destroys_nothing(db: Db) {
    let (_dir, arca) = with_fast_jobs(db, "7d").await;
    let mut c = arca.client().await;
    let context = crate::support::ctx(&[("patient", "1")]);
    for name in ["phi", "lab", "old"] {
        create_key(&mut c, name).await;
    }
    let blob = |name: &'static str| {
        let arca = &arca;
        let context = context.clone();
        async move { crate::support::generate_wrapped(&mut arca.client().await, name, &context).await }
    };
    let (phi, lab, old) = (blob("phi").await, blob("lab").await, blob("old").await);
    for name in ["phi", "lab", "old"] {
        c.rotate_key(pb::RotateKeyRequest { name: name.into() })
            .await
            .unwrap();
    }
    let retire = |name: &'static str, wait_s: u64| {
        let arca = &arca;
        async move {
            arca.client()
                .await
                .retire_key_version(pb::RetireKeyVersionRequest {
                    name: name.into(),
                    version: 1,
                    waiting_period_seconds: wait_s,
                })
                .await
                .unwrap();
        }
    };
    // phi v1: disabled by the API, then "scheduled" by the writer, due at once.
    c.disable_key_version(pb::KeyVersionRequest {
        name: "phi".into(),
        version: 1,
    })
    .await
    .unwrap();
    let v1 = |name: &str| {
        format!("version = 1 AND key_id = (SELECT id FROM keys WHERE name = '{name}')")
    };
    one(
        &arca,
        &format!(
            "UPDATE key_versions SET state = 'SCHEDULED_FOR_DESTRUCTION', destroy_at = 0 \
             WHERE {}",
            v1("phi")
        ),
    );
    // lab v1: retired for an hour by the API, then moved to now by the writer.
    retire("lab", 3600).await;
    one(
        &arca,
        &format!("UPDATE key_versions SET destroy_at = 0 WHERE {}", v1("lab")),
    );
    // old v1: retired for 1 s by the API: the destroyer must still do its job.
    retire("old", 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let state = |name: &str| {
        one(
            &arca,
            &format!("SELECT state FROM key_versions WHERE {}", v1(name)),
        )
    };
    while state("old") != "DESTROYED" {
        assert!(
            std::time::Instant::now() < deadline,
            "the real retirement never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several more passes of the destroyer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state("phi"), "SCHEDULED_FOR_DESTRUCTION");
    assert_eq!(state("lab"), "SCHEDULED_FOR_DESTRUCTION");
    let log = arca.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("state-forged") && l.contains("key_versions"))
            .count()
            >= 2,
        "no alert for the forged schedules"
    );
    // Put back by the writer (DISABLED) and enabled through the API: both unwrap, so
    // their HSM objects were never destroyed. The real retirement's blob is gone.
    for name in ["phi", "lab"] {
        one(
            &arca,
            &format!(
                "UPDATE key_versions SET state = 'DISABLED', destroy_at = NULL, \
                 retire_request = NULL WHERE {}",
                v1(name)
            ),
        );
        c.enable_key_version(pb::KeyVersionRequest {
            name: name.into(),
            version: 1,
        })
        .await
        .unwrap();
    }
    for (name, b) in [("phi", &phi), ("lab", &lab)] {
        crate::support::unwrap(&mut c, b, &context)
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"));
    }
    let s = crate::support::unwrap(&mut c, &old, &context)
        .await
        .unwrap_err();
    assert_eq!(reason(&s), Some("VERSION_DESTROYED"), "{s:?}");
}

on_both_backends!(
    #[tokio::test]
    a_retention_date_set_by_a_database_writer_schedules_nothing
);

/// A retention date is authority to destroy a whole key. One written by a database writer
/// (`UPDATE keys SET retain_until = 0`) carries no MAC: the retention job refuses it and
/// raises the alert, and the key keeps working; a date set through the API still
/// destroys its key.
async fn a_retention_date_set_by_a_database_writer_schedules_nothing(db: Db) {
    let (_dir, arca) = with_fast_jobs(db, "1s").await;
    let mut c = arca.client().await;
    create_key(&mut c, "phi").await;
    let context = crate::support::ctx(&[("patient", "1")]);
    let blob = crate::support::generate_wrapped(&mut c, "phi", &context).await;
    one(&arca, "UPDATE keys SET retain_until = 0 WHERE name = 'phi'");
    c.create_key(pb::CreateKeyRequest {
        name: "expired".into(),
        retain_until: "2020-01-01T00:00:00Z".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let state = |name: &str| {
        one(
            &arca,
            &format!(
                "SELECT v.state FROM key_versions v JOIN keys k ON k.id = v.key_id \
                 WHERE k.name = '{name}' AND v.version = 1"
            ),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state("expired") != "DESTROYED" {
        assert!(
            std::time::Instant::now() < deadline,
            "the real retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state("phi"), "ENABLED");
    crate::support::unwrap(&mut c, &blob, &context)
        .await
        .unwrap();
    assert!(arca
        .log_text()
        .lines()
        .any(|l| l.contains("state-forged") && l.contains("retain_until")));

    // A real retention date, applied and its retirement cancelled (by the API here), is
    // not applied again because a writer cleared `retention_applied_at`.
    c.create_key(pb::CreateKeyRequest {
        name: "kept".into(),
        retain_until: "2020-01-01T00:00:00Z".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state("kept") == "ENABLED" {
        assert!(
            std::time::Instant::now() < deadline,
            "the retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.cancel_retirement(pb::CancelRetirementRequest {
        name: "kept".into(),
        version: 0,
    })
    .await
    .unwrap();
    assert_eq!(state("kept"), "DISABLED");
    one(
        &arca,
        "UPDATE keys SET retention_applied_at = NULL WHERE name = 'kept'",
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state("kept"), "DISABLED", "the retention was applied again");
}

/// A dev server on `db` whose lifecycle jobs pass every 200 ms, with `wait` as the
/// default waiting period (the directory holds its lifecycle policy).
async fn with_fast_jobs(db: Db, wait: &str) -> (tempfile::TempDir, TestArca) {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::support::lifecycle_policy(dir.path(), wait, 1 << 30);
    let arca = TestArca::builder()
        .backend(db)
        .fast_jobs(&p, "2s")
        .start()
        .await;
    (dir, arca)
}

/// SQL that drops trigger `name` of `table` on either back end.
fn drop_trigger(db: Db, table: &str, name: &str) -> String {
    match db {
        Db::Sqlite => format!("DROP TRIGGER {name};"),
        Db::Postgres => format!("DROP TRIGGER {name} ON {table};"),
    }
}

on_both_backends!(
    #[tokio::test]
    identities_changed_under_the_triggers_move_no_rights_and_destroy_nothing
);

/// With the triggers that keep identities immutable dropped: a key renamed into a
/// caller's scope (to unwrap it there), a DISABLED version pointed at a system key's HSM
/// object (so that a real retirement would destroy that object), and a real
/// retirement's destruction marked as started early (to skip the waiting period). Each is
/// refused, alerted, and nothing is destroyed.
async fn identities_changed_under_the_triggers_move_no_rights_and_destroy_nothing(db: Db) {
    let (_dir, arca) = with_fast_jobs(db, "7d").await;
    let mut c = arca.client().await;
    let context = crate::support::ctx(&[("patient", "1")]);
    for name in ["phi", "billing/a", "lab", "late"] {
        create_key(&mut c, name).await;
    }
    let phi = crate::support::generate_wrapped(&mut c, "phi", &context).await;
    // A service token limited to billing/*.
    let billing = arca
        .access(arca.token())
        .await
        .create_token(pb::CreateTokenRequest {
            principal: "svc:billing".into(),
            key_globs: vec!["billing/*".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let unwrap_as = |token: String, blob: Vec<u8>| {
        let arca = &arca;
        let context = context.clone();
        async move {
            arca.keys(token.as_str())
                .await
                .unwrap_key(pb::UnwrapKeyRequest {
                    wrapped_key: blob,
                    context,
                })
                .await
                .map(|_| ())
        }
    };
    assert!(unwrap_as(billing.clone(), phi.clone()).await.is_err());
    // 1. phi renamed into billing/*.
    one(
        &arca,
        &format!(
            "{} UPDATE keys SET name = 'billing/zz' WHERE name = 'phi';",
            drop_trigger(db, "keys", "keys_immutable_identity")
        ),
    );
    tokio::time::sleep(SETTLE).await;
    assert_forged(
        unwrap_as(billing.clone(), phi.clone()).await,
        "a key renamed into the caller's scope",
    );
    // 2. lab v1 (DISABLED) pointed at the HSM object of arca:meta; then a real retirement.
    c.rotate_key(pb::RotateKeyRequest { name: "lab".into() })
        .await
        .unwrap();
    c.disable_key_version(pb::KeyVersionRequest {
        name: "lab".into(),
        version: 1,
    })
    .await
    .unwrap();
    one(
        &arca,
        &format!(
            "{} UPDATE key_versions SET hsm_id = '617263613a6d6574613a763100000000' \
             WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = 'lab');",
            drop_trigger(db, "key_versions", "key_versions_immutable_identity")
        ),
    );
    let r = c
        .retire_key_version(pb::RetireKeyVersionRequest {
            name: "lab".into(),
            version: 1,
            waiting_period_seconds: 1,
        })
        .await
        .map(|_| ());
    assert_forged(r, "a retirement of a version pointed at a system key");
    // 3. late v1 retired for an hour, its destruction marked as started.
    c.rotate_key(pb::RotateKeyRequest {
        name: "late".into(),
    })
    .await
    .unwrap();
    c.retire_key_version(pb::RetireKeyVersionRequest {
        name: "late".into(),
        version: 1,
        waiting_period_seconds: 3600,
    })
    .await
    .unwrap();
    one(
        &arca,
        "UPDATE key_versions SET destroying_at = 1 WHERE version = 1 AND key_id = \
         (SELECT id FROM keys WHERE name = 'late')",
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late_state = one(
        &arca,
        "SELECT state FROM key_versions WHERE version = 1 AND key_id = \
         (SELECT id FROM keys WHERE name = 'late')",
    );
    assert_eq!(late_state, "SCHEDULED_FOR_DESTRUCTION");
    // The system key is intact: a TOTP enrolment (sealed under arca:meta) still works.
    let ann = mint_token(&arca, "key-admin:ann", &[]).await;
    arca.access(ann.as_str())
        .await
        .enroll_totp(pb::EnrollTotpRequest {})
        .await
        .unwrap();
    let log = arca.log_text();
    for what in ["keys", "hsm_id", "destroying_at"] {
        assert!(
            log.lines()
                .any(|l| l.contains("state-forged") && l.contains(what)),
            "no alert for {what}"
        );
    }
}
