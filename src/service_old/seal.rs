//! Sealing, unsealing and initialisation of the quorum (DESIGN §2).
//!
//! The service starts sealed: no HSM session exists and every key operation answers
//! `UNAVAILABLE "sealed"`. K distinct custodians each submit their share with a TOTP
//! code; each share is checked against its custodian's commitment on arrival. At K the
//! quorum secret is rebuilt, checked against the verifier, used to open the sealed HSM
//! PIN, and zeroized; the PIN opens the HSM and is then held only by the HSM layer.
//!
//! Invariants:
//! - A share is accepted only from the identity it belongs to (commitment binds name and
//!   share), once per custodian per unseal, and only with a fresh TOTP code.
//! - Partial unseal progress lives in memory only, and expires [`UNSEAL_PROGRESS_TTL_MS`]
//!   after its first share.
//! - 5 failures in 15 minutes lock a custodian out for 15 minutes.

use std::sync::Arc;

use arca_hsm::{AuthPin, Hsm, HsmError};
use zeroize::Zeroizing;

use super::{ApprovalRecord, Caller, KeyService, Result, ServiceError};
use crate::authz::policy::Action;
use crate::keys::{EngineConfig, KeyEngine};
use crate::quorum::approvals::{
    Operation, Parameters, PARAM_CUSTODIANS, PARAM_SHARES, PARAM_THRESHOLD,
};
use crate::quorum::{crypto, shamir, totp, QuorumError};
use crate::secret::{BearerToken, Share};
use crate::store::{CustodianRecord, Failure, QuorumConfig, StoreError, TokenRecord};

/// Partial unseal progress expires this long after its first share.
pub const UNSEAL_PROGRESS_TTL_MS: i64 = 10 * 60 * 1000;
/// Failures counted within this window...
pub const FAILURE_WINDOW_MS: i64 = 15 * 60 * 1000;
/// ...lock a custodian out when they reach this count...
pub const FAILURE_LIMIT: u32 = 5;
/// ...for this long.
pub const LOCKOUT_MS: i64 = 15 * 60 * 1000;
/// Request-parameter prefix of a rekey's age recipients (`age.NAME = age1…`).
pub const AGE_PARAM_PREFIX: &str = "age.";
/// Principal-name prefix of custodian identities.
pub const CUSTODIAN_PREFIX: &str = "custodian:";

/// Opens the HSM with a PIN (logs in, opens the session pool). Blocking.
pub type HsmOpener =
    Arc<dyn Fn(AuthPin) -> std::result::Result<Arc<dyn Hsm>, HsmError> + Send + Sync>;
/// Sets a new user PIN with the security officer's PIN. Blocking.
pub type PinSetter =
    Arc<dyn Fn(&AuthPin, &AuthPin) -> std::result::Result<(), HsmError> + Send + Sync>;

/// What sealing needs from the outside world, and the in-memory unseal progress.
pub struct SealControl {
    opener: HsmOpener,
    pin_setter: PinSetter,
    engine_cfg: EngineConfig,
    progress: tokio::sync::Mutex<Option<Progress>>,
}

impl SealControl {
    /// A seal control that opens the HSM with `opener` and sets PINs with `pin_setter`.
    pub fn new(opener: HsmOpener, pin_setter: PinSetter, engine_cfg: EngineConfig) -> Self {
        SealControl {
            opener,
            pin_setter,
            engine_cfg,
            progress: tokio::sync::Mutex::new(None),
        }
    }
}

struct Progress {
    started_at: i64,
    shares: Vec<(String, Share)>,
}

/// The seal state as reported to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealStatus {
    /// Whether the quorum was initialised.
    pub initialized: bool,
    /// Whether the service is sealed.
    pub sealed: bool,
    /// K.
    pub threshold: u32,
    /// N.
    pub shares: u32,
    /// Custodians whose shares are held for the unseal in progress.
    pub progress: Vec<String>,
}

/// What one custodian receives from `Init` (or from the approval that executes a
/// rekey), once. No `Debug`: it holds a share, a token and a TOTP secret.
pub struct CustodianKit {
    /// Custodian name.
    pub name: String,
    /// The share, in its text form.
    pub share: Zeroizing<String>,
    /// The custodian's bearer token.
    pub token: BearerToken,
    /// TOTP enrolment URI (`otpauth://…`).
    pub totp_uri: Zeroizing<String>,
}

pub(super) fn quorum_err(e: QuorumError) -> ServiceError {
    match e {
        QuorumError::InvalidParameters(m) => ServiceError::InvalidArgument(m),
        QuorumError::ShareRejected => {
            ServiceError::Rejected("share rejected: it does not belong to this custodian")
        }
        QuorumError::DuplicateShare => {
            ServiceError::Rejected("this custodian has already submitted a share")
        }
        QuorumError::NotEnoughShares => ServiceError::FailedPrecondition("not enough shares"),
        QuorumError::VerifierMismatch => {
            ServiceError::Rejected("the shares do not rebuild the quorum secret; progress cleared")
        }
        QuorumError::SealedValueCorrupt => ServiceError::Internal(Box::new(e)),
        QuorumError::TotpRejected => ServiceError::Rejected("TOTP code rejected"),
        QuorumError::Rng => ServiceError::Internal(Box::new(e)),
    }
}

/// The custodian name of a caller, if it is a custodian identity.
pub(super) fn custodian_name(caller: &Caller) -> Result<&str> {
    caller
        .principal
        .name
        .strip_prefix(CUSTODIAN_PREFIX)
        .ok_or(ServiceError::PermissionDenied)
}

pub(super) fn valid_custodian_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

/// Checks K and the custodian list of a new quorum (`min_threshold ≤ K ≤ N ≤ 16`,
/// distinct valid names); returns N.
fn check_quorum_params(threshold: u8, custodians: &[String], min_threshold: u8) -> Result<u8> {
    let n = u8::try_from(custodians.len())
        .map_err(|_| ServiceError::InvalidArgument("at most 16 custodians"))?;
    if threshold < min_threshold.max(1) || threshold > n || n > shamir::MAX_SHARES {
        return Err(ServiceError::InvalidArgument(
            "need 2 <= threshold <= custodians <= 16",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for c in custodians {
        if !valid_custodian_name(c) {
            return Err(ServiceError::InvalidArgument(
                "custodian names are 1-64 of [a-z0-9._-]",
            ));
        }
        if !names.insert(c) {
            return Err(ServiceError::InvalidArgument(
                "custodian names must be distinct",
            ));
        }
    }
    Ok(n)
}

/// A new quorum, ready to store: the configuration, the custodians and their tokens
/// (hashes), and the kits to hand out (never stored).
pub(super) struct NewQuorumParts {
    pub(super) config: QuorumConfig,
    pub(super) custodians: Vec<CustodianRecord>,
    pub(super) tokens: Vec<TokenRecord>,
    pub(super) kits: Vec<CustodianKit>,
}

impl KeyService {
    /// Asks for a rekey to `threshold` of `custodians` (a quorum operation: it answers
    /// an approval request and runs at the K-th approval of the current custodians).
    /// `shares`, when given, must equal the number of custodians.
    pub async fn request_rekey(
        &self,
        caller: &Caller,
        threshold: u8,
        custodians: &[String],
        shares: Option<u32>,
        min_threshold: u8,
        age_recipients: &std::collections::BTreeMap<String, String>,
    ) -> Result<ApprovalRecord> {
        self.engine()?;
        self.authorize(caller, Action::Rekey, None, None).await?;
        for (who, recipient) in age_recipients {
            if !custodians.contains(who) {
                return Err(ServiceError::InvalidArgument(
                    "age recipient for an unknown custodian",
                ));
            }
            crate::quorum::age::parse_recipient(recipient).map_err(quorum_err)?;
        }
        if shares.is_some_and(|n| n as usize != custodians.len()) {
            return Err(ServiceError::InvalidArgument(
                "shares must equal the number of custodians",
            ));
        }
        let n = check_quorum_params(threshold, custodians, min_threshold)?;
        if !self.cfg.quorum_gates {
            return Err(ServiceError::FailedPrecondition(
                "rekey needs a quorum of custodians (not dev mode's 1-of-1 or a PIN file)",
            ));
        }
        let mut params = Parameters::new();
        params.insert(PARAM_THRESHOLD.to_string(), threshold.to_string());
        params.insert(PARAM_SHARES.to_string(), n.to_string());
        params.insert(PARAM_CUSTODIANS.to_string(), custodians.join(","));
        for (who, recipient) in age_recipients {
            params.insert(format!("{AGE_PARAM_PREFIX}{who}"), recipient.clone());
        }
        self.open_request(caller, Operation::Rekey, params).await
    }

    /// Seal state and unseal progress.
    pub async fn seal_status(&self) -> Result<SealStatus> {
        let cfg = self.quorum.quorum_config().await?;
        let now = self.clock.now_ms();
        let mut progress = self.seal.progress.lock().await;
        if progress
            .as_ref()
            .is_some_and(|p| now - p.started_at > UNSEAL_PROGRESS_TTL_MS)
        {
            *progress = None;
        }
        Ok(SealStatus {
            initialized: cfg.is_some(),
            sealed: self.engine().is_err(),
            threshold: cfg.as_ref().map_or(0, |c| u32::from(c.threshold)),
            shares: cfg.as_ref().map_or(0, |c| u32::from(c.shares)),
            progress: progress
                .as_ref()
                .map(|p| p.shares.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default(),
        })
    }

    /// Initialises dual control: sets a fresh random HSM user PIN with the SO PIN, makes
    /// the quorum secret, splits it K-of-N among `custodians`, and stores only the sealed
    /// PIN, the verifier and the commitments. Returns each custodian's kit, once.
    pub async fn init_quorum(
        &self,
        caller: &Caller,
        threshold: u8,
        custodians: &[String],
        so_pin: AuthPin,
        min_threshold: u8,
    ) -> Result<Vec<CustodianKit>> {
        self.authorize(caller, Action::Init, None, None).await?;
        let n = check_quorum_params(threshold, custodians, min_threshold)?;
        if self.quorum.quorum_config().await?.is_some() {
            return Err(ServiceError::FailedPrecondition("already initialised"));
        }
        if self.engine().is_ok() {
            return Err(ServiceError::FailedPrecondition(
                "the HSM is open; seal the service before initialising",
            ));
        }
        // A fresh user PIN that no person ever sees.
        let pin_bytes = crypto::random::<32>().map_err(quorum_err)?;
        let pin = Zeroizing::new(hex::encode(pin_bytes.as_ref()));
        let setter = Arc::clone(&self.seal.pin_setter);
        let new_pin = AuthPin::from(pin.to_string());
        tokio::task::spawn_blocking(move || setter(&so_pin, &new_pin))
            .await
            .map_err(|e| ServiceError::Internal(Box::new(e)))?
            .map_err(|e| match e {
                HsmError::LoginRefused { .. } => ServiceError::Rejected("the SO PIN was refused"),
                HsmError::Unavailable { .. } => ServiceError::Unavailable("HSM unavailable"),
                e => ServiceError::Internal(Box::new(e)),
            })?;
        let kits = self
            .store_new_quorum(threshold, custodians, pin.as_bytes(), 1)
            .await?;
        tracing::info!(
            threshold,
            custodians = n,
            "dual control initialised; the service is sealed"
        );
        Ok(kits)
    }

    /// Dev mode: seals an existing HSM PIN under a fresh 1-of-1 quorum with the single
    /// custodian `dev`, and returns that custodian's kit (its share is kept in the data
    /// dir for auto-unseal).
    pub async fn dev_init(&self, pin: &[u8]) -> Result<CustodianKit> {
        let mut kits = self
            .store_new_quorum(1, &["dev".to_string()], pin, 1)
            .await?;
        kits.pop().ok_or(ServiceError::Internal("no kit".into()))
    }

    /// The stored quorum configuration, if initialised.
    pub async fn quorum_config(&self) -> Result<Option<QuorumConfig>> {
        Ok(self.quorum.quorum_config().await?)
    }

    /// Splits a new quorum secret and stores the sealed PIN, verifier, commitments and
    /// custodian tokens in one transaction.
    async fn store_new_quorum(
        &self,
        threshold: u8,
        custodians: &[String],
        pin: &[u8],
        generation: i64,
    ) -> Result<Vec<CustodianKit>> {
        let q = self.new_quorum(threshold, custodians, pin, generation)?;
        match self
            .quorum
            .init_quorum(&q.config, &q.custodians, &q.tokens)
            .await
        {
            Ok(()) => Ok(q.kits),
            Err(StoreError::AlreadyExists) => {
                Err(ServiceError::FailedPrecondition("already initialised"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a new quorum secret, splits it K-of-N among `custodians`, seals `pin`
    /// under it, and returns what to store and the kits. The secret is wiped before
    /// this returns; nothing is stored.
    pub(super) fn new_quorum(
        &self,
        threshold: u8,
        custodians: &[String],
        pin: &[u8],
        generation: i64,
    ) -> Result<NewQuorumParts> {
        let n = custodians.len() as u8;
        let secret = crypto::new_secret().map_err(quorum_err)?;
        let shares = shamir::split(&secret, threshold, n).map_err(quorum_err)?;
        let now = self.clock.now_ms();
        let cfg = QuorumConfig {
            generation,
            threshold,
            shares: n,
            sealed_pin: crypto::seal_pin(&secret, pin).map_err(quorum_err)?,
            verifier: crypto::verifier(&secret).to_vec(),
            created_at: now,
        };
        drop(secret);
        let mut records = Vec::new();
        let mut tokens = Vec::new();
        let mut kits = Vec::new();
        for (name, share) in custodians.iter().zip(shares) {
            let totp_secret = crypto::random::<20>().map_err(quorum_err)?;
            records.push(CustodianRecord {
                name: name.clone(),
                generation,
                share_index: share.x().unwrap_or(0),
                commitment: crypto::commitment(name, &share).to_vec(),
                totp_sealed: crypto::seal_totp(name, &share, totp_secret.as_ref())
                    .map_err(quorum_err)?,
                totp_last_step: None,
                locked_until: None,
            });
            let token_bytes = crypto::random::<32>().map_err(quorum_err)?;
            let token = BearerToken::from_random(&token_bytes);
            let id = crypto::random::<8>().map_err(quorum_err)?;
            tokens.push(TokenRecord {
                id: format!("tok_{}", hex::encode(id.as_ref())),
                hash: token.hash(),
                principal: format!("{CUSTODIAN_PREFIX}{name}"),
                roles: vec!["custodian".into()],
                created_at: now,
                expires_at: None,
                revoked_at: None,
                key_globs: Vec::new(),
                cidrs: Vec::new(),
                bound_principal: None,
                description: String::new(),
            });
            kits.push(CustodianKit {
                name: name.clone(),
                share: shamir::encode(&share),
                token,
                totp_uri: Zeroizing::new(totp::otpauth_uri(name, totp_secret.as_ref())),
            });
        }
        Ok(NewQuorumParts {
            config: cfg,
            custodians: records,
            tokens,
            kits,
        })
    }

    /// A custodian submits a share with a TOTP code. At the K-th distinct share the
    /// service unseals.
    pub async fn unseal(
        &self,
        caller: &Caller,
        share_text: &str,
        totp_code: &str,
    ) -> Result<SealStatus> {
        self.authorize(caller, Action::Unseal, None, None).await?;
        let name = custodian_name(caller)?.to_string();
        let cfg = self
            .quorum
            .quorum_config()
            .await?
            .ok_or(ServiceError::FailedPrecondition("not initialised"))?;
        if self.engine().is_ok() {
            return Err(ServiceError::FailedPrecondition("already unsealed"));
        }
        let share = self
            .check_custodian(&name, &cfg, share_text, totp_code)
            .await?;
        let now = self.clock.now_ms();
        let mut progress = self.seal.progress.lock().await;
        if progress
            .as_ref()
            .is_some_and(|p| now - p.started_at > UNSEAL_PROGRESS_TTL_MS)
        {
            tracing::info!("unseal progress expired; starting over");
            *progress = None;
        }
        let p = progress.get_or_insert_with(|| Progress {
            started_at: now,
            shares: Vec::new(),
        });
        if p.shares.iter().any(|(n, _)| *n == name) {
            return Err(quorum_err(QuorumError::DuplicateShare));
        }
        p.shares.push((name.clone(), share));
        tracing::info!(custodian = %name, have = p.shares.len(), need = cfg.threshold, "unseal share accepted");
        if p.shares.len() >= usize::from(cfg.threshold) {
            let taken = progress.take().map(|p| p.shares).unwrap_or_default();
            drop(progress);
            let shares: Vec<Share> = taken.into_iter().map(|(_, s)| s).collect();
            self.unseal_with_shares(&cfg, &shares).await?;
        } else {
            drop(progress);
        }
        self.seal_status().await
    }

    /// Checks a custodian's share and TOTP code (lock-out, commitment, replay), counting
    /// failures. Returns the share.
    pub(super) async fn check_custodian(
        &self,
        name: &str,
        cfg: &QuorumConfig,
        share_text: &str,
        totp_code: &str,
    ) -> Result<Share> {
        let now = self.clock.now_ms();
        let record = match self.quorum.custodian(name, cfg.generation).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(ServiceError::PermissionDenied),
            Err(e) => return Err(e.into()),
        };
        if record.locked_until.is_some_and(|t| t > now) {
            return Err(ServiceError::Rejected(
                "custodian locked out after repeated failures; try later",
            ));
        }
        let checked = shamir::decode(share_text)
            .and_then(|share| {
                crypto::check_commitment(name, &share, &record.commitment)?;
                Ok(share)
            })
            .and_then(|share| {
                let secret = crypto::open_totp(name, &share, &record.totp_sealed)
                    .map_err(|_| QuorumError::ShareRejected)?;
                let step = totp::verify(&secret, totp_code, now, record.totp_last_step)?;
                Ok((share, step))
            });
        match checked {
            Ok((share, step)) => {
                match self.quorum.use_totp_step(name, cfg.generation, step).await {
                    Ok(()) => Ok(share),
                    Err(StoreError::Conflict(_)) => {
                        self.count_failure(name, cfg, "totp replay").await?;
                        Err(quorum_err(QuorumError::TotpRejected))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => {
                let reason = match e {
                    QuorumError::TotpRejected => "totp",
                    _ => "share",
                };
                tracing::warn!(custodian = name, reason, "custodian check failed");
                self.count_failure(name, cfg, reason).await?;
                Err(quorum_err(e))
            }
        }
    }

    async fn count_failure(&self, name: &str, cfg: &QuorumConfig, reason: &str) -> Result<()> {
        let now = self.clock.now_ms();
        let n = self
            .quorum
            .record_failure(&Failure {
                name,
                generation: cfg.generation,
                at: now,
                reason,
                since: now - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
                lock_until: now + LOCKOUT_MS,
            })
            .await?;
        if n >= FAILURE_LIMIT {
            tracing::error!(
                custodian = name,
                failures = n,
                "custodian locked out after repeated failures"
            );
        }
        Ok(())
    }

    /// Rebuilds S from `shares`, checks it, opens the PIN and the HSM. Used by `unseal`
    /// and by dev mode's auto-unseal.
    pub async fn unseal_with_shares(&self, cfg: &QuorumConfig, shares: &[Share]) -> Result<()> {
        let refs: Vec<&Share> = shares.iter().collect();
        let secret = shamir::combine(&refs, cfg.threshold).map_err(quorum_err)?;
        crypto::check_verifier(&secret, &cfg.verifier).map_err(quorum_err)?;
        let pin = crypto::open_pin(&secret, &cfg.sealed_pin).map_err(quorum_err)?;
        drop(secret);
        let pin = AuthPin::from(String::from_utf8_lossy(&pin).into_owned());
        self.open_with_pin(pin).await?;
        tracing::info!("unsealed");
        Ok(())
    }

    /// Opens the HSM with `pin` and starts the engine (unsealed).
    pub async fn open_with_pin(&self, pin: AuthPin) -> Result<()> {
        let opener = Arc::clone(&self.seal.opener);
        let hsm = tokio::task::spawn_blocking(move || opener(pin))
            .await
            .map_err(|e| ServiceError::Internal(Box::new(e)))?
            .map_err(|e| match e {
                HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. } => {
                    ServiceError::Unavailable("HSM unavailable")
                }
                e => ServiceError::Internal(Box::new(e)),
            })?;
        let engine = KeyEngine::start(hsm, &self.seal.engine_cfg)
            .map_err(|e| ServiceError::Internal(Box::new(e)))?;
        if let Ok(mut slot) = self.engine.write() {
            *slot = Some(Arc::new(engine));
        }
        // The system key, and approved requests a crash left unrun (approvals.rs).
        self.after_unseal().await;
        Ok(())
    }

    /// Seals at once: drops the engine (closing every HSM session and logging out) and
    /// any unseal progress.
    pub async fn seal(&self, caller: &Caller) -> Result<SealStatus> {
        self.authorize(caller, Action::Seal, None, None).await?;
        let engine = self.engine.write().ok().and_then(|mut e| e.take());
        *self.seal.progress.lock().await = None;
        if let Some(engine) = engine {
            // Joining the HSM workers blocks; do it off the async threads. Requests that
            // still hold the engine finish first.
            let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
            tracing::warn!("sealed");
        }
        self.seal_status().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::authz::{AuthMethod, Principal};
    use crate::clock::{Clock, ManualClock};
    use crate::service::ServiceConfig;
    use crate::store::{QuorumStore, SqlStore};
    use arca_hsm::fake::FakeHsm;

    const T0: i64 = 1_800_000_000_000;

    async fn service(clock: Arc<ManualClock>) -> (tempfile::TempDir, Arc<SqlStore>, KeyService) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("q.db"))
                .await
                .unwrap(),
        );
        let opener: HsmOpener = Arc::new(|_pin| Ok(Arc::new(FakeHsm::new()) as Arc<dyn Hsm>));
        let setter: PinSetter = Arc::new(|_, _| Ok(()));
        let svc = KeyService::new(
            store.clone(),
            store.clone(),
            store.clone(),
            SealControl::new(opener, setter, EngineConfig::default()),
            clock,
            ServiceConfig::default(),
        );
        (dir, store, svc)
    }

    fn custodian(name: &str) -> Caller {
        Caller {
            principal: Arc::new(Principal {
                name: format!("{CUSTODIAN_PREFIX}{name}"),
                method: AuthMethod::Token {
                    token_id: "t".into(),
                },
                roles: vec!["custodian".into()],
                key_globs: Vec::new(),
            }),
            request_id: "r".into(),
            peer: crate::authz::Peer::default(),
            mfa: None,
        }
    }

    /// The current TOTP code of a custodian, recovered with their share.
    async fn code(store: &SqlStore, kit: &CustodianKit, now: i64) -> String {
        let rec = store.custodian(&kit.name, 1).await.unwrap();
        let share = shamir::decode(&kit.share).unwrap();
        let secret = crypto::open_totp(&kit.name, &share, &rec.totp_sealed).unwrap();
        totp::hotp(&secret, totp::step_at(now) as u64)
    }

    #[tokio::test]
    async fn unseal_progress_expires_after_ten_minutes() {
        let clock = Arc::new(ManualClock::at(T0));
        let (_d, store, svc) = service(clock.clone()).await;
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let kits = svc.store_new_quorum(2, &names, b"pin", 1).await.unwrap();

        let c = code(&store, &kits[0], clock.now_ms()).await;
        let st = svc
            .unseal(&custodian("a"), &kits[0].share, &c)
            .await
            .unwrap();
        assert_eq!(st.progress, ["a"]);
        clock.advance(UNSEAL_PROGRESS_TTL_MS + 1);
        assert!(svc.seal_status().await.unwrap().progress.is_empty());
        // After expiry, one more share is not enough: the first one was dropped.
        let c = code(&store, &kits[1], clock.now_ms()).await;
        let st = svc
            .unseal(&custodian("b"), &kits[1].share, &c)
            .await
            .unwrap();
        assert!(st.sealed);
        assert_eq!(st.progress, ["b"]);
        let c = code(&store, &kits[2], clock.now_ms()).await;
        let st = svc
            .unseal(&custodian("c"), &kits[2].share, &c)
            .await
            .unwrap();
        assert!(!st.sealed);
        assert!(svc.engine().is_ok());
    }

    #[tokio::test]
    async fn lockout_lasts_fifteen_minutes() {
        let clock = Arc::new(ManualClock::at(T0));
        let (_d, store, svc) = service(clock.clone()).await;
        let names: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let kits = svc.store_new_quorum(2, &names, b"pin", 1).await.unwrap();
        let good = code(&store, &kits[0], clock.now_ms()).await;
        let wrong = if good == "000000" { "111111" } else { "000000" };
        for _ in 0..FAILURE_LIMIT {
            assert!(svc
                .unseal(&custodian("a"), &kits[0].share, wrong)
                .await
                .is_err());
        }
        let e = svc
            .unseal(&custodian("a"), &kits[0].share, &good)
            .await
            .err();
        assert!(matches!(e, Some(ServiceError::Rejected(m)) if m.contains("locked out")));
        clock.advance(LOCKOUT_MS + 60_000);
        let c = code(&store, &kits[0], clock.now_ms()).await;
        assert!(svc
            .unseal(&custodian("a"), &kits[0].share, &c)
            .await
            .is_ok());
    }

    /// The PIN that init sets, the quorum secret's shares and the opened PIN reach the
    /// HSM and the custodians only: the database files hold none of them.
    #[tokio::test]
    async fn init_stores_no_pin_or_share_and_unseal_opens_with_the_new_pin() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("q.db"))
                .await
                .unwrap(),
        );
        let set_pin = Arc::new(std::sync::Mutex::new(String::new()));
        let opened_with = Arc::new(std::sync::Mutex::new(String::new()));
        let (sp, ow) = (set_pin.clone(), opened_with.clone());
        let opener: HsmOpener = Arc::new(move |pin: AuthPin| {
            *ow.lock().unwrap() = pin.expose_secret().to_string();
            Ok(Arc::new(FakeHsm::new()) as Arc<dyn Hsm>)
        });
        let setter: PinSetter = Arc::new(move |_so: &AuthPin, new: &AuthPin| {
            *sp.lock().unwrap() = new.expose_secret().to_string();
            Ok(())
        });
        let svc = KeyService::new(
            store.clone(),
            store.clone(),
            store.clone(),
            SealControl::new(opener, setter, EngineConfig::default()),
            Arc::new(ManualClock::at(T0)),
            ServiceConfig::default(),
        );
        let admin = Caller {
            principal: Arc::new(Principal {
                name: "dev-admin".into(),
                method: AuthMethod::Token {
                    token_id: "t".into(),
                },
                roles: vec!["admin".into()],
                key_globs: Vec::new(),
            }),
            request_id: "r".into(),
            peer: crate::authz::Peer::default(),
            mfa: None,
        };
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let kits = svc
            .init_quorum(&admin, 2, &names, AuthPin::from("so".to_string()), 2)
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
            let c = code(&store, k, T0).await;
            let who = k.name.clone();
            svc.unseal(&custodian(&who), &k.share, &c).await.unwrap();
        }
        assert_eq!(
            *opened_with.lock().unwrap(),
            pin,
            "unseal opens the HSM with the PIN init set"
        );
        drop(svc);
        drop(store);
        for f in ["q.db", "q.db-wal", "q.db-shm"] {
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
        let clock = Arc::new(ManualClock::at(T0));
        let (_d, _store, svc) = service(clock).await;
        let admin = Caller {
            principal: Arc::new(Principal {
                name: "dev-admin".into(),
                method: AuthMethod::Token {
                    token_id: "t".into(),
                },
                roles: vec!["admin".into()],
                key_globs: Vec::new(),
            }),
            request_id: "r".into(),
            peer: crate::authz::Peer::default(),
            mfa: None,
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let so = || AuthPin::from("so".to_string());
        for (k, list) in [
            (1u8, names(&["a", "b"])),
            (3, names(&["a", "b"])),
            (2, names(&["a", "a"])),
            (2, names(&["a", "B"])),
        ] {
            assert!(
                svc.init_quorum(&admin, k, &list, so(), 2).await.is_err(),
                "{k} {list:?}"
            );
        }
        assert_eq!(
            svc.init_quorum(&admin, 2, &names(&["a", "b", "c"]), so(), 2)
                .await
                .unwrap()
                .len(),
            3
        );
        assert!(matches!(
            svc.init_quorum(&admin, 2, &names(&["x", "y"]), so(), 2)
                .await,
            Err(ServiceError::FailedPrecondition("already initialised"))
        ));
        // A custodian may not initialise.
        assert!(matches!(
            svc.init_quorum(&custodian("a"), 2, &names(&["x", "y"]), so(), 2)
                .await,
            Err(ServiceError::PermissionDenied)
        ));
    }
}
