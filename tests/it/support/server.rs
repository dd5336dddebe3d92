//! Running `arca server`: [`ServerProcess`] owns one child process (the PID it spawned)
//! and knows its listening address; [`TestArca`] is a dev server in a temporary directory
//! of its own, restartable, with a second node on the same data dir and database;
//! [`arca_command`] is the binary with nothing from the caller's environment that could
//! pick another HSM or database.
//!
//! Invariants: a `ServerProcess` kills and reaps its child when dropped (even when its
//! start fails), and signals only that PID; `arca server --dev` re-executes itself under
//! the same PID, so a `TestArca` owns exactly one process at a time. Imports nothing of
//! the other support files but the database handling.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::copy_dir;
use super::database::{psql_query, sqlite_query, Db, PgDatabase};

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How many lines of a server's log a failure shows.
const TAIL_LINES: usize = 40;

/// The path of the binary under test.
pub fn arca_bin() -> &'static str {
    env!("CARGO_BIN_EXE_arca")
}

/// `arca` with no stdin, and without the caller's `ARCA_HSM_MODULE`, `SOFTHSM2_CONF` and
/// `ARCA_DATABASE_URL`: nothing from the environment of the tests may pick another HSM or
/// database (a test that wants one sets it on the command).
pub fn arca_command() -> Command {
    let mut cmd = Command::new(arca_bin());
    cmd.env_remove("ARCA_HSM_MODULE")
        .env_remove("SOFTHSM2_CONF")
        .env_remove("ARCA_DATABASE_URL")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion off the async runtime; its status and output.
pub async fn output_of(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run a command"))
        .await
        .expect("join")
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

/// The last lines of the log file `path`.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// One running `arca server` process, started by [`ServerProcess::spawn`].
pub struct ServerProcess {
    child: Child,
    addr: Option<SocketAddr>,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `cmd` (stdin closed, stdout read here, stderr appended to `log`) and waits
    /// until it prints `… listening on SCHEME://ADDR`; panics with the log's tail when it
    /// exits or is silent for a minute first.
    pub async fn spawn(mut cmd: Command, log: &Path) -> ServerProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file));
        let mut child = cmd.spawn().expect("spawn arca server");
        let stdout = child.stdout.take().expect("stdout");
        // Owned from here on: a panic below kills the child.
        let mut server = ServerProcess {
            child,
            addr: None,
            log: log.to_path_buf(),
        };

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
                    server.child.try_wait().ok().flatten(),
                    log_tail(&server.log)
                ),
                Err(_) => panic!(
                    "arca server did not print its listening line within {START_TIMEOUT:?}; log:\n{}",
                    log_tail(&server.log)
                ),
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split("://").nth(1).unwrap_or(rest).trim();
                break addr
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
            }
        };
        server.addr = Some(addr);
        server
    }

    /// The PID of the process (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("server not listening")
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (no shutdown of any kind, as a crash or a power
    /// cut) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status. Panics
    /// (after SIGKILL) when it ignores SIGTERM for 15 s.
    pub async fn stop(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "arca server ignored SIGTERM for {STOP_TIMEOUT:?}; log:\n{}",
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a lifecycle policy for tests in `dir` and returns its path: waiting periods
/// from 1 s (`default_wait` by default, at most 90 days), rotation periods from 1 s, and
/// a version rotated after `usage_limit` wraps.
pub fn lifecycle_policy(dir: &Path, default_wait: &str, usage_limit: u64) -> PathBuf {
    let path = dir.join(format!("lifecycle-{default_wait}-{usage_limit}.toml"));
    std::fs::write(
        &path,
        format!(
            "version = 1\n\
             default_waiting_period = \"{default_wait}\"\n\
             min_waiting_period = \"1s\"\n\
             max_waiting_period = \"90d\"\n\
             min_rotation_period = \"1s\"\n\
             usage_limit = {usage_limit}\n"
        ),
    )
    .expect("write the lifecycle policy");
    path
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

    /// The lifecycle policy at `policy`, a job pass every 200 ms and a job lease of
    /// `lease` (for tests that wait for rotations and destructions).
    pub fn fast_jobs(self, policy: &Path, lease: &str) -> Self {
        self.arg("--lifecycle-policy")
            .arg(policy)
            .arg("--job-interval")
            .arg("200ms")
            .arg("--job-lease")
            .arg(lease)
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
        TestArca::run(Arc::new(root), data_dir, self, pg, 1).await
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
    process: Option<ServerProcess>,
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

    /// Starts node `node` of `data_dir` under `root`.
    async fn run(
        root: Arc<TempDir>,
        data_dir: PathBuf,
        opts: Builder,
        pg: Option<Arc<PgDatabase>>,
        node: u32,
    ) -> TestArca {
        let mut arca = TestArca {
            root,
            data_dir,
            opts,
            pg,
            node,
            process: None,
            token: String::new(),
            runs: 0,
            log: PathBuf::new(),
        };
        arca.spawn().await;
        arca
    }

    /// A second node: another `arca server --dev` process with the same options on the
    /// same data dir (so the same SoftHSM token, PINs and dev token) and the same
    /// database (on SQLite, the same file: two processes on one host).
    pub async fn second_node(&self) -> TestArca {
        TestArca::run(
            Arc::clone(&self.root),
            self.data_dir.clone(),
            self.opts.clone(),
            self.pg.clone(),
            self.node + 1,
        )
        .await
    }

    /// A second node like [`Self::second_node`], with options added by `more` (another
    /// HSM module, say).
    pub async fn second_node_with(&self, more: impl FnOnce(Builder) -> Builder) -> TestArca {
        TestArca::run(
            Arc::clone(&self.root),
            self.data_dir.clone(),
            more(self.opts.clone()),
            self.pg.clone(),
            self.node + 1,
        )
        .await
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
        TestArca::run(Arc::new(root), data_dir, opts, None, 1).await
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
        match &self.pg {
            Some(pg) => psql_query(pg.url(), stmt),
            None => sqlite_query(&self.sqlite_file(), stmt),
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

    /// [`TestArca::stored_bytes`], and every run's log as `log`: where no secret may be.
    pub fn stored_bytes_and_logs(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = self.stored_bytes();
        out.push(("log".to_string(), self.all_logs().into_bytes()));
        out
    }

    fn process(&self) -> &ServerProcess {
        self.process.as_ref().expect("server not running")
    }

    /// The PID of the current server process (for signals).
    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// The listening address of the current run.
    pub fn addr(&self) -> SocketAddr {
        self.process().addr()
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
        self.process.as_mut().is_some_and(ServerProcess::is_running)
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

    async fn spawn(&mut self) {
        assert!(self.process.is_none(), "already running");
        self.runs += 1;
        self.log = self.log_path(self.runs);
        let mut cmd = arca_command();
        cmd.arg("server")
            .arg("--dev")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.opts.args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(pg) = &self.pg {
            // The environment, not the command line, as operators are told to.
            cmd.env("ARCA_DATABASE_URL", pg.url());
        }
        let process = ServerProcess::spawn(cmd, &self.log).await;
        let addr = process.addr();
        self.process = Some(process);
        assert!(addr.ip().is_loopback(), "dev server listens on {addr}");
        self.token = std::fs::read_to_string(self.data_dir.join("dev-token"))
            .expect("DIR/dev-token")
            .trim()
            .to_string();
        assert!(self.token.starts_with("arca_"), "dev token format");
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("server not running");
        process.stop().await
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
        self.process.take().expect("server not running").kill();
    }

    /// Starts the server again (it must be stopped) with other extra arguments and
    /// environment.
    pub async fn start_with(&mut self, opts: Builder) {
        self.opts = opts;
        self.spawn().await;
    }
}

impl Drop for TestArca {
    fn drop(&mut self) {
        // Killed first, so the log is complete.
        drop(self.process.take());
        if std::thread::panicking() {
            eprintln!(
                "--- arca server log ({}) ---\n{}",
                self.log.display(),
                log_tail(&self.log)
            );
        }
    }
}
