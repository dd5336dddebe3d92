//! No secret reaches the disk or the log: the database (the SQLite files, or a dump of the
//! PostgreSQL database) never holds a data key plaintext (nor caller-supplied key
//! material, the dev token or the HSM PIN), and the server log never holds those nor
//! encryption context values, nor the database password.

use std::collections::HashSet;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tokio::task::JoinSet;

use crate::support::{contains, create_key, ctx, generate, random_bytes, unwrap, Db, TestArca};
use arca::grpc::pb;

/// Finds any of `needles` (all `len` bytes long) in `hay`.
fn find_any(hay: &[u8], needles: &HashSet<Vec<u8>>, len: usize) -> Option<usize> {
    hay.windows(len).position(|w| needles.contains(w))
}

/// The SQLite files of the data dir: arca.db, and its WAL and shared-memory files when
/// present. The WAL must be present while the server runs.
fn db_files(dir: &Path, running: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["arca.db", "arca.db-wal", "arca.db-shm", "arca.db-journal"] {
        match std::fs::read(dir.join(name)) {
            Ok(b) => out.push((name.to_string(), b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(
                    !(name == "arca.db" || (running && name == "arca.db-wal")),
                    "{name} missing"
                );
            }
            Err(e) => panic!("read {name}: {e}"),
        }
    }
    out
}

/// What the database holds: the SQLite files, or a data dump of the PostgreSQL database
/// (on which the data dir holds no database file at all).
fn stored_state(arca: &TestArca, running: bool) -> Vec<(String, Vec<u8>)> {
    match arca.postgres() {
        None => db_files(arca.data_dir(), running),
        Some(pg) => {
            for name in ["arca.db", "arca.db-wal"] {
                assert!(
                    !arca.data_dir().join(name).exists(),
                    "{name} made although the database is PostgreSQL"
                );
            }
            vec![("pg_dump".to_string(), pg.dump())]
        }
    }
}

on_both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_database_never_holds_data_keys_or_the_token
);

async fn the_database_never_holds_data_keys_or_the_token(db: Db) {
    let mut arca = TestArca::start_on(db).await;
    let c = arca.client().await;
    create_key(&mut c.clone(), "at-rest").await;
    create_key(&mut c.clone(), "at-rest-2").await;

    // Many data keys, under two keys, with and without context, and across a rotation.
    let mut plaintexts: HashSet<Vec<u8>> = HashSet::new();
    let mut set = JoinSet::new();
    for i in 0..8 {
        let mut c = c.clone();
        set.spawn(async move {
            let mut got = Vec::new();
            for n in 0..40 {
                let name = if n % 2 == 0 { "at-rest" } else { "at-rest-2" };
                let context = ctx(&[("worker", &i.to_string()), ("n", &n.to_string())]);
                let dk = generate(&mut c, name, &context).await;
                got.push(dk.plaintext);
            }
            got
        });
    }
    crate::support::rotate(&mut c.clone(), "at-rest").await;
    while let Some(r) = set.join_next().await {
        plaintexts.extend(r.expect("join"));
    }
    assert_eq!(plaintexts.len(), 320, "duplicate data keys");
    // Caller-supplied key material too (its first 32 bytes are searched for).
    let mut materials = Vec::new();
    for _ in 0..16 {
        let m = random_bytes(64);
        let w = c
            .clone()
            .wrap_key(pb::WrapKeyRequest {
                key_name: "at-rest".into(),
                plaintext: m.clone(),
                context: ctx(&[]),
            })
            .await
            .expect("WrapKey")
            .into_inner();
        let u = unwrap(&mut c.clone(), &w.wrapped_key, &ctx(&[]))
            .await
            .expect("unwrap");
        assert_eq!(u.plaintext, m);
        plaintexts.insert(m[..32].to_vec());
        plaintexts.insert(m[32..].to_vec());
        materials.push(m);
    }

    let token = arca.token().to_string();
    let pin = std::fs::read_to_string(arca.data_dir().join("hsm-pin"))
        .expect("pin")
        .trim()
        .to_string();
    let so_pin = std::fs::read_to_string(arca.data_dir().join("hsm-so-pin"))
        .expect("so pin")
        .trim()
        .to_string();
    let check = |files: Vec<(String, Vec<u8>)>, when: &str| {
        for (name, bytes) in files {
            if let Some(at) = find_any(&bytes, &plaintexts, 32) {
                panic!("{name} ({when}) holds a data key plaintext at offset {at}");
            }
            assert!(
                !contains(&bytes, token.as_bytes()),
                "{name} ({when}) holds the dev token"
            );
            // The token's random part alone, in case it is stored without its prefix.
            assert!(
                !contains(&bytes, &token.as_bytes()["arca_".len()..]),
                "{name} ({when}) holds the dev token's secret part"
            );
            assert!(
                !contains(&bytes, pin.as_bytes()),
                "{name} ({when}) holds the HSM user PIN"
            );
            assert!(
                !contains(&bytes, so_pin.as_bytes()),
                "{name} ({when}) holds the HSM SO PIN"
            );
        }
    };
    let stored = stored_state(&arca, true);
    assert!(
        stored.iter().any(|(_, b)| contains(b, b"at-rest-2")),
        "the scan does not see the stored keys"
    );
    check(stored, "while running");
    let status = arca.stop().await;
    assert!(status.success(), "exit on SIGTERM: {status}");
    check(stored_state(&arca, false), "after shutdown");
    check(
        vec![("the server log".to_string(), arca.all_logs().into_bytes())],
        "any run",
    );
}

on_both_backends!(
    #[tokio::test]
    the_server_log_holds_no_key_material_tokens_or_context_values
);

async fn the_server_log_holds_no_key_material_tokens_or_context_values(db: Db) {
    // Verbose logging of Arca's own crates, as an operator debugging an incident would use.
    let arca = TestArca::builder()
        .backend(db)
        .env("RUST_LOG", "info,arca=debug,arca_hsm=debug")
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "logged").await;
    const SECRET_VALUE: &str = "patient-9f3e2d1c-context-value";
    let context = ctx(&[("patient", SECRET_VALUE)]);
    let mut plaintexts = Vec::new();
    for _ in 0..20 {
        let dk = generate(&mut c, "logged", &context).await;
        unwrap(&mut c, &dk.wrapped_key, &context)
            .await
            .expect("unwrap");
        // Failures are logged too: the wrong context must not be echoed either.
        let wrong = ctx(&[("patient", &format!("{SECRET_VALUE}-wrong"))]);
        let _ = unwrap(&mut c, &dk.wrapped_key, &wrong).await;
        plaintexts.push(dk.plaintext);
    }
    let material = random_bytes(48);
    c.wrap_key(pb::WrapKeyRequest {
        key_name: "logged".into(),
        plaintext: material.clone(),
        context: context.clone(),
    })
    .await
    .expect("WrapKey");
    plaintexts.push(material);
    let mut anon = arca
        .client_with_header(Some("Bearer arca_guessedtokenvalue123"))
        .await;
    let _ = anon
        .get_key(pb::GetKeyRequest {
            name: "logged".into(),
        })
        .await;

    let log = arca.log_text();
    assert!(log.contains("listening"), "the log was captured");
    assert!(!log.contains(SECRET_VALUE), "a context value is in the log");
    assert!(!log.contains(arca.token()), "the dev token is in the log");
    assert!(
        !log.contains("arca_guessedtokenvalue123"),
        "a presented token is in the log"
    );
    let pin = std::fs::read_to_string(arca.data_dir().join("hsm-pin")).expect("pin");
    assert!(!log.contains(pin.trim()), "the HSM PIN is in the log");
    if let Some(pg) = arca.postgres() {
        let password = pg.password().expect("the test URL carries a password");
        assert!(
            !log.contains(password),
            "the database password is in the log"
        );
        assert!(
            log.contains("[REDACTED]@"),
            "the database URL is not logged (redacted): {log}"
        );
    }
    for p in &plaintexts {
        for (enc, form) in [(B64.encode(p), "base64"), (hex::encode(p), "hex")] {
            assert!(!log.contains(&enc), "key material ({form}) is in the log");
        }
        assert!(
            !contains(log.as_bytes(), p),
            "raw key material is in the log"
        );
        // Debug-formatted byte arrays, e.g. [12, 200, ...].
        let debug = format!("{:?}", &p[..8]);
        let debug = &debug[..debug.len() - 1];
        assert!(!log.contains(debug), "key material (Debug) is in the log");
    }
}

#[tokio::test]
async fn the_data_dir_and_its_secrets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let arca = TestArca::start().await;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dir = arca.data_dir();
    assert_eq!(mode(dir), 0o700, "data dir mode");
    for f in ["dev-token", "hsm-pin", "hsm-so-pin"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f} mode");
    }
    let tokens = dir.join("tokens");
    assert_eq!(
        mode(&tokens) & 0o077,
        0,
        "token dir readable by others: {:o}",
        mode(&tokens)
    );
}
