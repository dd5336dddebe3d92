//! Contract of [`LifecycleStore`]: retirement, cancellation, retention, due rotations and
//! the destroyer's two steps with their tombstones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::{new_key, TestDb};
use crate::keys::{ObjectId, VersionState};
use crate::store::{Conflict, KeyStore, LifecycleChange, LifecycleStore, StoreError, VersionStamp};

on_both_backends!(
    retirement_cancel_and_destruction_are_conditional_and_leave_a_tombstone,
    retention_is_applied_once,
    due_rotations_follow_the_period_of_the_primary,
);

async fn retirement_cancel_and_destruction_are_conditional_and_leave_a_tombstone(db: Arc<TestDb>) {
    use LifecycleChange::*;
    let s = db.open().await;
    let k = s.create_key(&new_key("a", 1)).await.unwrap();
    s.add_version(&k.id, 2, &ObjectId([0x42; 16]), "m", 1500)
        .await
        .unwrap();
    // Each schedule names the version's next state sequence (1 when made, +1 per change).
    let st = |version: u32, seq: i64| VersionStamp {
        version,
        seq,
        mac: format!("m{version}.{seq}"),
    };
    let schedule = |v: u32, at: i64, seq: i64| Schedule {
        versions: vec![st(v, seq)],
        destroy_at: at,
        request: Some("req_1".into()),
    };
    let r = s
        .apply_lifecycle(&k.id, &schedule(1, 5000, 2), 2000)
        .await
        .unwrap();
    let v1 = r.version(1).unwrap();
    assert_eq!(v1.state, VersionState::ScheduledForDestruction);
    assert_eq!(v1.destroy_at, Some(5000));
    assert_eq!(v1.retire_request.as_deref(), Some("req_1"));
    assert_eq!((v1.state_seq, v1.mac.as_deref()), (2, Some("m1.2")));
    // From another sequence than the MAC was made for: refused, nothing changes.
    assert!(matches!(
        s.apply_lifecycle(&k.id, &schedule(2, 5000, 7), 2000).await,
        Err(StoreError::Conflict(Conflict::ChangedConcurrently))
    ));
    // Twice: refused, nothing changes.
    assert!(matches!(
        s.apply_lifecycle(&k.id, &schedule(1, 9000, 3), 2100).await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::ScheduledForDestruction
        )))
    ));
    // A schedule of several versions is all or nothing.
    assert!(matches!(
        s.apply_lifecycle(
            &k.id,
            &Schedule {
                versions: vec![st(2, 2), st(1, 3)],
                destroy_at: 1,
                request: None
            },
            2100
        )
        .await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::ScheduledForDestruction
        )))
    ));
    assert_eq!(
        s.key_by_id(&k.id).await.unwrap().version(2).unwrap().state,
        VersionState::Enabled
    );
    // Not due yet: the destroyer cannot start.
    assert!(matches!(
        s.begin_destruction(&k.id, 1, 4999).await,
        Err(StoreError::Conflict(Conflict::NotDue))
    ));
    assert!(s.due_destructions(4999, 10).await.unwrap().is_empty());
    // Cancel → DISABLED, schedule cleared; schedule again.
    let r = s
        .apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 3000)
        .await
        .unwrap();
    let v1 = r.version(1).unwrap();
    assert_eq!(
        (v1.state, v1.destroy_at, v1.retire_request.clone()),
        (VersionState::Disabled, None, None)
    );
    s.apply_lifecycle(&k.id, &schedule(1, 5000, 4), 3100)
        .await
        .unwrap();
    let due = s.due_destructions(5000, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].version, due[0].hsm_id), (1, ObjectId([1; 16])));
    s.begin_destruction(&k.id, 1, 5000).await.unwrap();
    // Started: no cancel, neither through the store nor by hand.
    assert!(matches!(
        s.apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 5001)
            .await,
        Err(StoreError::Conflict(Conflict::Destroying))
    ));
    assert!(
        sqlx::query("UPDATE key_versions SET state = 'DISABLED' WHERE version = 1")
            .execute(&s.writer)
            .await
            .is_err()
    );
    // Still listed as due (a restart finishes it), and finishing is idempotent.
    assert_eq!(s.due_destructions(0, 10).await.unwrap().len(), 1);
    let r = s.finish_destruction(&k.id, 1, 6000).await.unwrap();
    assert_eq!(r.version(1).unwrap().state, VersionState::Destroyed);
    assert_eq!(r.version(1).unwrap().destroyed_at, Some(6000));
    let again = s.finish_destruction(&k.id, 1, 7000).await.unwrap();
    assert_eq!(again.version(1).unwrap().destroyed_at, Some(6000));
    assert!(s.due_destructions(i64::MAX, 10).await.unwrap().is_empty());
    let t = s.tombstones(&k.id).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(
        (
            t[0].version,
            t[0].hsm_id,
            t[0].destroyed_at,
            t[0].retire_request.as_deref()
        ),
        (1, ObjectId([1; 16]), 6000, Some("req_1"))
    );
    // Read by sequence, not by time.
    assert_eq!(s.last_tombstone_seq().await.unwrap(), 1);
    assert_eq!(
        s.tombstones_after(0, 10).await.unwrap(),
        vec![(1, ObjectId([1; 16]))]
    );
    assert!(s.tombstones_after(1, 10).await.unwrap().is_empty());
    // Tombstones are permanent; DESTROYED is final; cancel after destruction refused.
    for sql in [
        "DELETE FROM key_tombstones",
        "UPDATE key_tombstones SET destroyed_at = 1",
        "UPDATE key_versions SET state = 'ENABLED' WHERE version = 1",
    ] {
        assert!(
            sqlx::query(sql).execute(&s.writer).await.is_err(),
            "{sql} was allowed"
        );
    }
    assert!(matches!(
        s.apply_lifecycle(&k.id, &Cancel { versions: vec![1] }, 8000)
            .await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::Destroyed
        )))
    ));
    assert!(matches!(
        s.apply_lifecycle(&k.id, &schedule(1, 9000, 6), 8000).await,
        Err(StoreError::Conflict(Conflict::VersionState(
            VersionState::Destroyed
        )))
    ));
}

async fn retention_is_applied_once(db: Arc<TestDb>) {
    use LifecycleChange::*;
    let s = db.open().await;
    let mut nk = new_key("kept", 1);
    nk.retain_until = Some(5000);
    let k = s.create_key(&nk).await.unwrap();
    assert_eq!(k.retain_until, Some(5000));
    assert!(s.keys_due_retention(4999).await.unwrap().is_empty());
    assert_eq!(s.keys_due_retention(5000).await.unwrap(), vec![k.id]);
    // Not before the date.
    assert!(matches!(
        s.apply_lifecycle(
            &k.id,
            &ApplyRetention {
                destroy_at: 9000,
                versions: vec![VersionStamp {
                    version: 1,
                    seq: 2,
                    mac: "r".into()
                }],
                applied_mac: "a".into(),
            },
            4000
        )
        .await,
        Err(StoreError::Conflict(Conflict::RetentionNotDue))
    ));
    let r = s
        .apply_lifecycle(
            &k.id,
            &ApplyRetention {
                destroy_at: 9000,
                versions: vec![VersionStamp {
                    version: 1,
                    seq: 2,
                    mac: "r".into(),
                }],
                applied_mac: "a".into(),
            },
            5000,
        )
        .await
        .unwrap();
    assert_eq!(r.retention_applied_at, Some(5000));
    assert_eq!(
        r.version(1).unwrap().state,
        VersionState::ScheduledForDestruction
    );
    assert_eq!(r.version(1).unwrap().destroy_at, Some(9000));
    assert!(s.keys_due_retention(6000).await.unwrap().is_empty());
    assert!(matches!(
        s.apply_lifecycle(
            &k.id,
            &ApplyRetention {
                destroy_at: 9000,
                versions: vec![VersionStamp {
                    version: 1,
                    seq: 2,
                    mac: "r".into()
                }],
                applied_mac: "a".into(),
            },
            6000
        )
        .await,
        Err(StoreError::Conflict(Conflict::RetentionNotDue))
    ));
    // A new date re-arms it; clearing it disarms it.
    s.apply_lifecycle(
        &k.id,
        &Retention {
            retain_until: Some(7000),
            mac: Some("r7000".into()),
        },
        6000,
    )
    .await
    .unwrap();
    assert_eq!(s.keys_due_retention(7000).await.unwrap(), vec![k.id]);
    s.apply_lifecycle(
        &k.id,
        &Retention {
            retain_until: None,
            mac: None,
        },
        6000,
    )
    .await
    .unwrap();
    assert!(s.keys_due_retention(i64::MAX).await.unwrap().is_empty());
}

async fn due_rotations_follow_the_period_of_the_primary(db: Arc<TestDb>) {
    let s = db.open().await;
    let mut nk = new_key("rotating", 1);
    nk.rotation_period_ms = Some(1000);
    let k = s.create_key(&nk).await.unwrap();
    s.create_key(&new_key("still", 2)).await.unwrap();
    assert!(s.keys_due_rotation(1999).await.unwrap().is_empty());
    assert_eq!(s.keys_due_rotation(2000).await.unwrap(), vec![k.id]);
    s.add_version(&k.id, 2, &ObjectId([9; 16]), "m", 2100)
        .await
        .unwrap();
    assert!(s.keys_due_rotation(3099).await.unwrap().is_empty());
    assert_eq!(s.keys_due_rotation(3100).await.unwrap(), vec![k.id]);
    // A primary that is not ENABLED is not rotated by the schedule.
    s.set_version_state(
        &k.id,
        2,
        &[VersionState::Enabled],
        VersionState::Disabled,
        None,
        3200,
    )
    .await
    .unwrap();
    assert!(s.keys_due_rotation(i64::MAX / 2).await.unwrap().is_empty());
}
