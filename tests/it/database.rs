//! `--database` / `ARCA_DATABASE_URL`: where the state goes, and that a URL's password
//! never reaches an error, a log line or `--help`.

use std::process::Output;

use crate::support::{arca_command, create_key, ctx, generate, output_of, unwrap, TestArca};

const PASSWORD: &str = "pw-5f1c-never-shown";

/// Runs `arca ARGS` in dev mode on a fresh data dir with `env`, to completion.
async fn run_arca(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut cmd = arca_command();
    cmd.args(args)
        .arg("--data-dir")
        .arg(&data_dir)
        .envs(env.iter().copied());
    let out = output_of(cmd).await;
    drop(dir);
    out
}

#[tokio::test]
async fn database_errors_never_quote_the_url_or_its_password() {
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // An unsupported scheme, on the command line: refused before anything starts.
    let url = format!("mysql://arca:{PASSWORD}@127.0.0.1/arca");
    let out = run_arca(&["server", "--dev", "--database", &url], &[]).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("\"mysql\""), "the scheme is not named: {all}");
    assert!(!all.contains(PASSWORD), "the password was printed: {all}");
    assert!(!all.contains("listening"), "it started anyway: {all}");

    // A PostgreSQL server that is not there (nothing listens on port 1), from the
    // environment: the start fails, naming the database only redacted.
    let url = format!("postgres://arca:{PASSWORD}@127.0.0.1:1/arca?password={PASSWORD}");
    let out = run_arca(&["server", "--dev"], &[("ARCA_DATABASE_URL", &url)]).await;
    let all = text(&out);
    assert!(!out.status.success(), "started without a database: {all}");
    assert!(!all.contains("listening"), "it listened anyway: {all}");
    assert!(!all.contains(PASSWORD), "the password was printed: {all}");
    assert!(
        all.contains("cannot open the database postgres://arca:[REDACTED]@127.0.0.1:1/arca"),
        "the failure does not name the database (redacted): {all}"
    );

    // --help shows the variable but not its value.
    let out = run_arca(&["server", "--help"], &[("ARCA_DATABASE_URL", &url)]).await;
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("ARCA_DATABASE_URL"), "{all}");
    assert!(!all.contains(PASSWORD), "--help shows the password: {all}");
}

#[tokio::test]
async fn a_sqlite_database_goes_where_the_flag_says() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let file = elsewhere.path().join("state.db");
    let mut arca = TestArca::builder()
        .arg("--database")
        .arg(format!("sqlite://{}", file.display()))
        .start()
        .await;
    let mut c = arca.client().await;
    create_key(&mut c, "placed").await;
    let context = ctx(&[]);
    let dk = generate(&mut c, "placed", &context).await;
    assert!(file.is_file(), "no database at {}", file.display());
    assert!(
        !arca.data_dir().join("arca.db").exists(),
        "the default database was made too"
    );
    drop(c);
    arca.restart().await;
    let mut c = arca.client().await;
    let u = unwrap(&mut c, &dk.wrapped_key, &context)
        .await
        .expect("unwrap after restart");
    assert_eq!(u.plaintext, dk.plaintext);
}

/// `url` with its user info replaced by `user` (no password: the test cluster trusts).
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("postgres:// URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}@{host}")
}

/// `url` with the value of its `sslrootcert` parameter replaced by `ca`.
fn with_root_cert(url: &str, ca: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .expect("the test URL has TLS parameters");
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some(("sslrootcert", _)) => format!("sslrootcert={ca}"),
            _ => p.to_string(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// The test cluster serves TLS only (scripts/lib.sh): Arca's connections are encrypted
/// and checked against the CA in `sslrootcert`; pointed at another CA, the node refuses
/// to start, says why, and never quotes the password.
#[tokio::test]
async fn postgres_over_tls_is_verified_and_another_ca_is_refused() {
    let Some(admin) = crate::support::postgres_url("postgres_over_tls") else {
        return;
    };
    assert!(
        admin.contains("sslmode=verify-full") && admin.contains("sslrootcert="),
        "the test cluster's URL does not ask for verified TLS: {admin}"
    );
    let arca = TestArca::start_on(crate::support::Db::Postgres).await;
    let pg = arca.postgres().expect("a PostgreSQL server");
    let name = pg.url().split('/').nth(3).and_then(|s| s.split('?').next());
    let name = name.expect("database name").to_string();
    let sessions = crate::support::database::psql_query(
        &admin,
        &format!(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = '{name}'"
        ),
    )
    .expect("read pg_stat_ssl");
    let (tls, plain) = sessions.split_once('|').expect("two counts");
    assert!(
        tls.parse::<u32>().unwrap_or(0) > 0,
        "no TLS session: {sessions}"
    );
    assert_eq!(plain, "0", "plaintext sessions: {sessions}");

    let other_ca = std::env::var("ARCA_TEST_POSTGRES_OTHER_CA")
        .expect("ARCA_TEST_POSTGRES_OTHER_CA (scripts/lib.sh start_throwaway_postgres)");
    let url = with_root_cert(pg.url(), &other_ca);
    let out = run_arca(&["server", "--dev"], &[("ARCA_DATABASE_URL", &url)]).await;
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "started against an unknown CA: {all}"
    );
    assert!(!all.contains("listening"), "it listened anyway: {all}");
    assert!(
        all.contains("certificate"),
        "the failure does not say the certificate was refused: {all}"
    );
    if let Some(password) = pg.password() {
        assert!(!all.contains(password), "the password was printed: {all}");
    }
}

/// A URL to a host off this machine must ask for `sslmode=verify-full`; anything else is
/// refused before a connection is tried (192.0.2.7 is TEST-NET-1: nothing answers there).
#[tokio::test]
async fn a_remote_database_without_verified_tls_is_refused_before_connecting() {
    for url in [
        format!("postgres://arca:{PASSWORD}@192.0.2.7/arca"),
        format!("postgres://arca:{PASSWORD}@192.0.2.7/arca?sslmode=require"),
    ] {
        let started = std::time::Instant::now();
        let out = run_arca(&["server", "--dev"], &[("ARCA_DATABASE_URL", &url)]).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "started: {all}");
        assert!(
            all.contains("sslmode=verify-full"),
            "no reason given: {all}"
        );
        assert!(!all.contains(PASSWORD), "the password was printed: {all}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "it tried to connect first"
        );
    }
}

/// docs/deployment.md: the runtime role may read and write rows but not change the
/// schema. A node runs under it once the migration role has migrated, and that role
/// cannot switch off or drop the triggers that keep versions and audit rows.
#[tokio::test]
async fn a_runtime_role_without_ddl_rights_serves_and_cannot_drop_triggers() {
    let Some(admin) = crate::support::postgres_url("runtime_role") else {
        return;
    };
    let mut arca = TestArca::start_on(crate::support::Db::Postgres).await;
    let mut c = arca.client().await;
    create_key(&mut c, "runtime").await;
    let context = ctx(&[("tenant", "t1")]);
    let dk = generate(&mut c, "runtime", &context).await;
    drop(c);
    let status = arca.stop().await;
    assert!(status.success(), "{status}");

    let pg_url = arca.postgres().expect("PostgreSQL").url().to_string();
    let role = format!("arca_rt_{}", hex::encode(crate::support::random_bytes(6)));
    let owner = |sql: &str| {
        crate::support::database::psql_query(&pg_url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    let _ = crate::support::database::psql_query(&admin, &format!("CREATE ROLE {role} LOGIN"))
        .expect("create the runtime role");
    owner(&format!(
        "GRANT USAGE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"
    ));
    let runtime_url = as_user(&pg_url, &role);

    arca.start_with(TestArca::builder().arg("--database").arg(&runtime_url))
        .await;
    let mut c = arca.client().await;
    let u = unwrap(&mut c, &dk.wrapped_key, &context)
        .await
        .expect("unwrap under the runtime role");
    assert_eq!(u.plaintext, dk.plaintext);
    create_key(&mut c, "runtime-2").await;
    drop(c);

    for sql in [
        "ALTER TABLE key_versions DISABLE TRIGGER ALL".to_string(),
        "DROP TRIGGER key_versions_no_delete ON key_versions".to_string(),
        "ALTER TABLE audit_log DISABLE TRIGGER USER".to_string(),
        "CREATE TABLE planted (x int)".to_string(),
    ] {
        let refused = crate::support::database::psql_query(&runtime_url, &sql);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("must be owner") || e.contains("permission denied")),
            "the runtime role could run {sql}: {refused:?}"
        );
    }
    let deleted = crate::support::database::psql_query(&runtime_url, "DELETE FROM key_versions");
    assert!(
        deleted.is_err(),
        "the runtime role deleted versions: {deleted:?}"
    );

    let status = arca.stop().await;
    assert!(status.success(), "{status}");
    owner(&format!("DROP OWNED BY {role}"));
    let _ = crate::support::database::psql_query(&admin, &format!("DROP ROLE {role}"));
}
