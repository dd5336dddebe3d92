//! The back ends of the tests: which one a server runs on ([`Db`]), a fresh PostgreSQL
//! database per server ([`PgDatabase`]) on the server at `ARCA_TEST_POSTGRES_URL`, a
//! private PostgreSQL cluster a test may stop and start ([`PrivatePg`]), and the database
//! shells ([`psql_query`], [`sqlite_query`]) through which tests look at what is stored, as someone with
//! access to the database would (no Arca code involved).
//!
//! A [`PgDatabase`] is created and dropped with `psql`, and handed to the server with a
//! password added (the test cluster trusts loopback and ignores it) so that tests can
//! check it never reaches a log. Imports nothing of the other support files.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{note, random_bytes};

/// Which database a test server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    /// `DIR/arca.db`.
    Sqlite,
    /// A fresh database on the server at `ARCA_TEST_POSTGRES_URL`.
    Postgres,
}

impl Default for Db {
    /// The back end of tests that do not name one: SQLite, or PostgreSQL with
    /// `ARCA_TEST_DB=postgres` (how `scripts/test` runs the suite a second time). Tests
    /// that look inside the SQLite file name `Db::Sqlite`.
    fn default() -> Self {
        match std::env::var("ARCA_TEST_DB").as_deref() {
            Ok("postgres") => {
                assert!(
                    postgres_url("ARCA_TEST_DB=postgres").is_some(),
                    "ARCA_TEST_DB=postgres needs ARCA_TEST_POSTGRES_URL"
                );
                Db::Postgres
            }
            _ => Db::Sqlite,
        }
    }
}

/// The PostgreSQL server of the tests, or `None` after a SKIP line for `test`. Panics
/// when it is missing and `ARCA_REQUIRE_POSTGRES=1`.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("ARCA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("ARCA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "ARCA_REQUIRE_POSTGRES=1 but ARCA_TEST_POSTGRES_URL is not set"
            );
            note(&format!("SKIP {test}: ARCA_TEST_POSTGRES_URL is not set"));
            None
        }
    }
}

/// A `postgres://` URL taken apart: (scheme, authority, `?query` or "").
pub(super) fn split_url(url: &str) -> (&str, &str, String) {
    let (scheme, rest) = url.split_once("://").expect("postgres:// URL");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    (scheme, authority, query)
}

/// A database of its own on the test PostgreSQL server, dropped (with `FORCE`, so even
/// a killed server's connections go) when the last `TestArca` using it is dropped.
pub struct PgDatabase {
    admin_url: String,
    url: String,
    name: String,
    password: Option<String>,
}

impl PgDatabase {
    /// Creates `arca_it_<random>`. Panics without `ARCA_TEST_POSTGRES_URL`.
    pub fn create() -> PgDatabase {
        let admin_url = std::env::var("ARCA_TEST_POSTGRES_URL")
            .expect("ARCA_TEST_POSTGRES_URL (a Db::Postgres test without a server)");
        let name = format!("arca_it_{}", hex::encode(random_bytes(8)));
        psql_query(&admin_url, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let (scheme, authority, query) = split_url(&admin_url);
        // A password the trusting test cluster ignores, where the URL names a user but no
        // password, so tests can look for it in logs.
        let (authority, password) = match authority.rsplit_once('@') {
            Some((user, host)) if !user.contains(':') => {
                let pw = format!("itpw-{}", hex::encode(random_bytes(8)));
                (format!("{user}:{pw}@{host}"), Some(pw))
            }
            _ => (authority.to_string(), None),
        };
        let url = format!("{scheme}://{authority}/{name}{query}");
        PgDatabase {
            admin_url,
            url,
            name,
            password,
        }
    }

    /// The URL the server gets.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The password in [`PgDatabase::url`], if the support added one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Drops the database (with `FORCE`) and creates it again, empty: a lost database.
    pub fn recreate(&self) {
        for stmt in [
            format!("DROP DATABASE {} WITH (FORCE)", self.name),
            format!("CREATE DATABASE {}", self.name),
        ] {
            psql_query(&self.admin_url, &stmt).unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
    }

    /// A plain-text dump of the database's data (`pg_dump --data-only`).
    pub fn dump(&self) -> Vec<u8> {
        let (scheme, authority, query) = split_url(&self.admin_url);
        let db_url = format!("{scheme}://{authority}/{}{query}", self.name);
        let out = Command::new("pg_dump")
            .args(["--data-only", "--no-owner", "--dbname"])
            .arg(&db_url)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql_query(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs SQL with `psql` on the database at `url` and returns its output unaligned
/// (`a|b` per row), trimmed; or psql's error output.
pub fn psql_query(url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(url)
        .arg("-c")
        .arg(sql);
    query(cmd, "psql (the PostgreSQL client)")
}

/// Runs SQL with the `sqlite3` shell on the SQLite file `file` (waiting up to 10 s for a
/// lock) and returns its output (`a|b` per row), trimmed; or its error output.
pub fn sqlite_query(file: &Path, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("sqlite3");
    cmd.arg("-cmd").arg(".timeout 10000").arg(file).arg(sql);
    query(cmd, "sqlite3 (apt-get install sqlite3)")
}

/// Runs a database shell to completion: its stdout, trimmed, or its stderr when it
/// failed or reported an error.
fn query(mut cmd: Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    if out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Error") {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A private PostgreSQL cluster (`scripts/throwaway-postgres`), stopped and removed on
/// drop, so that a test can stop and start its database without touching the one the
/// other tests share.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    url: String,
}

impl PrivatePg {
    /// `scripts/throwaway-postgres CMD DIR/pg`; its output, trimmed.
    fn run(cmd: &str, dir: &Path) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/throwaway-postgres");
        let out = Command::new(script)
            .arg(cmd)
            .arg(dir.join("pg"))
            .stdin(Stdio::null())
            .output()
            .expect("scripts/throwaway-postgres");
        assert!(
            out.status.success(),
            "throwaway-postgres {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts a cluster in a new temporary directory.
    pub fn start() -> PrivatePg {
        let dir = tempfile::Builder::new()
            .prefix("arca-it-pg-")
            .tempdir()
            .unwrap();
        // The postgres user (when run as root) must reach the directory.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let url = Self::run("start", dir.path());
        PrivatePg { dir, url }
    }

    /// The cluster's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the cluster (fast shutdown), off the async runtime.
    pub async fn stop(&self) {
        let dir = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || PrivatePg::run("stop", &dir))
            .await
            .unwrap();
    }

    /// Starts the stopped cluster again, off the async runtime.
    pub async fn resume(&self) {
        let dir = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || PrivatePg::run("resume", &dir))
            .await
            .unwrap();
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        Self::run("remove", self.dir.path());
    }
}
