//! Sealing, unsealing and the init ceremony.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{admin, custodian, fake_hsm, kit_code, two_nodes, world_with, World, T0};
use crate::keys::{EngineConfig, HsmAccess, HsmOpener, PinSetter};
use crate::quorum::shamir;
use crate::service::{
    Conflict, CustodianKit, Rejection, ServiceConfig, ServiceError, LOCKOUT_MS,
    UNSEAL_PROGRESS_TTL_MS,
};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A K-of-N quorum of `names` made by dev wiring (any K ≥ 1).
async fn init(w: &World, k: u32, who: &[&str]) -> Vec<CustodianKit> {
    let system = w.svc.ctx.system();
    w.svc
        .ceremony
        .init_with(
            &system,
            k,
            &names(who),
            Zeroizing::new("so".into()),
            &Default::default(),
            1,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn unseal_progress_expires_after_ten_minutes() {
    let w = world_with(ServiceConfig::default(), fake_hsm()).await;
    let kits = init(&w, 2, &["a", "b", "c"]).await;
    let sealing = &w.svc.sealing;
    let c = kit_code(&w.store, &kits[0], 1, w.now()).await;
    let st = sealing
        .unseal(&custodian("a"), &kits[0].share, &c)
        .await
        .unwrap();
    assert_eq!(st.progress, ["a"]);
    w.clock.advance(UNSEAL_PROGRESS_TTL_MS + 1);
    let st = sealing.status(&custodian("a")).await.unwrap();
    assert!(st.progress.is_empty());
    // After expiry, one more share is not enough: the first one was dropped.
    let c = kit_code(&w.store, &kits[1], 1, w.now()).await;
    let st = sealing
        .unseal(&custodian("b"), &kits[1].share, &c)
        .await
        .unwrap();
    assert!(st.sealed);
    assert_eq!(st.progress, ["b"]);
    let c = kit_code(&w.store, &kits[2], 1, w.now()).await;
    let st = sealing
        .unseal(&custodian("c"), &kits[2].share, &c)
        .await
        .unwrap();
    assert!(!st.sealed);
    assert!(w.svc.ctx.engine.is_open());
}

#[tokio::test]
async fn lockout_lasts_fifteen_minutes() {
    let w = world_with(ServiceConfig::default(), fake_hsm()).await;
    let kits = init(&w, 2, &["a", "b"]).await;
    let sealing = &w.svc.sealing;
    let good = kit_code(&w.store, &kits[0], 1, w.now()).await;
    let wrong = if good == "000000" { "111111" } else { "000000" };
    for _ in 0..crate::service::FAILURE_LIMIT {
        assert!(sealing
            .unseal(&custodian("a"), &kits[0].share, wrong)
            .await
            .is_err());
    }
    let e = sealing
        .unseal(&custodian("a"), &kits[0].share, &good)
        .await
        .err();
    assert!(matches!(
        e,
        Some(ServiceError::Rejected(Rejection::LockedOut))
    ));
    w.clock.advance(LOCKOUT_MS + 60_000);
    let c = kit_code(&w.store, &kits[0], 1, w.now()).await;
    assert!(sealing
        .unseal(&custodian("a"), &kits[0].share, &c)
        .await
        .is_ok());
}

/// The PIN that init sets, the quorum secret's shares and the opened PIN reach the HSM
/// and the custodians only: the database files hold none of them.
#[tokio::test]
async fn init_stores_no_pin_or_share_and_unseal_opens_with_the_new_pin() {
    use secrecy::ExposeSecret;
    let set_pin = Arc::new(std::sync::Mutex::new(String::new()));
    let opened_with = Arc::new(std::sync::Mutex::new(String::new()));
    let (sp, ow) = (set_pin.clone(), opened_with.clone());
    let opener: HsmOpener = Arc::new(move |pin: arca_hsm::AuthPin| {
        *ow.lock().unwrap() = pin.expose_secret().to_string();
        Ok(Arc::new(arca_hsm::fake::FakeHsm::new()) as Arc<dyn arca_hsm::Hsm>)
    });
    let setter: PinSetter = Arc::new(move |_so, new: &arca_hsm::AuthPin| {
        *sp.lock().unwrap() = new.expose_secret().to_string();
        Ok(())
    });
    let hsm = HsmAccess::new(opener, setter, EngineConfig::default());
    let w = world_with(ServiceConfig::default(), hsm).await;
    let kits = w
        .svc
        .ceremony
        .init(
            &admin(),
            2,
            &names(&["a", "b", "c"]),
            Zeroizing::new("so".into()),
            &Default::default(),
        )
        .await
        .unwrap();
    let pin = set_pin.lock().unwrap().clone();
    assert_eq!(pin.len(), 64, "a 256-bit random PIN");
    let mut needles: Vec<Vec<u8>> = vec![pin.clone().into_bytes()];
    for k in &kits {
        let share = shamir::decode(&k.share).unwrap();
        needles.push(share.expose().to_vec());
        needles.push(hex::encode(&share.expose()[1..]).into_bytes());
        needles.push(k.token.expose().as_bytes().to_vec());
    }
    for k in &kits[..2] {
        let c = kit_code(&w.store, k, 1, T0).await;
        w.svc
            .sealing
            .unseal(&custodian(&k.name), &k.share, &c)
            .await
            .unwrap();
    }
    assert_eq!(
        *opened_with.lock().unwrap(),
        pin,
        "unseal opens the HSM with the PIN init set"
    );
    let World {
        _dir: dir,
        store,
        svc,
        ..
    } = w;
    drop(svc);
    drop(store);
    for f in ["a.db", "a.db-wal", "a.db-shm"] {
        let Ok(bytes) = std::fs::read(dir.path().join(f)) else {
            continue;
        };
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                "a secret is in {f}"
            );
        }
    }
}

#[tokio::test]
async fn init_refuses_bad_parameters_and_reinit() {
    let w = world_with(ServiceConfig::default(), fake_hsm()).await;
    let ceremony = &w.svc.ceremony;
    let so = || Zeroizing::new("so".to_string());
    let none = Default::default();
    for (k, list) in [
        (1u32, names(&["a", "b"])),
        (3, names(&["a", "b"])),
        (2, names(&["a", "a"])),
        (2, names(&["a", "B"])),
        (300, names(&["a", "b"])),
    ] {
        assert!(
            matches!(
                ceremony.init(&admin(), k, &list, so(), &none).await,
                Err(ServiceError::InvalidArgument(_))
            ),
            "{k} {list:?}"
        );
    }
    let kits = ceremony
        .init(&admin(), 2, &names(&["a", "b", "c"]), so(), &none)
        .await
        .unwrap();
    assert_eq!(kits.len(), 3);
    assert!(matches!(
        ceremony
            .init(&admin(), 2, &names(&["x", "y"]), so(), &none)
            .await,
        Err(ServiceError::Conflict(Conflict::AlreadyInitialised))
    ));
    // A custodian may not initialise.
    assert!(matches!(
        ceremony
            .init(&custodian("a"), 2, &names(&["x", "y"]), so(), &none)
            .await,
        Err(ServiceError::PermissionDenied)
    ));
}

/// What a count of failure rows says: failures recorded for `custodian`.
fn failures(w: &World, custodian: &str) -> i64 {
    let conn = rusqlite::Connection::open(w._dir.path().join("a.db")).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM custodian_failures WHERE custodian = ?1",
        [custodian],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_wrong_codes_are_judged_five_at_most_before_the_lockout() {
    let w = Arc::new(world_with(ServiceConfig::default(), fake_hsm()).await);
    let kits = init(&w, 2, &["a", "b"]).await;
    let good = kit_code(&w.store, &kits[0], 1, w.now()).await;
    let wrong = if good == "000000" { "111111" } else { "000000" };
    let share = Arc::new(kits[0].share.to_string());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (w, share) = (Arc::clone(&w), Arc::clone(&share));
        tasks.push(tokio::spawn(async move {
            w.svc
                .sealing
                .unseal(&custodian("a"), &share, wrong)
                .await
                .err()
        }));
    }
    let mut rejected = 0;
    let mut locked = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(ServiceError::Rejected(Rejection::TotpRejected)) => rejected += 1,
            Some(ServiceError::Rejected(Rejection::LockedOut)) => locked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (rejected, locked),
        (crate::service::FAILURE_LIMIT as usize, 45)
    );
    assert_eq!(failures(&w, "a"), i64::from(crate::service::FAILURE_LIMIT));
}

/// A stolen share with wrong codes sent all at once to two sealed nodes on one
/// database: each node used to check one at a time behind its own lock, so the other
/// node's checks ran before the lock-out landed. Every check now needs a slot reserved
/// in the store first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_wrong_codes_on_two_nodes_are_checked_five_at_most() {
    let (w, other) = two_nodes(ServiceConfig::default()).await;
    let other = Arc::new(other);
    let w = Arc::new(w);
    let kits = init(&w, 2, &["a", "b"]).await;
    let good = kit_code(&w.store, &kits[0], 1, w.now()).await;
    let wrong = if good == "000000" { "111111" } else { "000000" };
    let share = Arc::new(kits[0].share.to_string());
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (w, other, share) = (Arc::clone(&w), Arc::clone(&other), Arc::clone(&share));
        tasks.push(tokio::spawn(async move {
            let sealing = if i % 2 == 0 {
                &w.svc.sealing
            } else {
                &other.sealing
            };
            sealing.unseal(&custodian("a"), &share, wrong).await.err()
        }));
    }
    let (mut checked, mut locked) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Some(ServiceError::Rejected(Rejection::TotpRejected)) => checked += 1,
            Some(ServiceError::Rejected(Rejection::LockedOut)) => locked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (checked, locked),
        (crate::service::FAILURE_LIMIT as usize, 45)
    );
    assert_eq!(failures(&w, "a"), i64::from(crate::service::FAILURE_LIMIT));
    // The right code is refused on both nodes until the lock-out ends.
    for sealing in [&w.svc.sealing, &other.sealing] {
        let c = kit_code(&w.store, &kits[0], 1, w.now()).await;
        assert!(matches!(
            sealing.unseal(&custodian("a"), &kits[0].share, &c).await,
            Err(ServiceError::Rejected(Rejection::LockedOut))
        ));
    }
    w.clock.advance(LOCKOUT_MS);
    let c = kit_code(&w.store, &kits[0], 1, w.now()).await;
    other
        .sealing
        .unseal(&custodian("a"), &kits[0].share, &c)
        .await
        .unwrap();
}

/// Rows the init ceremony writes while the HSM is locked carry the quorum's MAC (`q:…`);
/// the first unseal checks it and stamps them with the HSM. A row a database writer
/// planted with a `q:` MAC of its own (or another row's) is refused, never stamped.
#[tokio::test]
async fn the_first_unseal_stamps_what_init_vouched_for_and_nothing_else() {
    use crate::authz::AuthMethod;
    use crate::store::TokenStore;
    let w = world_with(ServiceConfig::default(), fake_hsm()).await;
    let kits = init(&w, 2, &["a", "b", "c"]).await;
    let tokens = w.store.list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 3);
    assert!(tokens
        .iter()
        .all(|t| t.mac.as_deref().is_some_and(|m| m.starts_with("q:"))));
    // A writer plants a custodian token of their own, with a's quorum MAC copied.
    let mut planted = tokens[0].clone();
    planted.id = "tok_planted".into();
    planted.hash = crate::secret::BearerToken::new("arca_planted".into()).hash();
    planted.principal = "custodian:d".into();
    w.store.insert_token(&planted).await.unwrap();
    for k in &kits[..2] {
        let c = kit_code(&w.store, k, 1, w.now()).await;
        w.svc
            .sealing
            .unseal(&custodian(&k.name), &k.share, &c)
            .await
            .unwrap();
    }
    assert!(w.svc.ctx.engine.is_open());
    for t in w.store.list_tokens().await.unwrap() {
        let mac = t.mac.clone().unwrap_or_default();
        if t.id == "tok_planted" {
            assert!(mac.starts_with("q:"), "the planted row was stamped: {mac}");
        } else {
            assert_eq!(mac.len(), 64, "{} not stamped by the HSM: {mac}", t.id);
        }
    }
    // The kits' tokens work unsealed; the planted one is refused as forged.
    let peer = crate::authz::Peer::default();
    let p = w
        .svc
        .guard
        .authenticate(
            Some(crate::secret::BearerToken::new(
                kits[2].token.expose().to_string(),
            )),
            &peer,
        )
        .await
        .unwrap();
    assert!(matches!(p.method, AuthMethod::Token { .. }));
    assert!(matches!(
        w.svc
            .guard
            .authenticate(
                Some(crate::secret::BearerToken::new("arca_planted".into())),
                &peer
            )
            .await,
        Err(ServiceError::StateForged(_))
    ));
}
