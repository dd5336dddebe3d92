//! The back ends themselves: migrations, losing and locking the database, and error
//! classification.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::{migration_versions, new_key, TestDb};
use crate::store::classify::classify;
use crate::store::{KeyStore, Ping, SqlStore, StoreError};

on_both_backends!(two_nodes_migrate_at_once);

on_postgres!(
    a_lost_connection_is_unavailable_and_the_pool_recovers,
    truncate_is_refused_too,
);

async fn two_nodes_migrate_at_once(db: Arc<TestDb>) {
    // Several stores open a fresh database at the same moment: all succeed and the
    // schema is applied once.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let db = Arc::clone(&db);
        set.spawn(async move { db.try_open().await.map(|_| ()) });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap()
            .unwrap_or_else(|e| panic!("concurrent open: {e} ({e:?})"));
    }
    let s = db.open().await;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&s.reader)
            .await
            .unwrap();
    assert_eq!(applied, migration_versions(db.backend()));
    s.create_key(&new_key("a", 1)).await.unwrap();
}

async fn a_lost_connection_is_unavailable_and_the_pool_recovers(db: Arc<TestDb>) {
    let s = db.open().await;
    // A transaction whose connection the server then terminates (as on a failover or
    // an administrator's pg_terminate_backend).
    let mut tx = s.writer.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let mut admin = db.admin().await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    let mut lost = None;
    for _ in 0..50 {
        match sqlx::query("SELECT 1").execute(&mut *tx).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                lost = Some(classify(e));
                break;
            }
        }
    }
    let lost = lost.expect("the terminated connection kept answering");
    assert!(matches!(lost, StoreError::Unavailable(_)), "{lost:?}");
    drop(tx);
    // The pool replaces the connection: the next calls work.
    s.ping().await.unwrap();
    s.create_key(&new_key("after", 1)).await.unwrap();

    // A server that is not there at all: Unavailable, and no error text quotes the
    // password of the URL.
    let started = std::time::Instant::now();
    let e = SqlStore::open_postgres("postgres://arca:pw-s3cret-42@127.0.0.1:1/arca")
        .await
        .err()
        .expect("connected to port 1");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let mut text = format!("{e} {e:?}");
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    assert!(!text.contains("pw-s3cret-42"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

async fn truncate_is_refused_too(db: Arc<TestDb>) {
    // Row triggers do not see TRUNCATE; statement triggers refuse it.
    let s = db.open().await;
    s.create_key(&new_key("a", 1)).await.unwrap();
    for sql in [
        "TRUNCATE key_versions",
        "TRUNCATE keys CASCADE",
        "TRUNCATE keys, key_versions",
    ] {
        assert!(
            sqlx::query(sql).execute(&s.writer).await.is_err(),
            "{sql} was allowed"
        );
    }
    assert_eq!(s.list_keys(None, 10).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_write_lock_held_past_the_busy_timeout_is_unavailable() {
    // Another process holds the write lock for longer than the busy timeout (5 s):
    // the write fails as retryable, not as an internal error.
    let db = TestDb::sqlite();
    let a = db.open().await;
    let b = db.open().await;
    let mut held = a.writer.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("UPDATE schema_migrations SET applied_at = applied_at")
        .execute(&mut *held)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let r = b.create_key(&new_key("blocked", 1)).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(4));
    held.rollback().await.unwrap();
    b.create_key(&new_key("blocked", 1)).await.unwrap();
}

/// A database error with a given SQLSTATE, for [`classify`].
#[derive(Debug)]
struct Coded(&'static str);

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error {}", self.0)
    }
}

impl std::error::Error for Coded {}

impl sqlx::error::DatabaseError for Coded {
    fn message(&self) -> &str {
        "message text is never looked at"
    }
    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.0))
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> sqlx::error::ErrorKind {
        if self.0 == "23505" {
            sqlx::error::ErrorKind::UniqueViolation
        } else {
            sqlx::error::ErrorKind::Other
        }
    }
}

#[test]
fn errors_are_classified_by_type_and_sqlstate() {
    let db = |c: &'static str| classify(sqlx::Error::Database(Box::new(Coded(c))));
    for c in [
        // PostgreSQL
        "08000", "08003", "08006", "08001", "08004", "08P01", "57P01", "57P02", "57P03",
        "53300", // SQLite: BUSY and LOCKED, and their extended codes
        "5", "6", "261", "517", "773", "262",
    ] {
        assert!(matches!(db(c), StoreError::Unavailable(_)), "{c}");
    }
    assert!(matches!(db("23505"), StoreError::AlreadyExists));
    // Constraint and trigger failures are not outages, on either back end.
    for c in [
        "23514", "P0001", "23000", "42P01", "19", "2067", "1811", "787", "1",
    ] {
        assert!(matches!(db(c), StoreError::Database(_)), "{c}");
    }
    assert!(matches!(
        classify(sqlx::Error::PoolTimedOut),
        StoreError::Unavailable(_)
    ));
    assert!(matches!(
        classify(sqlx::Error::PoolClosed),
        StoreError::Unavailable(_)
    ));
    assert!(matches!(
        classify(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))),
        StoreError::Unavailable(_)
    ));
    assert!(matches!(
        classify(sqlx::Error::RowNotFound),
        StoreError::NotFound
    ));
}
