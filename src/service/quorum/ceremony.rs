//! The quorum ceremonies: `Init` (a fresh random HSM user PIN that no person sees, sealed
//! under a new quorum secret split K-of-N), dev mode's 1-of-1 init, and `Rekey` (a quorum
//! operation: the request here, the run at the K-th approval).
//!
//! Invariants:
//! - Init runs once, only while sealed; every parameter (K, custodians, age recipients) is
//!   checked before the HSM PIN is changed, so a bad recipient does not cost a ceremony.
//! - A rekey commits the new configuration, custodians and tokens in one transaction with
//!   the request's completion, and revokes every earlier custodian token; it refuses a
//!   request made under another quorum generation.
//! - A rekey's parameters are checked again when it runs (threshold, names, recipients).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::{token_row, TOTP_ROSTER};
use crate::authz::AuthMethod;
use crate::service::admin::is_bootstrap_as_issued;
use std::collections::BTreeMap;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::custodians::{
    age_recipients, check_quorum, encrypt_kits, CustodianKit, Custodians, MIN_THRESHOLD,
};
use crate::keys::{HsmAccess, KeysError};
use crate::quorum::approvals::{
    Operation, Parameters, QuorumApproved, PARAM_CUSTODIANS, PARAM_SHARES, PARAM_THRESHOLD,
};
use crate::service::access::{act, Guard, Scope};
use crate::service::context::{Context, Permit};
use crate::service::error::{Conflict, Rejection, Result, ServiceError};
use crate::service::gate::{request_conflict, Gate};
use crate::service::Caller;
use crate::store::{ApprovalRecord, NewQuorum, QuorumConfig, StoreError, TokenRecord};

/// Request-parameter prefix of a rekey's age recipients (`age.NAME = age1…`).
pub const AGE_PARAM_PREFIX: &str = "age.";

/// The init and rekey ceremonies.
pub struct Ceremony {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
    custodians: Arc<Custodians>,
    hsm: HsmAccess,
}

impl Ceremony {
    /// The ceremonies over `ctx`; `hsm` sets the new user PIN at init.
    pub fn new(
        ctx: Arc<Context>,
        guard: Arc<Guard>,
        gate: Arc<Gate>,
        custodians: Arc<Custodians>,
        hsm: HsmAccess,
    ) -> Self {
        Ceremony {
            ctx,
            guard,
            gate,
            custodians,
            hsm,
        }
    }

    /// `Init`: sets a fresh random HSM user PIN with the SO PIN, makes the quorum secret,
    /// splits it K-of-N among `custodians`, and stores only the sealed PIN, the verifier
    /// and the commitments. Returns each custodian's kit, once (the share encrypted to the
    /// custodian's `age` recipient where one is given).
    pub async fn init(
        &self,
        caller: &Caller,
        threshold: u32,
        custodians: &[String],
        so_pin: Zeroizing<String>,
        recipients: &BTreeMap<String, String>,
    ) -> Result<Vec<CustodianKit>> {
        let proof = self
            .guard
            .authorize::<act::Init>(caller, Scope::none())
            .await?;
        // The caller's token (the bootstrap token) was written while no HSM could stamp
        // it: the ceremony vouches for it under the new quorum (ADR 12).
        let vouch = match &caller.principal.method {
            AuthMethod::Token { token_id } => Some(token_id.as_str()),
            AuthMethod::Certificate => None,
        };
        self.init_vouching(
            &proof,
            threshold,
            custodians,
            so_pin,
            recipients,
            MIN_THRESHOLD,
            vouch,
        )
        .await
    }

    /// The init ceremony for the holder of `permit`, with K at least `min_threshold`
    /// ([`MIN_THRESHOLD`] for `Init`; dev mode's `--custodians` may ask for 1).
    pub async fn init_with(
        &self,
        permit: &impl Permit,
        threshold: u32,
        custodians: &[String],
        so_pin: Zeroizing<String>,
        recipients: &BTreeMap<String, String>,
        min_threshold: u8,
    ) -> Result<Vec<CustodianKit>> {
        self.init_vouching(
            permit,
            threshold,
            custodians,
            so_pin,
            recipients,
            min_threshold,
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn init_vouching(
        &self,
        permit: &impl Permit,
        threshold: u32,
        custodians: &[String],
        so_pin: Zeroizing<String>,
        recipients: &BTreeMap<String, String>,
        min_threshold: u8,
        vouch: Option<&str>,
    ) -> Result<Vec<CustodianKit>> {
        let threshold = u8::try_from(threshold)
            .map_err(|_| ServiceError::InvalidArgument("threshold too large"))?;
        // Validated before anything is initialised: a bad recipient must not cost a
        // ceremony whose kits could then not be handed out as planned.
        let recipients = age_recipients(recipients, custodians)?;
        let n = check_quorum(threshold, custodians, min_threshold)?;
        if self.ctx.db(permit).quorum_config().await?.is_some() {
            return Err(ServiceError::Conflict(Conflict::AlreadyInitialised));
        }
        if self.ctx.engine.is_open() {
            return Err(ServiceError::Conflict(Conflict::HsmOpen));
        }
        // A fresh user PIN that no person ever sees.
        let pin_bytes = crate::secret::random::<32>().map_err(ServiceError::internal)?;
        let pin = Zeroizing::new(hex::encode(pin_bytes.as_ref()).into_bytes());
        self.hsm
            .set_user_pin(so_pin, pin.clone())
            .await
            .map_err(|e| match e {
                KeysError::LoginRefused => ServiceError::Rejected(Rejection::SoPinRefused),
                e => e.into(),
            })?;
        let mut kits = self
            .store_new_quorum(permit, threshold, custodians, &pin, 1, vouch)
            .await?;
        encrypt_kits(&mut kits, &recipients)?;
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
    pub async fn dev_init(&self, permit: &impl Permit, pin: &[u8]) -> Result<CustodianKit> {
        let mut kits = self
            .store_new_quorum(permit, 1, &["dev".to_string()], pin, 1, None)
            .await?;
        kits.pop().ok_or(ServiceError::internal("no kit"))
    }

    /// Splits a new quorum secret and stores the sealed PIN, verifier, commitments and
    /// custodian tokens in one transaction.
    async fn store_new_quorum(
        &self,
        permit: &impl Permit,
        threshold: u8,
        custodians: &[String],
        pin: &[u8],
        generation: i64,
        vouch: Option<&str>,
    ) -> Result<Vec<CustodianKit>> {
        let db = self.ctx.db(permit);
        let vouched: Vec<TokenRecord> = match vouch {
            Some(id) => db
                .list_tokens()
                .await?
                .into_iter()
                .filter(|t| t.id == id && is_bootstrap_as_issued(t))
                .collect(),
            None => Vec::new(),
        };
        // The roster of TOTP enrolments starts unstamped (migration 0008); the ceremony
        // vouches for it as it is, like the tokens.
        let roster = db.roster(TOTP_ROSTER).await?.filter(|r| r.mac.is_none());
        let q = self.custodians.new_quorum(
            threshold,
            custodians,
            pin,
            generation,
            &vouched,
            roster.as_ref(),
        )?;
        match db.init_quorum(&q.config, &q.custodians, &q.tokens).await {
            Ok(()) => {
                for (was, t) in vouched.iter().zip(&q.vouched) {
                    if let Some(mac) = &t.mac {
                        db.stamp_token(&t.id, t.state_seq, was.mac.as_deref(), mac)
                            .await?;
                    }
                }
                if let Some(r) = &q.roster {
                    if let Some(mac) = &r.mac {
                        db.stamp_roster(&r.name, r.state_seq, None, mac).await?;
                    }
                }
                Ok(q.kits)
            }
            Err(StoreError::AlreadyExists) => {
                Err(ServiceError::Conflict(Conflict::AlreadyInitialised))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `Rekey`: asks for a rekey to `threshold` of `custodians` (a quorum operation: it
    /// answers an approval request and runs at the K-th approval of the current
    /// custodians). `shares`, when not 0, must equal the number of custodians.
    pub async fn request_rekey(
        &self,
        caller: &Caller,
        threshold: u32,
        custodians: &[String],
        shares: u32,
        recipients: &BTreeMap<String, String>,
    ) -> Result<ApprovalRecord> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::Rekey>(caller, Scope::none())
            .await?;
        let threshold = u8::try_from(threshold)
            .map_err(|_| ServiceError::InvalidArgument("threshold too large"))?;
        age_recipients(recipients, custodians)?;
        if shares != 0 && shares as usize != custodians.len() {
            return Err(ServiceError::InvalidArgument(
                "shares must equal the number of custodians",
            ));
        }
        let n = check_quorum(threshold, custodians, MIN_THRESHOLD)?;
        if !self.ctx.cfg.quorum_gates {
            return Err(ServiceError::FailedPrecondition(
                "rekey needs a quorum of custodians (not dev mode's 1-of-1 or a PIN file)",
            ));
        }
        let mut params = Parameters::new();
        params.insert(PARAM_THRESHOLD.to_string(), threshold.to_string());
        params.insert(PARAM_SHARES.to_string(), n.to_string());
        params.insert(PARAM_CUSTODIANS.to_string(), custodians.join(","));
        for (who, recipient) in recipients {
            params.insert(format!("{AGE_PARAM_PREFIX}{who}"), recipient.clone());
        }
        self.gate.open(&proof, Operation::Rekey, params).await
    }

    /// Runs an approved rekey: a new quorum secret split K'-of-N' among the new
    /// custodians, the PIN sealed under it, and — in one transaction with `EXECUTED` —
    /// the new configuration, custodians and tokens, with every earlier custodian token
    /// revoked. Returns the new kits.
    pub(super) async fn run_rekey(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
        cfg: &QuorumConfig,
        pin: &[u8],
    ) -> Result<Vec<CustodianKit>> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let threshold: u8 = req
            .parameters
            .get(PARAM_THRESHOLD)
            .and_then(|v| v.parse().ok())
            .ok_or(BAD)?;
        let custodians: Vec<String> = req
            .parameters
            .get(PARAM_CUSTODIANS)
            .ok_or(BAD)?
            .split(',')
            .map(str::to_string)
            .collect();
        let shares: usize = req
            .parameters
            .get(PARAM_SHARES)
            .and_then(|v| v.parse().ok())
            .ok_or(BAD)?;
        if shares != custodians.len() {
            return Err(BAD);
        }
        check_quorum(threshold, &custodians, MIN_THRESHOLD).map_err(|_| BAD)?;
        let recipients: BTreeMap<String, String> = req
            .parameters
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(AGE_PARAM_PREFIX)?.to_string(), v.clone())))
            .collect();
        let recipients = age_recipients(&recipients, &custodians).map_err(|_| BAD)?;
        let q = self.custodians.new_quorum(
            threshold,
            &custodians,
            pin,
            cfg.generation + 1,
            &[],
            None,
        )?;
        // Unsealed: the new custodian tokens get HSM MACs at once (ADR 12).
        let mut q = q;
        for t in &mut q.tokens {
            t.mac = None;
            t.mac = Some(self.ctx.stamp(token_row(t)).await?);
        }
        let revoked = self
            .ctx
            .db(ok)
            .complete_rekey(
                &req.id,
                ok,
                &NewQuorum {
                    previous_generation: cfg.generation,
                    config: &q.config,
                    custodians: &q.custodians,
                    tokens: &q.tokens,
                },
                self.ctx.clock.now_ms(),
            )
            .await
            .map_err(request_conflict)?;
        // Revoked custodian tokens stop working here at once (other nodes: within the
        // token cache's lifetime).
        for id in &revoked {
            self.ctx.auth.forget_token(id);
        }
        tracing::warn!(
            threshold,
            custodians = custodians.len(),
            generation = q.config.generation,
            revoked_tokens = revoked.len(),
            "quorum rekeyed: earlier shares and custodian tokens no longer work"
        );
        let mut kits = q.kits;
        encrypt_kits(&mut kits, &recipients)?;
        Ok(kits)
    }
}
