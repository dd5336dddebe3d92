//! Contract of [`KeyStore`]: keys and versions, state changes, wrap reservations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::{migration_versions, new_key, TestDb};
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};
use crate::store::{Conflict, EnabledStamp, KeyRecord, KeyStore, Ping, SqlStore, StoreError};

on_both_backends!(
    create_get_list,
    names_and_objects_are_unique,
    versions_are_consecutive,
    state_changes_are_conditional_and_checked_by_the_database,
    wrap_reservations_add_up,
    usage_limited_reservations_never_pass_the_limit,
    keys_list_in_byte_order_of_names,
    two_nodes_race_for_a_version_number_and_exactly_one_wins,
    two_nodes_race_for_a_state_change_and_exactly_one_wins,
    two_nodes_reserve_wraps_without_losing_any,
);

fn names(page: &[KeyRecord]) -> Vec<&str> {
    page.iter().map(|k| k.name.as_str()).collect()
}

async fn create_get_list(db: Arc<TestDb>) {
    let s = db.open().await;
    assert_eq!(s.backend(), db.backend());
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    assert_eq!(k.primary_version, 1);
    assert_eq!(k.versions.len(), 1);
    assert_eq!(k.versions[0].state, VersionState::Enabled);
    assert_eq!(k.versions[0].hsm_id, ObjectId([1; 16]));
    assert_eq!(k.created_at, 1000);
    assert_eq!(k.description, "d");
    assert_eq!(s.key_by_name(&k.name).await.unwrap().id, k.id);
    assert_eq!(s.key_by_id(&k.id).await.unwrap().name, k.name);
    s.create_key(&new_key("b", 2)).await.unwrap();
    s.create_key(&new_key("c", 3)).await.unwrap();
    assert_eq!(names(&s.list_keys(None, 2).await.unwrap()), ["a", "b"]);
    assert_eq!(names(&s.list_keys(Some("b"), 2).await.unwrap()), ["c"]);
    assert!(s.list_keys(Some("c"), 2).await.unwrap().is_empty());
    assert!(matches!(
        s.key_by_name(&KeyName::parse("zz").unwrap()).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.key_by_id(&KeyId([9; 16])).await,
        Err(StoreError::NotFound)
    ));
    s.ping().await.unwrap();
    // Reopening applies no migration twice and keeps the data.
    drop(s);
    let s = db.open().await;
    assert_eq!(s.list_keys(None, 10).await.unwrap().len(), 3);
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&s.reader)
            .await
            .unwrap();
    assert_eq!(applied, migration_versions(db.backend()));
}

async fn names_and_objects_are_unique(db: Arc<TestDb>) {
    let s = db.open().await;
    s.create_key(&new_key("a", 1)).await.unwrap();
    let mut dup = new_key("a", 2);
    assert!(matches!(
        s.create_key(&dup).await,
        Err(StoreError::AlreadyExists)
    ));
    dup.name = KeyName::parse("b").unwrap();
    dup.first_hsm_id = ObjectId([1; 16]);
    assert!(matches!(
        s.create_key(&dup).await,
        Err(StoreError::AlreadyExists)
    ));
    // Nothing of the failed create remains.
    assert!(s.key_by_name(&dup.name).await.is_err());
    // The same id under another name is refused too.
    let mut same_id = new_key("c", 3);
    same_id.id = KeyId::from_random([1; 16]);
    assert!(matches!(
        s.create_key(&same_id).await,
        Err(StoreError::AlreadyExists)
    ));
}

async fn versions_are_consecutive(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    let k2 = s
        .add_version(&k.id, 2, &ObjectId([9; 16]), "m", 2000)
        .await
        .unwrap();
    assert_eq!(k2.primary_version, 2);
    assert_eq!(k2.versions.len(), 2);
    assert_eq!(k2.versions[1].hsm_id, ObjectId([9; 16]));
    // A lost race (same number) and a gap are refused.
    assert!(matches!(
        s.add_version(&k.id, 2, &ObjectId([8; 16]), "m", 2000).await,
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        s.add_version(&k.id, 4, &ObjectId([8; 16]), "m", 2000).await,
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        s.add_version(&KeyId([7; 16]), 2, &ObjectId([8; 16]), "m", 2000)
            .await,
        Err(StoreError::NotFound)
    ));
    // An HSM object id is never used twice, across keys too.
    assert!(matches!(
        s.add_version(&k.id, 3, &ObjectId([1; 16]), "m", 2000).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(s.key_by_id(&k.id).await.unwrap().primary_version, 2);
}

async fn state_changes_are_conditional_and_checked_by_the_database(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    use VersionState::*;
    let r = s
        .set_version_state(&k.id, 1, &[Enabled], Disabled, None, 5)
        .await
        .unwrap();
    assert_eq!(r.versions[0].state, Disabled);
    assert_eq!(r.versions[0].updated_at, 5);
    assert!(matches!(
        s.set_version_state(&k.id, 1, &[Enabled], Disabled, None, 6)
            .await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::Disabled
        )))
    ));
    assert!(matches!(
        s.set_version_state(&k.id, 2, &[Enabled], Disabled, None, 6)
            .await,
        Err(StoreError::NotFound)
    ));
    // The trigger refuses an illegal edge even when Rust would allow it.
    assert!(matches!(
        s.set_version_state(&k.id, 1, &[Disabled], Destroyed, None, 7)
            .await,
        Err(StoreError::Database(_))
    ));
    assert_eq!(
        s.key_by_id(&k.id).await.unwrap().versions[0].state,
        Disabled
    );
    // Direct SQL cannot delete keys or versions, nor change their identity.
    for sql in [
        "DELETE FROM keys",
        "DELETE FROM key_versions",
        "UPDATE keys SET name = 'renamed'",
        "UPDATE keys SET id = 'other'",
        "UPDATE key_versions SET version = 7",
        "UPDATE key_versions SET hsm_id = 'ff'",
        "UPDATE key_versions SET key_id = 'other'",
        "UPDATE key_versions SET state = 'DESTROYED'",
        "UPDATE key_versions SET state = 'BROKEN'",
        "UPDATE key_versions SET wrap_count = -1",
        "UPDATE keys SET primary_version = 0",
    ] {
        assert!(
            sqlx::query(sql).execute(&s.writer).await.is_err(),
            "{sql} was allowed"
        );
    }
    // Updating other columns of the key stays possible.
    sqlx::query("UPDATE keys SET description = 'changed'")
        .execute(&s.writer)
        .await
        .unwrap();
    s.set_version_state(&k.id, 1, &[Disabled], ScheduledForDestruction, None, 8)
        .await
        .unwrap();
    // Cancelling a scheduled destruction goes back to DISABLED, never straight to ENABLED.
    assert!(sqlx::query("UPDATE key_versions SET state = 'ENABLED'")
        .execute(&s.writer)
        .await
        .is_err());
    let r = s
        .set_version_state(&k.id, 1, &[ScheduledForDestruction], Destroyed, None, 9)
        .await
        .unwrap();
    assert_eq!(r.versions[0].destroyed_at, Some(9));
    // DESTROYED is final.
    for to in ["ENABLED", "DISABLED", "SCHEDULED_FOR_DESTRUCTION"] {
        assert!(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE key_versions SET state = '{to}'"
            )))
            .execute(&s.writer)
            .await
            .is_err(),
            "DESTROYED -> {to} was allowed"
        );
    }
    // The legal edges, on a second key: ENABLED <-> DISABLED, either to
    // SCHEDULED_FOR_DESTRUCTION, and back to DISABLED.
    let k2 = s.create_key(&new_key("b", 2)).await.unwrap();
    for (from, to) in [
        (Enabled, Disabled),
        (Disabled, Enabled),
        (Enabled, ScheduledForDestruction),
        (ScheduledForDestruction, Disabled),
        (Disabled, ScheduledForDestruction),
    ] {
        // Made ENABLED: with a MAC for the version's next sequence.
        let seq = s.key_by_id(&k2.id).await.unwrap().versions[0].state_seq + 1;
        let stamp = EnabledStamp {
            seq,
            mac: "m".into(),
        };
        let enabled = (to == Enabled).then_some(&stamp);
        let r = s
            .set_version_state(&k2.id, 1, &[from], to, enabled, 10)
            .await
            .unwrap_or_else(|e| panic!("{from:?} -> {to:?}: {e}"));
        assert_eq!(r.versions[0].state, to);
    }
}

async fn wrap_reservations_add_up(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    assert_eq!(s.reserve_wraps(&k.id, 1, 100).await.unwrap(), 100);
    assert_eq!(s.reserve_wraps(&k.id, 1, 28).await.unwrap(), 128);
    assert!(matches!(
        s.reserve_wraps(&k.id, 9, 1).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        s.key_by_id(&k.id).await.unwrap().versions[0].wrap_count,
        128
    );
}

async fn usage_limited_reservations_never_pass_the_limit(db: Arc<TestDb>) {
    let s = db.open().await;
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 64);
    assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 36);
    assert_eq!(s.reserve_wraps_within(&k.id, 1, 64, 100).await.unwrap(), 0);
    assert_eq!(
        s.key_by_id(&k.id)
            .await
            .unwrap()
            .version(1)
            .unwrap()
            .wrap_count,
        100
    );
    // Two nodes at once: together never more than the limit.
    let k2 = s.create_key(&new_key("b", 2)).await.unwrap();
    let b = db.open().await;
    let (mut ga, mut gb) = (0, 0);
    for _ in 0..20 {
        let (x, y) = tokio::join!(
            s.reserve_wraps_within(&k2.id, 1, 7, 100),
            b.reserve_wraps_within(&k2.id, 1, 7, 100)
        );
        ga += x.unwrap();
        gb += y.unwrap();
    }
    assert_eq!(ga + gb, 100);
    assert_eq!(
        s.key_by_id(&k2.id)
            .await
            .unwrap()
            .version(1)
            .unwrap()
            .wrap_count,
        100
    );
}

/// Pages are in byte order of names on both back ends, whatever the PostgreSQL
/// collation (the test cluster's default is ICU en-US, which sorts `_` before `-`
/// before digits).
async fn keys_list_in_byte_order_of_names(db: Arc<TestDb>) {
    let s = db.open().await;
    let mut all = ["a_", "a0", "a/", "a-", "ab", "a", "b-c", "b/c"];
    for (n, name) in all.iter().enumerate() {
        s.create_key(&new_key(name, n as u8 + 1)).await.unwrap();
    }
    all.sort_unstable();
    assert_eq!(all, ["a", "a-", "a/", "a0", "a_", "ab", "b-c", "b/c"]);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list_keys(after.as_deref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(names(&page).into_iter().map(str::to_string));
        after = seen.last().cloned();
    }
    assert_eq!(seen, all);
}

async fn two_nodes_race_for_a_version_number_and_exactly_one_wins(db: Arc<TestDb>) {
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    for round in 0..10u8 {
        let k = a
            .create_key(&new_key(&format!("k{round}"), 100 + round))
            .await
            .unwrap();
        let race = |s: Arc<SqlStore>, obj: u8| {
            let id = k.id;
            tokio::spawn(async move { s.add_version(&id, 2, &ObjectId([obj; 16]), "m", 5).await })
        };
        let (ra, rb) = tokio::join!(
            race(Arc::clone(&a), round),
            race(Arc::clone(&b), 200 - round)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let won: Vec<&KeyRecord> = [&ra, &rb]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {ra:?} / {rb:?}");
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(
                    matches!(e, StoreError::AlreadyExists),
                    "round {round}: loser got {e:?}"
                );
            }
        }
        let k = b.key_by_id(&k.id).await.unwrap();
        assert_eq!(k.versions.len(), 2);
        assert_eq!(k.primary_version, 2);
        assert_eq!(k.versions[1].hsm_id, won[0].versions[1].hsm_id);
    }
}

async fn two_nodes_race_for_a_state_change_and_exactly_one_wins(db: Arc<TestDb>) {
    use VersionState::*;
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    for round in 0..10u8 {
        let k = a
            .create_key(&new_key(&format!("k{round}"), 100 + round))
            .await
            .unwrap();
        let race = |s: Arc<SqlStore>| {
            let id = k.id;
            tokio::spawn(async move {
                s.set_version_state(&id, 1, &[Enabled], Disabled, None, 5)
                    .await
            })
        };
        let (ra, rb) = tokio::join!(race(Arc::clone(&a)), race(Arc::clone(&b)));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let won = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {ra:?} / {rb:?}");
        for r in [&ra, &rb] {
            if let Err(e) = r {
                assert!(
                    matches!(
                        e,
                        StoreError::Conflict(Conflict::VersionState(VersionState::Disabled))
                    ),
                    "round {round}: loser got {e:?}"
                );
            }
        }
    }
}

async fn two_nodes_reserve_wraps_without_losing_any(db: Arc<TestDb>) {
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    let k = a.create_key(&new_key("counted", 1)).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let s = Arc::clone(if i % 2 == 0 { &a } else { &b });
        let id = k.id;
        set.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..5 {
                got.push(s.reserve_wraps(&id, 1, 7).await.unwrap());
            }
            got
        });
    }
    let mut counts = Vec::new();
    while let Some(r) = set.join_next().await {
        counts.extend(r.unwrap());
    }
    // Every reservation saw its own total: no two were merged or lost.
    counts.sort_unstable();
    let expected: Vec<u64> = (1..=80).map(|n| n * 7).collect();
    assert_eq!(counts, expected);
    assert_eq!(
        b.key_by_id(&k.id).await.unwrap().versions[0].wrap_count,
        560
    );
}
