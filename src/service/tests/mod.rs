//! Unit tests of the service layer on the in-memory HSM fake and a real SQLite file, with
//! a fixed clock. One world builder for every test module.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod access;
mod approvals;
mod authorization;
mod destroy;
mod people;
mod rekey;
mod sealing;
mod state;

use std::sync::Arc;

use arca_hsm::fake::FakeHsm;
use arca_hsm::Hsm;
use zeroize::Zeroizing;

use super::{Caller, Context, Outcome, ServiceConfig, Services};
use crate::authz::{AuthMethod, Principal, CUSTODIAN_PREFIX};
use crate::clock::{Clock, ManualClock};
use crate::keys::{EngineConfig, HsmAccess, HsmOpener, PinSetter};
use crate::quorum::{crypto, shamir, totp};
use crate::service::CustodianKit;
use crate::store::{QuorumStore, SqlStore};

/// A fixed start time.
pub(super) const T0: i64 = 1_800_000_000_000;
/// One TOTP step.
pub(super) const STEP: i64 = 30_000;

/// The services over a fresh SQLite file and a fixed clock.
pub(super) struct World {
    pub(super) _dir: tempfile::TempDir,
    pub(super) store: Arc<SqlStore>,
    pub(super) svc: Services,
    pub(super) clock: Arc<ManualClock>,
}

/// HSM access over one fake HSM for every open (a re-opened HSM keeps its objects); PIN
/// changes succeed.
pub(super) fn fake_hsm() -> HsmAccess {
    let hsm = Arc::new(FakeHsm::new());
    let opener: HsmOpener = Arc::new(move |_pin| Ok(hsm.clone() as Arc<dyn Hsm>));
    let setter: PinSetter = Arc::new(|_, _| Ok(()));
    HsmAccess::new(opener, setter, EngineConfig::default())
}

/// HSM access over `hsm` for every open: how two nodes share one token.
pub(super) fn hsm_over(hsm: Arc<FakeHsm>) -> HsmAccess {
    let opener: HsmOpener = Arc::new(move |_pin| Ok(hsm.clone() as Arc<dyn Hsm>));
    let setter: PinSetter = Arc::new(|_, _| Ok(()));
    HsmAccess::new(opener, setter, EngineConfig::default())
}

/// Two nodes: sealed worlds with `cfg` on one database and one HSM token (the second
/// node's services share the first's store, clock and token, nothing else).
pub(super) async fn two_nodes(mut cfg: ServiceConfig) -> (World, Services) {
    // Opened with a PIN as dev mode is: the genesis TOTP roster is stamped at the unseal.
    cfg.restamp_unstamped = true;
    let hsm = Arc::new(FakeHsm::new());
    let w = world_with(cfg.clone(), hsm_over(Arc::clone(&hsm))).await;
    let ctx = Arc::new(Context::new(w.store.clone(), w.clock.clone(), cfg));
    let other = Services::new(ctx, hsm_over(hsm));
    (w, other)
}

/// A sealed world with `cfg` and `hsm`.
pub(super) async fn world_with(cfg: ServiceConfig, hsm: HsmAccess) -> World {
    let clock = Arc::new(ManualClock::at(T0));
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::open_sqlite(&dir.path().join("a.db"))
            .await
            .unwrap(),
    );
    let ctx = Arc::new(Context::new(store.clone(), clock.clone(), cfg));
    World {
        _dir: dir,
        store,
        svc: Services::new(ctx, hsm),
        clock,
    }
}

/// An unsealed world with `cfg` (opened with a PIN, as dev mode is: rows without a state
/// MAC, here the genesis TOTP roster, are stamped at the unseal).
pub(super) async fn open_world(mut cfg: ServiceConfig) -> World {
    cfg.restamp_unstamped = true;
    let w = world_with(cfg, fake_hsm()).await;
    w.svc
        .sealing
        .open_with_pin(Zeroizing::new(b"pin".to_vec()))
        .await
        .unwrap();
    w
}

/// A caller named `name` holding `roles` by its token, with TOTP code `mfa`.
pub(super) fn caller_with(name: &str, roles: &[&str], mfa: Option<String>) -> Caller {
    Caller {
        principal: Arc::new(Principal {
            name: name.to_string(),
            method: AuthMethod::Token {
                token_id: "t".into(),
            },
            roles: roles.iter().map(|r| r.to_string()).collect(),
            key_globs: Vec::new(),
        }),
        request_id: "r".into(),
        peer: crate::authz::Peer::default(),
        mfa: mfa.map(crate::authz::TotpCode::new),
    }
}

/// A caller with no token narrowing and no code.
pub(super) fn caller(name: &str, roles: &[&str]) -> Caller {
    caller_with(name, roles, None)
}

/// The dev admin.
pub(super) fn admin() -> Caller {
    caller("dev-admin", &["admin"])
}

/// The custodian identity of `name`.
pub(super) fn custodian(name: &str) -> Caller {
    caller(&format!("{CUSTODIAN_PREFIX}{name}"), &["custodian"])
}

/// The answer of a use case that must have succeeded.
pub(super) fn ok<T>(o: Outcome<T>) -> T {
    match o.result {
        Ok(v) => v,
        Err(e) => panic!("{e:?}"),
    }
}

/// The current TOTP code of a custodian kit of `generation`, recovered with its share.
pub(super) async fn kit_code(
    store: &SqlStore,
    kit: &CustodianKit,
    generation: i64,
    now: i64,
) -> String {
    let rec = store.custodian(&kit.name, generation).await.unwrap();
    let share = shamir::decode(&kit.share).unwrap();
    let secret = crypto::open_totp(&kit.name, &share, &rec.totp_sealed).unwrap();
    totp::hotp(&secret, totp::step_at(now) as u64)
}

impl World {
    /// The current time.
    /// Stores `text` as the next access-policy version, stamped by the HSM as another
    /// node's approval would be.
    pub(super) async fn store_policy(&self, text: &str) {
        use crate::store::AccessStore;
        let seq = self
            .store
            .latest_policy()
            .await
            .unwrap()
            .map_or(0, |v| v.seq)
            + 1;
        let mut v = crate::store::PolicyVersion {
            seq,
            text: text.into(),
            request_id: None,
            created_at: self.now(),
            mac: None,
        };
        let engine = self.svc.ctx.engine().unwrap();
        let row = crate::authz::stamp::policy_row(&v);
        v.mac = Some(crate::authz::stamp::stamp(&engine, row).await.unwrap());
        self.store.insert_policy(&v).await.unwrap();
    }

    pub(super) fn now(&self) -> i64 {
        self.clock.now_ms()
    }
}
