//! Test support: [`TestArca`] runs the real `arca` binary in dev mode (real SoftHSM,
//! real SQLite or PostgreSQL) in its own temporary directory on a free loopback port, and
//! hands out connected gRPC clients that carry the dev token.
//!
//! Every `TestArca` owns exactly one child process at a time (the PID it spawned; `arca
//! server --dev` re-executes itself under the same PID) and kills only that PID when
//! dropped. Nothing here ships in the library.
//!
//! Back ends: [`Db::Sqlite`] is the data dir's `arca.db`. [`Db::Postgres`] is a fresh
//! database per `TestArca` (`arca_it_<random>`) on the server at `ARCA_TEST_POSTGRES_URL`,
//! created and dropped with `psql`, and handed to the server in `ARCA_DATABASE_URL` with a
//! password added (the test cluster trusts loopback and ignores it) so that tests can
//! check it never reaches a log. [`on_both_backends!`] turns one test body into
//! `NAME::sqlite` and `NAME::postgres`; without `ARCA_TEST_POSTGRES_URL` the PostgreSQL
//! variant prints a SKIP line and passes, unless `ARCA_REQUIRE_POSTGRES=1`. Every other
//! test runs on [`Db::default`]: SQLite, or PostgreSQL with `ARCA_TEST_DB=postgres`
//! (`scripts/test` runs the suite both ways).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::grpc::pb::key_service_client::KeyServiceClient;
use tempfile::TempDir;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The one message of every wrapped-key failure (DESIGN §4, habit 4).
pub const INVALID_WRAPPED: &str = "invalid wrapped key or encryption context";

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The path of the binary under test.
pub fn arca_bin() -> &'static str {
    env!("CARGO_BIN_EXE_arca")
}

/// Adds `authorization: <value>` to every request (or nothing, for `None`).
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A `KeyService` client with an authorization header (or none).
pub type KeyClient = KeyServiceClient<InterceptedService<Channel, Auth>>;

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

/// Writes one line to stderr past libtest's capture (which only sees the print macros),
/// so that it shows in a passing run.
pub fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
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

/// Runs a test body `async fn NAME(db: Db)` as two tests, `NAME::sqlite` and
/// `NAME::postgres`, with the given test attribute.
macro_rules! on_both_backends {
    (#[$test:meta] $name:ident) => {
        mod $name {
            #[$test]
            async fn sqlite() {
                super::$name($crate::support::Db::Sqlite).await;
            }

            #[$test]
            async fn postgres() {
                if $crate::support::postgres_url(concat!(module_path!(), "::postgres")).is_some() {
                    super::$name($crate::support::Db::Postgres).await;
                }
            }
        }
    };
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
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let (scheme, rest) = admin_url.split_once("://").expect("postgres:// URL");
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, format!("?{q}")),
            None => (rest, String::new()),
        };
        let authority = rest.split('/').next().unwrap_or_default();
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

    /// A plain-text dump of the database's data (`pg_dump --data-only`).
    pub fn dump(&self) -> Vec<u8> {
        let db_url = {
            let (scheme, rest) = self.admin_url.split_once("://").expect("URL");
            let (rest, query) = match rest.split_once('?') {
                Some((r, q)) => (r, format!("?{q}")),
                None => (rest, String::new()),
            };
            let authority = rest.split('/').next().unwrap_or_default();
            format!("{scheme}://{authority}/{}{query}", self.name)
        };
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
        let _ = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&self.admin_url)
            .arg("-c")
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs one SQL command with `psql` on the server at `url`; panics on failure.
pub fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(url)
        .arg("-c")
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .expect("run psql (the PostgreSQL client)");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Runs SQL on a SQLite file with the `sqlite3` shell, as someone with access to the
/// file would (no Arca code involved).
pub fn sqlite3(file: &Path, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .arg(file)
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Options of a server run.
#[derive(Clone, Default)]
pub struct Builder {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    db: Db,
}

impl Builder {
    /// The database back end (default [`Db::default`]).
    pub fn backend(mut self, db: Db) -> Self {
        self.db = db;
        self
    }

    /// An extra argument after `arca server --dev --data-dir DIR --listen 127.0.0.1:0`.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// An environment variable of the server process.
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts a server in a fresh temporary directory (and, on PostgreSQL, a fresh
    /// database).
    pub async fn start(self) -> TestArca {
        let root = tempfile::Builder::new()
            .prefix("arca-it-")
            .tempdir()
            .expect("temp dir");
        let data_dir = root.path().join("data");
        let pg = (self.db == Db::Postgres).then(|| Arc::new(PgDatabase::create()));
        let mut arca = TestArca {
            root: Arc::new(root),
            data_dir,
            opts: self,
            pg,
            node: 1,
            child: None,
            addr: None,
            token: String::new(),
            runs: 0,
            log: PathBuf::new(),
        };
        arca.spawn().await;
        arca
    }
}

/// A running `arca server --dev` and its data dir.
pub struct TestArca {
    root: Arc<TempDir>,
    data_dir: PathBuf,
    opts: Builder,
    pg: Option<Arc<PgDatabase>>,
    /// 1, or 2 for a second node on the same data dir and database.
    node: u32,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    token: String,
    runs: u32,
    log: PathBuf,
}

impl TestArca {
    /// Options for a server.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A dev server with default options.
    pub async fn start() -> TestArca {
        Builder::default().start().await
    }

    /// A dev server with default options on `db`.
    pub async fn start_on(db: Db) -> TestArca {
        Builder::default().backend(db).start().await
    }

    /// A second node: another `arca server --dev` process with the same options on the
    /// same data dir (so the same SoftHSM token, PINs and dev token) and the same
    /// database (on SQLite, the same file: two processes on one host).
    pub async fn second_node(&self) -> TestArca {
        let mut arca = TestArca {
            root: Arc::clone(&self.root),
            data_dir: self.data_dir.clone(),
            opts: self.opts.clone(),
            pg: self.pg.clone(),
            node: self.node + 1,
            child: None,
            addr: None,
            token: String::new(),
            runs: 0,
            log: PathBuf::new(),
        };
        arca.spawn().await;
        arca
    }

    /// A fresh server on a copy of this one's data dir (its SQLite file, SoftHSM token
    /// and PIN files) taken now, in a new temporary directory, with `opts`. SQLite only.
    pub async fn start_on_copy(&self, opts: Builder) -> TestArca {
        assert!(
            self.pg.is_none(),
            "a copy of the data dir holds only a SQLite database"
        );
        let root = tempfile::Builder::new()
            .prefix("arca-it-copy-")
            .tempdir()
            .expect("temp dir");
        let data_dir = root.path().join("data");
        copy_dir(&self.data_dir, &data_dir);
        let mut arca = TestArca {
            root: Arc::new(root),
            data_dir,
            opts,
            pg: None,
            node: 1,
            child: None,
            addr: None,
            token: String::new(),
            runs: 0,
            log: PathBuf::new(),
        };
        arca.spawn().await;
        arca
    }

    /// The SQLite database file of a dev server (DIR/arca.db).
    pub fn sqlite_file(&self) -> PathBuf {
        self.data_dir.join("arca.db")
    }

    /// The PostgreSQL database, on [`Db::Postgres`].
    pub fn postgres(&self) -> Option<&PgDatabase> {
        self.pg.as_deref()
    }

    /// Runs SQL on the server's database with the database's own shell (`sqlite3` on
    /// the file, `psql` on PostgreSQL), as someone with access to it would, and returns
    /// the output (`a|b` per row on both), trimmed.
    pub fn sql(&self, stmt: &str) -> Result<String, String> {
        let out = match &self.pg {
            Some(pg) => Command::new("psql")
                .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(pg.url())
                .arg("-c")
                .arg(stmt)
                .stdin(Stdio::null())
                .output(),
            None => Command::new("sqlite3")
                .arg("-cmd")
                .arg(".timeout 10000")
                .arg(self.data_dir.join("arca.db"))
                .arg(stmt)
                .stdin(Stdio::null())
                .output(),
        }
        .expect("run sqlite3 or psql");
        if out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("Error") {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// Everything the database holds, as bytes to scan for secrets: the SQLite files
    /// (database, WAL, shared memory) or a `pg_dump` of the PostgreSQL database. Never
    /// empty (a scan of nothing would prove nothing).
    pub fn stored_bytes(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        match &self.pg {
            Some(pg) => out.push(("pg_dump".to_string(), pg.dump())),
            None => {
                for f in ["arca.db", "arca.db-wal", "arca.db-shm"] {
                    if let Ok(b) = std::fs::read(self.data_dir.join(f)) {
                        out.push((f.to_string(), b));
                    }
                }
            }
        }
        assert!(
            out.iter().any(|(_, b)| !b.is_empty()),
            "no stored bytes to scan"
        );
        out
    }

    /// The PID of the current server process (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// The listening address of the current run.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("server not running")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The dev admin token (`arca_…`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The server's data dir (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory holding the data dir and the server logs.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// True while the current server process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The current run's stderr (the server log).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every run's log, concatenated.
    pub fn all_logs(&self) -> String {
        (1..=self.runs)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_path(&self, run: u32) -> PathBuf {
        match self.node {
            1 => self.root.path().join(format!("arca-{run}.log")),
            n => self.root.path().join(format!("arca-node{n}-{run}.log")),
        }
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.runs += 1;
        self.log = self.log_path(self.runs);
        let log = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = Command::new(arca_bin());
        cmd.arg("server")
            .arg("--dev")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.opts.args)
            // Nothing from the caller's environment may pick another HSM or database.
            .env_remove("ARCA_HSM_MODULE")
            .env_remove("SOFTHSM2_CONF")
            .env_remove("ARCA_DATABASE_URL")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(pg) = &self.pg {
            // The environment, not the command line, as operators are told to.
            cmd.env("ARCA_DATABASE_URL", pg.url());
        }
        let mut child = cmd.spawn().expect("spawn arca server");
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout for the life of the process.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens any more, keep reading so the child never blocks.
                let _ = tx.send(line);
            }
        });
        let started = Instant::now();
        let addr = loop {
            let line = match tokio::time::timeout(
                START_TIMEOUT.saturating_sub(started.elapsed()),
                rx.recv(),
            )
            .await
            {
                Ok(Some(line)) => line,
                Ok(None) => panic!(
                    "arca server exited before listening ({:?}); log:\n{}",
                    self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()),
                    self.log_tail()
                ),
                Err(_) => panic!(
                    "arca server did not print its listening line within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ),
            };
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest
                    .trim()
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
            }
        };
        assert!(addr.ip().is_loopback(), "dev server listens on {addr}");
        self.addr = Some(addr);
        self.token = std::fs::read_to_string(self.data_dir.join("dev-token"))
            .expect("DIR/dev-token")
            .trim()
            .to_string();
        assert!(self.token.starts_with("arca_"), "dev token format");
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server not running");
        self.addr = None;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "arca server ignored SIGTERM for {STOP_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (SIGTERM; it must exit 0) and starts it again on the same data
    /// dir with the same options (on a new port).
    pub async fn restart(&mut self) {
        let status = self.stop().await;
        assert!(status.success(), "arca server exit on SIGTERM: {status}");
        self.spawn().await;
    }

    /// Kills the server with SIGKILL (no shutdown of any kind, as a crash or a power
    /// cut) and waits until it is gone. Start it again with [`TestArca::start_with`].
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server not running");
        self.addr = None;
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again (it must be stopped) with other extra arguments and
    /// environment.
    pub async fn start_with(&mut self, opts: Builder) {
        self.opts = opts;
        self.spawn().await;
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .expect("connect to arca")
    }

    /// A client carrying the dev token.
    pub async fn client(&self) -> KeyClient {
        let header = format!("Bearer {}", self.token);
        self.client_with_header(Some(&header)).await
    }

    /// A client sending `authorization: <header>`, or no such header for `None`.
    pub async fn client_with_header(&self, header: Option<&str>) -> KeyClient {
        let value = header.map(|h| h.parse().expect("header value"));
        KeyServiceClient::with_interceptor(self.channel().await, Auth(value))
    }

    /// A health client (no credentials).
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }
}

impl Drop for TestArca {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- arca server log ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Sends `SIG<name>` to one process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A context map.
pub fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("OS randomness");
    b
}

/// The 16 bytes of a hyphenated UUID.
pub fn uuid_bytes(id: &str) -> [u8; 16] {
    *uuid::Uuid::parse_str(id).expect("uuid").as_bytes()
}

/// Asserts the status code, with the status in the failure message.
#[track_caller]
pub fn assert_code<T>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(_) => panic!("{what}: expected {code:?}, got OK"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

/// Creates a key; panics on failure.
pub async fn create_key(c: &mut KeyClient, name: &str) -> pb::Key {
    c.create_key(pb::CreateKeyRequest {
        name: name.to_string(),
        description: String::new(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("CreateKey {name}: {s:?}"))
    .into_inner()
}

/// Generates a data key with its plaintext; panics on failure.
pub async fn generate(
    c: &mut KeyClient,
    name: &str,
    context: &HashMap<String, String>,
) -> pb::GenerateDataKeyResponse {
    c.generate_data_key(pb::GenerateDataKeyRequest {
        key_name: name.to_string(),
        context: context.clone(),
        without_plaintext: false,
    })
    .await
    .unwrap_or_else(|s| panic!("GenerateDataKey {name}: {s:?}"))
    .into_inner()
}

/// Unwraps a wrapped key.
pub async fn unwrap(
    c: &mut KeyClient,
    wrapped: &[u8],
    context: &HashMap<String, String>,
) -> Result<pb::UnwrapKeyResponse, Status> {
    c.unwrap_key(pb::UnwrapKeyRequest {
        wrapped_key: wrapped.to_vec(),
        context: context.clone(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Rotates a key; panics on failure; returns the key as it is after rotation.
pub async fn rotate(c: &mut KeyClient, name: &str) -> pb::Key {
    c.rotate_key(pb::RotateKeyRequest {
        name: name.to_string(),
    })
    .await
    .unwrap_or_else(|s| panic!("RotateKey {name}: {s:?}"))
    .into_inner()
    .key
    .expect("RotateKey answered an approval request instead of the key")
}

/// The health status of `service` ("" for the server as a whole).
pub async fn health_status(
    h: &mut HealthClient<Channel>,
    service: &str,
) -> Result<ServingStatus, Status> {
    h.check(HealthCheckRequest {
        service: service.to_string(),
    })
    .await
    .map(|r| r.into_inner().status())
}

/// Polls health until it reports `want`; returns how long that took, or `None` after
/// `within`.
pub async fn wait_health(
    h: &mut HealthClient<Channel>,
    want: ServingStatus,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = tokio::time::timeout(Duration::from_secs(1), health_status(h, "")).await {
            if s.ok() == Some(want) {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}
