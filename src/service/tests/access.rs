//! Access control: grants that expire with the clock, MFA lock-out, the approved policy
//! over the files.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{caller, caller_with, ok, open_world, two_nodes, World};
use crate::authz::policy::Policy;
use crate::keys::KeyName;
use crate::quorum::totp;
use crate::service::{
    act, AccessOutcome, MfaRefusal, ReloadError, Scope, ServiceConfig, ServiceError, FAILURE_LIMIT,
    FAILURE_WINDOW_MS, LOCKOUT_MS,
};
use crate::store::AccessStore;

const POLICY: &str = r#"
version = 1
[roles.elevator]
[[roles.elevator.allow]]
operations = ["Elevate", "EnrollTotp"]
[roles.reader]
max_elevation = "10m"
[[roles.reader.allow]]
operations = ["GetKey"]
keys = ["*"]
[roles.ops]
mfa = true
[[roles.ops.allow]]
operations = ["RotateKey"]
keys = ["*"]
[[bindings]]
principals = ["p", "m"]
roles = ["elevator"]
[[bindings]]
principals = ["m"]
roles = ["ops"]
"#;

fn config() -> ServiceConfig {
    ServiceConfig {
        access_policy: Policy::parse(POLICY).unwrap(),
        ..ServiceConfig::default()
    }
}

async fn world() -> World {
    open_world(config()).await
}

/// The TOTP secret in an enrolment URI.
fn uri_secret(uri: &str) -> Vec<u8> {
    base32_decode(
        uri.split("secret=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .unwrap(),
    )
}

fn k() -> Scope {
    Scope::key(KeyName::parse("k").unwrap())
}

fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buf, mut bits, mut out) = (0u32, 0, Vec::new());
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

#[tokio::test]
async fn an_elevation_expires_with_the_clock() {
    let w = world().await;
    let (guard, grants) = (&w.svc.guard, &w.svc.grants);
    let p = caller("p", &[]);
    let may_read = |c| async move { guard.authorize::<act::GetKey>(&c, k()).await.is_ok() };
    assert!(!may_read(p.clone()).await);
    // Over the role's maximum, and to a role that may not be elevated to.
    for (role, ms) in [("reader", 11 * 60_000), ("ops", 60_000)] {
        assert!(matches!(
            grants.elevate(&p, role, ms, "why").await,
            Err(ServiceError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        grants.elevate(&p, "reader", 60_000, " ").await,
        Err(ServiceError::InvalidArgument(_))
    ));
    // No quorum gates here (dev mode): granted at once.
    let AccessOutcome::Done(what) = grants
        .elevate(&p, "reader", 60_000, "ticket 1")
        .await
        .unwrap()
    else {
        panic!("no quorum here");
    };
    assert!(what.starts_with("p holds role reader until "), "{what}");
    assert!(may_read(p.clone()).await);
    // Someone else does not hold it.
    assert!(!may_read(caller("m", &[])).await);
    w.clock.advance(60_000);
    assert!(!may_read(p).await);
}

#[tokio::test]
async fn mfa_lockout_lasts_fifteen_minutes() {
    let w = world().await;
    let guard = &w.svc.guard;
    let uri = w.svc.totp.enroll(&caller("m", &[])).await.unwrap().uri;
    let secret = base32_decode(
        uri.split("secret=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .unwrap(),
    );
    let code = |now: i64| Some(totp::hotp(&secret, totp::step_at(now) as u64));
    for _ in 0..5 {
        assert!(matches!(
            guard
                .authorize::<act::RotateKey>(&caller("m", &[]), k())
                .await,
            Err(ServiceError::Mfa(MfaRefusal::Missing))
        ));
    }
    let m = caller_with("m", &[], code(w.now()));
    assert!(matches!(
        guard.authorize::<act::RotateKey>(&m, k()).await,
        Err(ServiceError::Mfa(MfaRefusal::LockedOut))
    ));
    w.clock.advance(LOCKOUT_MS + 1);
    let m = caller_with("m", &[], code(w.now()));
    guard.authorize::<act::RotateKey>(&m, k()).await.unwrap();
    // The same step again is a replay.
    assert!(matches!(
        guard.authorize::<act::RotateKey>(&m, k()).await,
        Err(ServiceError::Mfa(MfaRefusal::Rejected))
    ));
}

#[tokio::test]
async fn an_approved_policy_wins_over_the_files() {
    let w = world().await;
    let guard = &w.svc.guard;
    let p = caller("p", &[]);
    assert!(guard
        .authorize::<act::Elevate>(&p, Scope::none())
        .await
        .is_ok());
    // Another node approved a policy in which p holds nothing.
    w.store_policy("version = 1\n[roles.none]\n").await;
    guard.refresh(true).await;
    assert!(matches!(
        guard.authorize::<act::Elevate>(&p, Scope::none()).await,
        Err(ServiceError::PermissionDenied)
    ));
    // SIGHUP's files no longer replace it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), POLICY).unwrap();
    assert!(matches!(
        w.svc.policies.reload(dir.path()).await,
        Err(ReloadError::ApprovedPolicyInForce)
    ));
    assert!(guard
        .authorize::<act::Elevate>(&p, Scope::none())
        .await
        .is_err());
    // A bad stored policy is refused; the one in force stays.
    w.store_policy("version = 1\n[roles.r]\n[[roles.r.allow]]\noperations = [\"UnwrapKey\", \"Approve\"]\nkeys = [\"*\"]\n").await;
    guard.refresh(true).await;
    assert!(guard.policy().role("none").is_some());
    // Key use still works for whoever the policy allows: nobody, here.
    let admin = super::admin();
    assert!(matches!(
        w.svc.keys.get_key(&admin, "k").await.result,
        Err(ServiceError::PermissionDenied)
    ));
    let _ = ok::<()>;
}

#[tokio::test]
async fn a_grant_does_not_reach_a_token_narrowed_to_other_roles() {
    let w = world().await;
    let (guard, grants) = (&w.svc.guard, &w.svc.grants);
    let narrowed = caller("p", &["elevator"]);
    let whole = caller("p", &[]);
    let AccessOutcome::Done(_) = grants
        .elevate(&whole, "reader", 60_000, "ticket 2")
        .await
        .unwrap()
    else {
        panic!("no quorum here");
    };
    assert!(guard.authorize::<act::GetKey>(&whole, k()).await.is_ok());
    assert!(matches!(
        guard.authorize::<act::GetKey>(&narrowed, k()).await,
        Err(ServiceError::PermissionDenied)
    ));
    // A token narrowed to the granted role carries it.
    let to_reader = caller("p", &["reader"]);
    assert!(guard
        .authorize::<act::GetKey>(&to_reader, k())
        .await
        .is_ok());
}

/// Wrong codes sent all at once to two nodes on one database: each node used to check
/// them one at a time behind its own lock, so the other node's checks ran before the
/// lock-out landed. Every check now needs a slot reserved in the store first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_wrong_codes_on_two_nodes_are_checked_five_at_most() {
    let (w, other) = two_nodes(config()).await;
    for node in [&w.svc, &other] {
        node.sealing
            .open_with_pin(Zeroizing::new(b"pin".to_vec()))
            .await
            .unwrap();
    }
    let secret = uri_secret(&w.svc.totp.enroll(&caller("m", &[])).await.unwrap().uri);
    let code = |now: i64| totp::hotp(&secret, totp::step_at(now) as u64);
    let good = code(w.now());
    let wrong = if good == "000000" { "111111" } else { "000000" };
    let guards = [Arc::clone(&w.svc.guard), Arc::clone(&other.guard)];
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let guard = Arc::clone(&guards[i % 2]);
            tokio::spawn(async move {
                guard
                    .authorize::<act::RotateKey>(&caller_with("m", &[], Some(wrong.into())), k())
                    .await
                    .err()
            })
        })
        .collect();
    let (mut checked, mut locked) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Some(ServiceError::Mfa(MfaRefusal::Rejected)) => checked += 1,
            Some(ServiceError::Mfa(MfaRefusal::LockedOut)) => locked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((checked, locked), (FAILURE_LIMIT as usize, 45));
    let e = w.store.totp_enrolment("m").await.unwrap().unwrap();
    assert_eq!(e.locked_until, Some(w.now() + LOCKOUT_MS));
    // The right code is refused on both nodes until the lock-out ends.
    for node in [&w.svc, &other] {
        let m = caller_with("m", &[], Some(code(w.now())));
        assert!(matches!(
            node.guard.authorize::<act::RotateKey>(&m, k()).await,
            Err(ServiceError::Mfa(MfaRefusal::LockedOut))
        ));
    }
    w.clock.advance(LOCKOUT_MS - 1);
    let m = caller_with("m", &[], Some(code(w.now())));
    assert!(matches!(
        other.guard.authorize::<act::RotateKey>(&m, k()).await,
        Err(ServiceError::Mfa(MfaRefusal::LockedOut))
    ));
    w.clock.advance(1);
    let m = caller_with("m", &[], Some(code(w.now())));
    other
        .guard
        .authorize::<act::RotateKey>(&m, k())
        .await
        .unwrap();
}

/// A passed check gives its slot back; a crash between reservation and check (a slot
/// left pending) counts against the person until the window passes, never for them.
#[tokio::test]
async fn a_passed_check_frees_its_slot_and_a_pending_one_counts_until_the_window_passes() {
    let w = world().await;
    let guard = &w.svc.guard;
    let secret = uri_secret(&w.svc.totp.enroll(&caller("m", &[])).await.unwrap().uri);
    let code = |now: i64| Some(totp::hotp(&secret, totp::step_at(now) as u64));
    // Four attempts left pending, as by a node that died mid-check.
    for i in 0..4 {
        let id = format!("att_crashed{i}");
        w.store
            .reserve_mfa_attempt(&crate::store::MfaAttempt {
                principal: "m",
                id: &id,
                at: w.now(),
                since: w.now() - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
            })
            .await
            .unwrap();
    }
    // Successes do not use up the last slot.
    for _ in 0..3 {
        let m = caller_with("m", &[], code(w.now()));
        guard.authorize::<act::RotateKey>(&m, k()).await.unwrap();
        w.clock.advance(30_000);
    }
    // A failure takes it: nothing is checked any more, but nobody is locked out either
    // (pending attempts are not failures).
    assert!(matches!(
        guard
            .authorize::<act::RotateKey>(&caller("m", &[]), k())
            .await,
        Err(ServiceError::Mfa(MfaRefusal::Missing))
    ));
    let m = caller_with("m", &[], code(w.now()));
    assert!(matches!(
        guard.authorize::<act::RotateKey>(&m, k()).await,
        Err(ServiceError::Mfa(MfaRefusal::LockedOut))
    ));
    assert_eq!(
        w.store
            .totp_enrolment("m")
            .await
            .unwrap()
            .unwrap()
            .locked_until,
        None
    );
    w.clock.advance(FAILURE_WINDOW_MS);
    let m = caller_with("m", &[], code(w.now()));
    guard.authorize::<act::RotateKey>(&m, k()).await.unwrap();
}

/// Binds p to a role that may read every key.
const FORGED_POLICY: &str = r#"
version = 1
[roles.all]
[[roles.all.allow]]
operations = ["GetKey"]
keys = ["*"]
[[bindings]]
principals = ["p"]
roles = ["all"]
"#;

#[tokio::test]
async fn policies_and_grants_a_database_writer_made_are_refused() {
    use crate::store::{GrantRecord, PolicyVersion};
    let w = world().await;
    let guard = &w.svc.guard;
    let p = caller("p", &[]);
    let forged_before = crate::metrics::global()
        .state_forged
        .load(std::sync::atomic::Ordering::Relaxed);
    // A grant of `reader` to p inserted with no MAC, then one with another row's MAC.
    let AccessOutcome::Done(_) = w
        .svc
        .grants
        .elevate(&caller("m", &[]), "reader", 60_000, "ticket 3")
        .await
        .unwrap()
    else {
        panic!("no quorum here");
    };
    let real = w.store.active_grants(w.now()).await.unwrap().pop().unwrap();
    for (id, mac) in [("grant_a", None), ("grant_b", real.mac.clone())] {
        w.store
            .insert_grant(&GrantRecord {
                id: id.into(),
                principal: "p".into(),
                mac,
                ..real.clone()
            })
            .await
            .unwrap();
    }
    guard.refresh(true).await;
    assert!(matches!(
        guard.authorize::<act::GetKey>(&p, k()).await,
        Err(ServiceError::PermissionDenied)
    ));
    // A newer policy that binds everyone to admin, with another version's MAC.
    w.store_policy(POLICY).await;
    guard.refresh(true).await;
    let v1 = w.store.latest_policy().await.unwrap().unwrap();
    w.store
        .insert_policy(&PolicyVersion {
            seq: v1.seq + 1,
            text: FORGED_POLICY.into(),
            ..v1.clone()
        })
        .await
        .unwrap();
    guard.refresh(true).await;
    assert!(Policy::parse(FORGED_POLICY).is_ok());
    assert_eq!(
        guard.policy_seq(),
        v1.seq,
        "the forged version is not in force"
    );
    assert!(guard.authorize::<act::GetKey>(&p, k()).await.is_err());
    let forged_after = crate::metrics::global()
        .state_forged
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        forged_after >= forged_before + 3,
        "{forged_before} -> {forged_after}"
    );
}

/// After the upgrade to state MACs the roster is empty while enrolments exist: the
/// upgrade step seeds it from them, so a deletion made after it is still caught.
#[tokio::test]
async fn the_upgrade_step_seeds_the_roster_with_earlier_enrolments() {
    let w = world().await;
    w.svc.totp.enroll(&caller("m", &[])).await.unwrap();
    // As migration 0008 leaves a database that had enrolments: the genesis roster.
    let r = w.store.roster("totp").await.unwrap().unwrap();
    let genesis = crate::store::Roster {
        members: Vec::new(),
        state_seq: r.state_seq + 1,
        mac: None,
        ..r.clone()
    };
    assert!(w.store.replace_roster(&genesis, r.state_seq).await.unwrap());
    // The next unseal runs the upgrade step (this world re-stamps, as dev mode does).
    w.svc.ctx.engine.take();
    w.svc
        .sealing
        .open_with_pin(Zeroizing::new(b"pin".to_vec()))
        .await
        .unwrap();
    let seeded = w.store.roster("totp").await.unwrap().unwrap();
    assert_eq!(seeded.members, ["m"]);
    assert!(seeded.mac.is_some());
    // m is on the verified roster, so a deleted enrolment of m would be refused
    // (`a_deleted_totp_enrolment_is_not_a_fresh_start` in tests/it/state.rs).
    assert!(w
        .svc
        .guard
        .totp_roster()
        .await
        .unwrap()
        .members
        .contains(&"m".to_string()));
}
