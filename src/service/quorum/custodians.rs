//! Custodians: who they are, the check of a custodian's share and TOTP code (at unseal
//! and at approval alike), the lock-out, the rules of a new quorum, and the making of new
//! quorums with their kits (init and rekey).
//!
//! Invariants:
//! - A share is accepted only from the identity it belongs to (the commitment binds name
//!   and share), only with a fresh TOTP code (one use per step), and never from a locked
//!   out custodian; every failure counts towards the lock-out
//!   ([`FAILURE_LIMIT`] in [`FAILURE_WINDOW_MS`] lock out for [`LOCKOUT_MS`], write a
//!   `custodian.locked` audit record and raise the `custodian_lockout` alert).
//! - No share or code is checked without an attempt slot reserved in the store first
//!   (ADR 14), so concurrent submissions on any number of nodes get at most
//!   [`FAILURE_LIMIT`] checks per window; one that finds no slot is refused as locked out
//!   unchecked.
//! - Outside dev mode a quorum has `MIN_THRESHOLD ≤ K ≤ N ≤ 16` distinct custodians.
//! - A new quorum secret is wiped before [`Custodians::new_quorum`] returns; nothing of a
//!   kit is stored but token hashes, commitments and share-sealed TOTP secrets.
//! - A kit whose custodian named an `age` recipient leaves only encrypted to it.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::audit::record::codes;
use crate::authz::CUSTODIAN_PREFIX;
use crate::clock::rfc3339;
use crate::quorum::{age, crypto, shamir, totp, QuorumError};
use crate::secret::{BearerToken, Share};
use crate::service::access::{FAILURE_LIMIT, FAILURE_WINDOW_MS, LOCKOUT_MS};
use crate::service::admin::unscoped_record;
use crate::service::context::{Context, Permit};
use crate::service::error::{Rejection, Result, ServiceError};
use crate::service::serial::KeyedLock;
use crate::service::Caller;
use crate::store::{
    Conflict as StoreConflict, CustodianAttempt, CustodianRecord, Failure, QuorumConfig,
    StoreError, TokenRecord,
};

/// Smallest K outside dev mode (DESIGN §2: 2 ≤ K).
pub const MIN_THRESHOLD: u8 = 2;

/// What one custodian receives from `Init` (or from the approval that executes a
/// rekey), once. No `Debug`: it holds a share, a token and a TOTP secret.
pub struct CustodianKit {
    /// Custodian name.
    pub name: String,
    /// The share, in its text form (armored `age` ciphertext when the custodian named a
    /// recipient).
    pub share: Zeroizing<String>,
    /// The custodian's bearer token.
    pub token: BearerToken,
    /// TOTP enrolment URI (`otpauth://…`).
    pub totp_uri: Zeroizing<String>,
}

/// A new quorum, ready to store: the configuration, the custodians and their tokens
/// (hashes), and the kits to hand out (never stored).
pub(super) struct NewQuorumParts {
    pub(super) config: QuorumConfig,
    pub(super) custodians: Vec<CustodianRecord>,
    pub(super) tokens: Vec<TokenRecord>,
    pub(super) kits: Vec<CustodianKit>,
}

/// The custodian name of a caller, if it is a custodian identity.
pub(super) fn custodian_name(caller: &Caller) -> Option<&str> {
    caller.principal.name.strip_prefix(CUSTODIAN_PREFIX)
}

fn valid_custodian_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
}

/// Checks K and the custodian list of a new quorum (`min_threshold ≤ K ≤ N ≤ 16`,
/// distinct valid names); returns N.
pub(super) fn check_quorum(threshold: u8, custodians: &[String], min_threshold: u8) -> Result<u8> {
    let n = u8::try_from(custodians.len())
        .map_err(|_| ServiceError::InvalidArgument("at most 16 custodians"))?;
    if threshold < min_threshold.max(1) || threshold > n || n > shamir::MAX_SHARES {
        return Err(ServiceError::InvalidArgument(
            "need 2 <= threshold <= custodians <= 16",
        ));
    }
    let mut names = HashSet::new();
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

/// Parses `custodian → age1…`; every name must be one of the custodians.
pub(super) fn age_recipients(
    recipients: &BTreeMap<String, String>,
    custodians: &[String],
) -> Result<BTreeMap<String, [u8; 32]>> {
    recipients
        .iter()
        .map(|(name, r)| {
            if !custodians.contains(name) {
                return Err(ServiceError::InvalidArgument(
                    "age recipient for an unknown custodian",
                ));
            }
            let key = age::parse_recipient(r)
                .map_err(|_| ServiceError::InvalidArgument("invalid age recipient"))?;
            Ok((name.clone(), key))
        })
        .collect()
}

/// Replaces the share of each kit whose custodian has a recipient by its armored
/// encryption to that recipient.
pub(super) fn encrypt_kits(
    kits: &mut [CustodianKit],
    recipients: &BTreeMap<String, [u8; 32]>,
) -> Result<()> {
    for kit in kits {
        if let Some(r) = recipients.get(&kit.name) {
            let armored =
                age::encrypt_armored(r, kit.share.as_bytes()).map_err(ServiceError::internal)?;
            kit.share = Zeroizing::new(armored);
        }
    }
    Ok(())
}

/// Custodian checks and new quorums.
pub struct Custodians {
    ctx: Arc<Context>,
    /// Attempt reservations, one at a time per custodian on this node (the lock-out
    /// read and the reservation; the check itself runs outside).
    reserving: KeyedLock,
}

impl Custodians {
    /// Over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Custodians {
            ctx,
            reserving: KeyedLock::default(),
        }
    }

    /// The stored quorum configuration, or `NotInitialised`.
    pub(super) async fn config(&self, permit: &impl Permit) -> Result<QuorumConfig> {
        self.ctx
            .db(permit)
            .quorum_config()
            .await?
            .ok_or(ServiceError::Conflict(
                crate::service::error::Conflict::NotInitialised,
            ))
    }

    /// Whether `name` is a custodian of generation `generation`.
    pub(super) async fn is_custodian(
        &self,
        permit: &impl Permit,
        name: &str,
        generation: i64,
    ) -> Result<bool> {
        match self.ctx.db(permit).custodian(name, generation).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks a custodian's share and TOTP code (lock-out, commitment, replay) in an
    /// attempt slot reserved first, counting failures. Returns the share.
    pub(super) async fn check(
        &self,
        permit: &impl Permit,
        name: &str,
        cfg: &QuorumConfig,
        share_text: &str,
        totp_code: &str,
    ) -> Result<Share> {
        // A burst for one custodian queues here, in memory, until its slot is reserved
        // or refused, rather than on database connections.
        let reserving = self.reserving.lock(name).await;
        let db = self.ctx.db(permit);
        let now = self.ctx.clock.now_ms();
        let record = match db.custodian(name, cfg.generation).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(ServiceError::PermissionDenied),
            Err(e) => return Err(e.into()),
        };
        // Locked out already: refused without a write.
        if record.locked_until.is_some_and(|t| t > now) {
            return Err(ServiceError::Rejected(Rejection::LockedOut));
        }
        let attempt = self.ctx.random_id("att_")?;
        let reserved = db
            .reserve_custodian_attempt(&CustodianAttempt {
                name,
                generation: cfg.generation,
                id: &attempt,
                at: now,
                since: now - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
            })
            .await;
        drop(reserving);
        match reserved {
            Ok(()) => {}
            Err(StoreError::Conflict(StoreConflict::LockedOut)) => {
                tracing::warn!(custodian = name, "custodian check refused: no attempt left");
                return Err(ServiceError::Rejected(Rejection::LockedOut));
            }
            Err(StoreError::NotFound) => return Err(ServiceError::PermissionDenied),
            Err(e) => return Err(e.into()),
        }
        // From here on the slot is settled as a failure or released by the step's use; a
        // store error leaves it pending, which counts as a failure until the window passes.
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
            Ok((share, step)) => match db.use_totp_step(name, cfg.generation, step, &attempt).await
            {
                Ok(()) => Ok(share),
                Err(StoreError::Conflict(_)) => {
                    self.count_failure(permit, name, cfg, &attempt, "totp replay")
                        .await?;
                    Err(ServiceError::Rejected(Rejection::TotpRejected))
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => {
                let reason = match e {
                    QuorumError::TotpRejected => "totp",
                    _ => "share",
                };
                tracing::warn!(custodian = name, reason, "custodian check failed");
                self.count_failure(permit, name, cfg, &attempt, reason)
                    .await?;
                Err(e.into())
            }
        }
    }

    async fn count_failure(
        &self,
        permit: &impl Permit,
        name: &str,
        cfg: &QuorumConfig,
        attempt: &str,
        reason: &str,
    ) -> Result<()> {
        let now = self.ctx.clock.now_ms();
        let n = self
            .ctx
            .db(permit)
            .record_failure(&Failure {
                name,
                generation: cfg.generation,
                attempt,
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
            self.ctx.record_lockout(
                "custodian.locked",
                codes::PERMISSION_DENIED,
                &format!("{CUSTODIAN_PREFIX}{name}"),
                &format!(
                    "custodian={name} failures={n} locked_until={}",
                    rfc3339(now + LOCKOUT_MS)
                ),
            );
        }
        Ok(())
    }

    /// Makes a new quorum secret, splits it K-of-N among `custodians`, seals `pin` under
    /// it, and returns what to store and the kits. The secret is wiped before this
    /// returns; nothing is stored.
    pub(super) fn new_quorum(
        &self,
        threshold: u8,
        custodians: &[String],
        pin: &[u8],
        generation: i64,
    ) -> Result<NewQuorumParts> {
        let n = u8::try_from(custodians.len())
            .map_err(|_| ServiceError::InvalidArgument("at most 16 custodians"))?;
        let secret = crypto::new_secret()?;
        let shares = shamir::split(&secret, threshold, n)?;
        let now = self.ctx.clock.now_ms();
        let config = QuorumConfig {
            generation,
            threshold,
            shares: n,
            sealed_pin: crypto::seal_pin(&secret, pin)?,
            verifier: crypto::verifier(&secret).to_vec(),
            created_at: now,
        };
        drop(secret);
        let mut records = Vec::new();
        let mut tokens = Vec::new();
        let mut kits = Vec::new();
        for (name, share) in custodians.iter().zip(shares) {
            let totp_secret = crate::secret::random::<20>().map_err(ServiceError::internal)?;
            records.push(CustodianRecord {
                name: name.clone(),
                generation,
                share_index: share.x().unwrap_or(0),
                commitment: crypto::commitment(name, &share).to_vec(),
                totp_sealed: crypto::seal_totp(name, &share, totp_secret.as_ref())?,
                totp_last_step: None,
                locked_until: None,
            });
            let token_bytes = crate::secret::random::<32>().map_err(ServiceError::internal)?;
            let token = BearerToken::from_random(&token_bytes);
            let principal = format!("{CUSTODIAN_PREFIX}{name}");
            tokens.push(unscoped_record(
                &token,
                principal,
                vec!["custodian".into()],
                now,
            )?);
            kits.push(CustodianKit {
                name: name.clone(),
                share: shamir::encode(&share),
                token,
                totp_uri: Zeroizing::new(totp::otpauth_uri(name, totp_secret.as_ref())),
            });
        }
        Ok(NewQuorumParts {
            config,
            custodians: records,
            tokens,
            kits,
        })
    }
}
