//! The store's contract tests and their harness, run on both back ends: every case of
//! [`on_both_backends!`] runs on SQLite (a file in a temporary directory) and on
//! PostgreSQL (a fresh database per case on the server at `ARCA_TEST_POSTGRES_URL`,
//! dropped afterwards). Without that variable the PostgreSQL cases print a SKIP line and
//! pass, unless `ARCA_REQUIRE_POSTGRES=1`: then they fail. One file of cases per table
//! family, plus `backends.rs` (connections, migrations, error classification).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::io::Write;
use std::sync::Arc;

use sqlx::Connection;

use super::{Backend, NewKey, Result, SqlStore};
use crate::keys::{KeyId, KeyName, ObjectId};

/// Each case (an `async fn(Arc<TestDb>)` of the invoking module) as `case::sqlite` and
/// `case::postgres`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::store::tests::run($crate::store::tests::TestDb::sqlite(), super::$case)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let test = concat!(module_path!(), "::postgres");
                if let Some(db) = $crate::store::tests::TestDb::postgres(test).await {
                    $crate::store::tests::run(db, super::$case).await;
                }
            }
        }
    )*};
}

/// Cases for PostgreSQL only, as `case::postgres`.
macro_rules! on_postgres {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let test = concat!(module_path!(), "::postgres");
                if let Some(db) = $crate::store::tests::TestDb::postgres(test).await {
                    $crate::store::tests::run(db, super::$case).await;
                }
            }
        }
    )*};
}

mod access;
mod approvals;
mod audit;
mod backends;
mod keys;
mod leases;
mod lifecycle;
mod quorum;
mod tokens;

/// Where a case's database lives. A case may open several stores on it (a restart,
/// or two nodes).
pub(super) enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres {
        admin_url: String,
        url: String,
        name: String,
    },
}

impl TestDb {
    pub(super) fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh database on the test server, or `None` (after a SKIP line for `test`)
    /// without one.
    pub(super) async fn postgres(test: &str) -> Option<TestDb> {
        let admin_url = postgres_url(test)?;
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).unwrap();
        let name = format!("arca_t_{}", hex::encode(raw));
        sqlx::any::install_default_drivers();
        let mut admin = sqlx::AnyConnection::connect(&admin_url)
            .await
            .expect("connect to ARCA_TEST_POSTGRES_URL");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        let url = with_database(&admin_url, &name);
        Some(TestDb::Postgres {
            admin_url,
            url,
            name,
        })
    }

    pub(super) fn backend(&self) -> Backend {
        match self {
            TestDb::Sqlite(_) => Backend::Sqlite,
            TestDb::Postgres { .. } => Backend::Postgres,
        }
    }

    /// Opens a store on the database (migrating it if needed).
    pub(super) async fn open(&self) -> SqlStore {
        self.try_open().await.unwrap()
    }

    pub(super) async fn try_open(&self) -> Result<SqlStore> {
        match self {
            TestDb::Sqlite(dir) => SqlStore::open_sqlite(&dir.path().join("t.db")).await,
            TestDb::Postgres { url, .. } => SqlStore::open_postgres(url).await,
        }
    }

    /// A connection to the server besides the store's pools (PostgreSQL only).
    pub(super) async fn admin(&self) -> sqlx::AnyConnection {
        match self {
            TestDb::Postgres { admin_url, .. } => {
                sqlx::AnyConnection::connect(admin_url).await.unwrap()
            }
            TestDb::Sqlite(_) => panic!("no admin connection on SQLite"),
        }
    }

    async fn remove(self) {
        if let TestDb::Postgres { name, .. } = &self {
            let mut admin = self.admin().await;
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await;
            let _ = admin.close().await;
        }
    }
}

/// `ARCA_TEST_POSTGRES_URL`, or `None` after a SKIP line; panics without it when
/// `ARCA_REQUIRE_POSTGRES=1`.
fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("ARCA_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("ARCA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "ARCA_REQUIRE_POSTGRES=1 but ARCA_TEST_POSTGRES_URL is not set"
            );
            // Straight to stderr: libtest captures only the print macros, and a skip
            // must show in a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: ARCA_TEST_POSTGRES_URL is not set"
            );
            None
        }
    }
}

/// `base` with its database (the URL path) replaced by `name`.
fn with_database(base: &str, name: &str) -> String {
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    format!("{scheme}://{authority}/{name}{query}")
}

/// Runs a case on `db` in a task (so a failing case still removes its database).
pub(super) async fn run<F, Fut>(db: TestDb, case: F)
where
    F: FnOnce(Arc<TestDb>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = Arc::new(db);
    let outcome = tokio::spawn(case(Arc::clone(&db))).await;
    if let Ok(db) = Arc::try_unwrap(db) {
        db.remove().await;
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A key named `name` whose id and first HSM object are `n` repeated.
pub(super) fn new_key(name: &str, n: u8) -> NewKey {
    NewKey {
        id: KeyId::from_random([n; 16]),
        name: KeyName::parse(name).unwrap(),
        description: "d".into(),
        first_hsm_id: ObjectId([n; 16]),
        first_mac: "m".into(),
        rotation_period_ms: None,
        retain_until: None,
        retention_mac: None,
        now: 1000,
    }
}

#[test]
fn a_database_name_replaces_the_url_path() {
    assert_eq!(
        with_database("postgres://u@127.0.0.1:5/arca", "t1"),
        "postgres://u@127.0.0.1:5/t1"
    );
    assert_eq!(
        with_database("postgres://u:p@h/x?sslmode=disable", "t2"),
        "postgres://u:p@h/t2?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "t3"), "postgres://h/t3");
}

/// The versions of the migrations of `backend`, in order.
pub(super) fn migration_versions(backend: Backend) -> Vec<i64> {
    super::migrate::migrations(backend)
        .iter()
        .map(|(v, _)| *v)
        .collect()
}
