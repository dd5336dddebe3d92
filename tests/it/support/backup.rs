//! Backups of a [`TestArca`] taken and restored the way docs/operations.md ("Backing up",
//! "Restoring a backup") tells operators to, with the same tools: the `sqlite3` shell's
//! `.backup`, `pg_dump -Fc` and `pg_restore`, a copy of the SoftHSM token directory, and
//! a new audit checkpoint file holding the old lines up to the restored head.
//!
//! Invariants: the database backup is taken while the server runs (both tools read a
//! consistent snapshot); everything else needs the server stopped (nothing may write
//! the token while it is copied, and a restore replaces what a running server holds),
//! and asserts so. A backup directory holds `arca.db` (SQLite) or `arca.dump`
//! (PostgreSQL, custom format), and `tokens/`. Imports only the server and database
//! support.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::copy_dir;
use super::database::split_url;
use super::server::{output_of, TestArca};

/// The SQLite files of a data dir: the database, its WAL and shared-memory files.
const SQLITE_FILES: [&str; 3] = ["arca.db", "arca.db-wal", "arca.db-shm"];

/// Runs a backup tool to completion; panics with its error output when it fails.
async fn run(cmd: Command, what: &str) {
    let out = output_of(cmd).await;
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The URL of database `db` as `user` on the server of `url` (same host, port and TLS
/// parameters).
pub fn pg_url_as(url: &str, user: &str, db: &str) -> String {
    let (scheme, authority, query) = split_url(url);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{user}@{host}/{db}{query}")
}

/// `pg_dump -Fc -f FILE --dbname URL`, then `pg_restore --list FILE` to check that the
/// archive reads back.
pub async fn pg_dump_custom(url: &str, file: &Path) {
    let mut cmd = Command::new("pg_dump");
    cmd.arg("-Fc").arg("-f").arg(file).arg("--dbname").arg(url);
    run(cmd, "pg_dump -Fc").await;
    let mut check = Command::new("pg_restore");
    check.arg("--list").arg(file);
    run(check, "pg_restore --list").await;
}

/// `pg_restore --single-transaction --exit-on-error [--clean --if-exists] --dbname URL
/// FILE`: into an empty database, or over the live one with [`Restore::OverLive`].
pub async fn pg_restore(url: &str, file: &Path, how: Restore) {
    let mut cmd = Command::new("pg_restore");
    cmd.args(["--single-transaction", "--exit-on-error"]);
    if how == Restore::OverLive {
        cmd.args(["--clean", "--if-exists"]);
    }
    cmd.arg("--dbname").arg(url).arg(file);
    run(cmd, "pg_restore").await;
}

/// How a restore treats the live database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// Into an empty database: SQLite copies the backup file into place; PostgreSQL runs
    /// `pg_restore` into the (recreated, empty) database.
    Fresh,
    /// Over the live database: SQLite moves the live files aside first; PostgreSQL runs
    /// `pg_restore --clean --if-exists`.
    OverLive,
}

impl TestArca {
    /// The SoftHSM token directory of the data dir.
    pub fn token_dir(&self) -> PathBuf {
        self.data_dir().join("tokens")
    }

    /// The audit checkpoint file (the default, `DIR/audit-checkpoints.jsonl`).
    pub fn checkpoint_file(&self) -> PathBuf {
        self.data_dir().join("audit-checkpoints.jsonl")
    }

    /// Backs the database up into `dir` while the server runs, with the documented
    /// command: `sqlite3 arca.db ".backup 'DIR/arca.db'"`, or `pg_dump -Fc`. Checks the
    /// copy as the runbook says (`PRAGMA integrity_check`, `pg_restore --list`).
    pub async fn back_up_database(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("backup dir");
        match self.postgres() {
            None => {
                let to = dir.join("arca.db");
                let mut cmd = Command::new("sqlite3");
                cmd.arg("-cmd")
                    .arg(".timeout 10000")
                    .arg(self.sqlite_file())
                    .arg(format!(".backup '{}'", to.display()));
                run(cmd, "sqlite3 .backup").await;
                let mut check = Command::new("sqlite3");
                check.arg(&to).arg("PRAGMA integrity_check");
                let out = output_of(check).await;
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    "ok",
                    "integrity_check of the backup"
                );
            }
            Some(pg) => pg_dump_custom(pg.url(), &dir.join("arca.dump")).await,
        }
    }

    /// Copies the token directory to `dir/tokens`. The server must be stopped.
    pub fn back_up_token(&mut self, dir: &Path) {
        assert!(
            !self.is_running(),
            "the token is copied while no process writes"
        );
        copy_dir(&self.token_dir(), &dir.join("tokens"));
    }

    /// Destroys the live state, as a lost disk would: the SQLite files (or every table of
    /// the PostgreSQL database: it is dropped and created again, empty) and the token
    /// directory. The server must be stopped.
    pub fn lose_database_and_token(&mut self) {
        assert!(!self.is_running(), "the server must be stopped");
        match self.postgres() {
            None => {
                for f in SQLITE_FILES {
                    let _ = std::fs::remove_file(self.data_dir().join(f));
                }
                assert!(!self.sqlite_file().exists());
            }
            Some(pg) => pg.recreate(),
        }
        std::fs::remove_dir_all(self.token_dir()).expect("remove the token dir");
    }

    /// Restores the database from `dir` (a [`TestArca::back_up_database`]) as the runbook
    /// does. SQLite: the live files (if any) are moved to `ROOT/before-restore/`, kept,
    /// and the backup is copied into place. PostgreSQL: `pg_restore --single-transaction
    /// --exit-on-error`, with `--clean --if-exists` over the live database. The server
    /// must be stopped.
    pub async fn restore_database(&mut self, dir: &Path, how: Restore) {
        assert!(!self.is_running(), "the server must be stopped");
        match self.postgres() {
            None => {
                let aside = self.root().join("before-restore");
                std::fs::create_dir_all(&aside).expect("mkdir before-restore");
                for f in SQLITE_FILES {
                    let live = self.data_dir().join(f);
                    if live.exists() {
                        assert_eq!(how, Restore::OverLive, "{f} exists before a fresh restore");
                        std::fs::rename(&live, aside.join(f)).expect("move the live file aside");
                    }
                }
                std::fs::copy(dir.join("arca.db"), self.sqlite_file()).expect("copy back");
            }
            Some(pg) => pg_restore(pg.url(), &dir.join("arca.dump"), how).await,
        }
    }

    /// Puts the token directory of `dir` back in place. The server must be stopped.
    pub fn restore_token(&mut self, dir: &Path) {
        assert!(!self.is_running(), "the server must be stopped");
        let live = self.token_dir();
        if live.exists() {
            std::fs::rename(&live, self.root().join("tokens-before-restore"))
                .expect("move the live token aside");
        }
        copy_dir(&dir.join("tokens"), &live);
    }

    /// The audit head of the (restored) database: `SELECT seq FROM audit_head`.
    pub fn audit_head_seq(&self) -> u64 {
        self.sql("SELECT seq FROM audit_head")
            .expect("read audit_head")
            .parse()
            .expect("a seq")
    }

    /// After a restore, before the server starts: moves the checkpoint file aside (to
    /// `ROOT/audit-checkpoints.before-restore.jsonl`, returned) and starts a new one
    /// holding its lines up to the restored head, as the runbook's
    /// `jq -c --argjson n HEAD 'select(.seq <= $n)'` does. Returns the old file's path.
    pub fn keep_checkpoints_through_restored_head(&mut self) -> PathBuf {
        let head = self.audit_head_seq();
        self.keep_checkpoints_through(head)
    }

    /// [`TestArca::keep_checkpoints_through_restored_head`] with the head given (for a
    /// server whose database the support does not manage).
    pub fn keep_checkpoints_through(&mut self, head: u64) -> PathBuf {
        assert!(!self.is_running(), "the server must be stopped");
        let live = self.checkpoint_file();
        let old = self.root().join("audit-checkpoints.before-restore.jsonl");
        std::fs::rename(&live, &old).expect("move the checkpoint file aside");
        let text = std::fs::read_to_string(&old).expect("read the old checkpoint file");
        let kept: String = text
            .lines()
            .filter(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("a checkpoint line");
                v["seq"].as_u64().expect("seq") <= head
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&live, kept).expect("write the new checkpoint file");
        old
    }
}
