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
