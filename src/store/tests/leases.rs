//! Contract of [`LeaseStore`]: one holder per lease until it expires.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::LeaseStore;

on_both_backends!(leases_have_one_holder_until_they_expire,);

async fn leases_have_one_holder_until_they_expire(db: Arc<TestDb>) {
    let (a, b) = (db.open().await, db.open().await);
    assert!(a
        .acquire_lease("jobs", "node-a", 1000, 10_000)
        .await
        .unwrap());
    assert!(!b
        .acquire_lease("jobs", "node-b", 1000, 10_500)
        .await
        .unwrap());
    // The holder renews.
    assert!(a
        .acquire_lease("jobs", "node-a", 1000, 10_900)
        .await
        .unwrap());
    assert!(!b
        .acquire_lease("jobs", "node-b", 1000, 11_800)
        .await
        .unwrap());
    // Expired: the other node takes it, and the first one no longer holds it.
    assert!(b
        .acquire_lease("jobs", "node-b", 1000, 11_900)
        .await
        .unwrap());
    assert!(!a
        .acquire_lease("jobs", "node-a", 1000, 12_000)
        .await
        .unwrap());
    // Given up: free at once.
    b.release_lease("jobs", "node-b").await.unwrap();
    assert!(a
        .acquire_lease("jobs", "node-a", 1000, 12_100)
        .await
        .unwrap());
    // Other leases are independent; racing takers: exactly one wins.
    let (x, y) = tokio::join!(
        a.acquire_lease("other", "node-a", 1000, 0),
        b.acquire_lease("other", "node-b", 1000, 0)
    );
    assert!(x.unwrap() ^ y.unwrap());
}
