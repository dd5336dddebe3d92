//! Destroy reaches every node (issue 18, item 13): tombstones are read by database
//! sequence, applied only when the HSM confirmed the forget, retried, and a node that
//! cannot forget tears its HSM sessions down; meanwhile nothing unwraps under the object.

use std::sync::Arc;

use arca_hsm::fake::FakeHsm;
use zeroize::Zeroizing;

use super::{admin, hsm_over, ok, world_with, World};
use crate::keys::{EncryptionContext, KeyName, ObjectId};
use crate::service::{Conflict, Forgotten, JobConfig, ServiceConfig, ServiceError};
use crate::store::{KeyStore, LifecycleChange, LifecycleStore, VersionStamp};

/// An unsealed world over `hsm`, with a key `phi` (v1) and a data key under it.
async fn world_over(hsm: Arc<FakeHsm>) -> (World, Vec<u8>) {
    let cfg = ServiceConfig {
        restamp_unstamped: true,
        ..ServiceConfig::default()
    };
    let w = world_with(cfg, hsm_over(hsm)).await;
    w.svc
        .sealing
        .open_with_pin(Zeroizing::new(b"pin".to_vec()))
        .await
        .unwrap();
    ok(w.svc
        .keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    let dk = ok(w
        .svc
        .keys
        .generate_data_key(&admin(), "phi", EncryptionContext::new(), true)
        .await);
    (w, dk.wrapped)
}

/// Destroys v1 of `phi` in the database, as the destroyer on another node does (its
/// tombstone is written with `at`, that node's clock). Returns v1's HSM object.
async fn destroy_v1_elsewhere(w: &World, at: i64) -> ObjectId {
    let key = w
        .store
        .key_by_name(&KeyName::parse("phi").unwrap())
        .await
        .unwrap();
    let v1 = key.version(1).unwrap();
    let object = v1.hsm_id;
    // The destroyer's own MAC checks are not what is tested here: the rows are written
    // as that node's store calls would, with a placeholder stamp.
    let change = LifecycleChange::Schedule {
        versions: vec![VersionStamp {
            version: 1,
            seq: v1.state_seq + 1,
            mac: "elsewhere".into(),
        }],
        destroy_at: at,
        request: None,
    };
    w.store.apply_lifecycle(&key.id, &change, at).await.unwrap();
    w.store.begin_destruction(&key.id, 1, at).await.unwrap();
    w.store.finish_destruction(&key.id, 1, at).await.unwrap();
    object
}

async fn pass(w: &World, forgotten: &mut Forgotten) {
    w.svc
        .jobs
        .pass(&JobConfig::default(), forgotten)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_forget_that_fails_twice_is_applied_only_when_it_succeeds() {
    let hsm = Arc::new(FakeHsm::new());
    let (w, _) = world_over(Arc::clone(&hsm)).await;
    let mut forgotten = Forgotten::new();
    pass(&w, &mut forgotten).await;
    let start = forgotten.applied_through().unwrap();
    let object = destroy_v1_elsewhere(&w, w.now()).await;
    hsm.fail_forgets(2);
    for failed in 1..=2 {
        pass(&w, &mut forgotten).await;
        assert_eq!(forgotten.pending(), 1, "pass {failed}: not applied");
        assert_eq!(forgotten.applied_through(), Some(start), "pass {failed}");
        assert!(w.svc.ctx.forgetting.is_pending(&object));
    }
    assert_eq!(hsm.forget_count(), 0);
    // The third pass: the HSM says so, and only now it counts.
    pass(&w, &mut forgotten).await;
    assert_eq!(forgotten.pending(), 0);
    assert_eq!(forgotten.applied_through(), Some(start + 1));
    assert!(!w.svc.ctx.forgetting.is_pending(&object));
    assert_eq!(hsm.forget_count(), 1);
    assert_eq!(hsm.reset_count(), 0, "no teardown for two failures");
}

#[tokio::test]
async fn a_forget_that_keeps_failing_tears_the_sessions_down() {
    let hsm = Arc::new(FakeHsm::new());
    let (w, _) = world_over(Arc::clone(&hsm)).await;
    let mut forgotten = Forgotten::new();
    pass(&w, &mut forgotten).await;
    let object = destroy_v1_elsewhere(&w, w.now()).await;
    hsm.fail_forgets(u32::MAX);
    for _ in 1..Forgotten::MAX_FAILED_PASSES {
        pass(&w, &mut forgotten).await;
        assert_eq!(hsm.reset_count(), 0);
        assert_eq!(forgotten.pending(), 1);
    }
    pass(&w, &mut forgotten).await;
    assert_eq!(hsm.reset_count(), 1, "sessions torn down");
    assert_eq!(forgotten.pending(), 0, "the teardown applies it");
    assert!(!w.svc.ctx.forgetting.is_pending(&object));
}

#[tokio::test]
async fn a_clock_far_ahead_does_not_skip_tombstones() {
    let hsm = Arc::new(FakeHsm::new());
    let (w, _) = world_over(Arc::clone(&hsm)).await;
    // This node's clock runs a day ahead when it starts reading tombstones; the
    // destroyer's clock (the tombstone's time) is right.
    let right = w.now();
    w.clock.advance(24 * 3600 * 1000);
    let mut forgotten = Forgotten::new();
    pass(&w, &mut forgotten).await;
    destroy_v1_elsewhere(&w, right).await;
    pass(&w, &mut forgotten).await;
    assert_eq!(hsm.forget_count(), 1, "the tombstone was read and applied");
    assert_eq!(forgotten.pending(), 0);
}

#[tokio::test]
async fn nothing_unwraps_or_wraps_under_an_object_whose_forget_is_pending() {
    let hsm = Arc::new(FakeHsm::new());
    let (w, blob) = world_over(hsm).await;
    let key = w
        .store
        .key_by_name(&KeyName::parse("phi").unwrap())
        .await
        .unwrap();
    let object = key.version(1).unwrap().hsm_id;
    ok(w.svc
        .keys
        .unwrap_key(&admin(), &blob, EncryptionContext::new())
        .await);
    // The database (or the key cache) still says ENABLED; the node's pending tombstone
    // decides.
    w.svc.ctx.forgetting.add(object);
    assert!(matches!(
        w.svc
            .keys
            .unwrap_key(&admin(), &blob, EncryptionContext::new())
            .await
            .result,
        Err(ServiceError::Conflict(Conflict::VersionDestroyed))
    ));
    // Nor does it wrap under it, were it the primary.
    assert!(matches!(
        w.svc
            .keys
            .generate_data_key(&admin(), "phi", EncryptionContext::new(), true)
            .await
            .result,
        Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled))
    ));
    w.svc.ctx.forgetting.remove(&object);
    ok(w.svc
        .keys
        .unwrap_key(&admin(), &blob, EncryptionContext::new())
        .await);
}
