//! Test support: the plumbing every integration test shares, defined once here and in
//! nowhere else. Nothing here ships in the library, and nothing here is a test.
//!
//! - [`server`]: [`TestArca`] runs the real `arca` binary in dev mode (real SoftHSM, real
//!   SQLite or PostgreSQL) in its own temporary directory on a free loopback port;
//!   [`ServerProcess`] is any one `arca server` child (TLS and production runs too), and
//!   [`arca_command`] the binary with a clean environment.
//! - [`clients`]: the [`Auth`] interceptor, gRPC clients of every service carrying it,
//!   and the plain calls tests make on the way to what they check.
//! - [`quorum`]: custodian kits, TOTP codes, the 3-of-5 ceremony, and `age` identities.
//! - [`cli`]: the `arca` command line as a client of a running server.
//! - [`backup`]: backups taken and restored as the operations runbook says (`sqlite3
//!   .backup`, `pg_dump`/`pg_restore`, the token directory, the audit checkpoint file).
//! - [`database`]: the back ends: PostgreSQL databases and clusters of the tests, and the
//!   `psql` and `sqlite3` shells.
//! - [`hsm`]: SoftHSM tokens read through OpenSC's `pkcs11-tool`.
//! - [`pki`]: the test CA of `scripts/make-test-ca`.
//!
//! Back ends: [`Db::Sqlite`] is the data dir's `arca.db`; [`Db::Postgres`] a fresh
//! database per `TestArca` on the server at `ARCA_TEST_POSTGRES_URL`.
//! [`on_both_backends!`] turns one test body into `NAME::sqlite` and `NAME::postgres`;
//! without `ARCA_TEST_POSTGRES_URL` the PostgreSQL variant prints a SKIP line and passes,
//! unless `ARCA_REQUIRE_POSTGRES=1`. Every other test runs on [`Db::default`]: SQLite, or
//! PostgreSQL with `ARCA_TEST_DB=postgres` (`scripts/test` runs the suite both ways).
//!
//! Processes: every process a helper starts is owned by the value that started it and is
//! killed by its PID when that value is dropped.

use std::collections::HashMap;
use std::path::Path;

pub mod backup;
pub mod cli;
pub mod clients;
pub mod database;
pub mod hsm;
pub mod pki;
pub mod quorum;
pub mod server;

pub use backup::Restore;
pub use cli::CliOutput;
pub use clients::{
    assert_code, create_key, generate, generate_wrapped, get_key, health_status, mint_token,
    reason, rotate, unwrap, version_state, wait_health, Auth, KeyClient,
};
pub use database::{postgres_url, sqlite_query, Db};
pub use quorum::{
    age_decrypt, age_keygen, request_rotation, three_of_five, unsealed, Custodians, Kit, Totp,
};
pub use server::{
    arca_command, lifecycle_policy, output_of, signal, Builder, ServerProcess, TestArca,
};

/// The one message of every wrapped-key failure (DESIGN §4, habit 4).
pub const INVALID_WRAPPED: &str = "invalid wrapped key or encryption context";

/// Runs a test body `async fn NAME(db: Db)` as two tests, `NAME::sqlite` and
/// `NAME::postgres`, with the given test attribute. The one definition of this macro.
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

/// Writes one line to stderr past libtest's capture (which only sees the print macros),
/// so that it shows in a passing run.
pub fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
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

/// True when `needle` (not empty) occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that no needle `(what, bytes)` occurs in any haystack `(name, bytes)`.
#[track_caller]
pub fn assert_absent(needles: &[(String, Vec<u8>)], haystacks: &[(String, Vec<u8>)]) {
    for (name, hay) in haystacks {
        for (what, needle) in needles {
            assert!(!needle.is_empty(), "nothing to look for as {what}");
            assert!(!contains(hay, needle), "{what} appears in {name}");
        }
    }
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
