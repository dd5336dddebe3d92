//! MFA for people's roles: the caller's `x-arca-totp` code checked against its enrolment,
//! one use per 30-second step, with failures counted towards a lock-out.
//!
//! Invariants:
//! - A TOTP secret exists in clear only while a code is checked (or shown once at
//!   enrolment); it rests sealed under `arca:meta` with AAD binding the principal.
//! - No code is checked without an attempt slot reserved in the store first (ADR 14): at
//!   most [`FAILURE_LIMIT`] failures and attempts in flight per [`FAILURE_WINDOW_MS`],
//!   across every node, so concurrent guesses cannot outrun the lock-out. A caller that
//!   finds no slot is refused as locked out without its code being looked at.
//! - Every failed attempt (missing, wrong or replayed code) keeps its slot as a failure;
//!   a passed check releases it. [`FAILURE_LIMIT`] failures lock the principal out for
//!   [`LOCKOUT_MS`], log an ERROR and write an `mfa.locked` audit record, which raises
//!   the `mfa_lockout` alert.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use super::guard::Guard;
use crate::audit::record::codes;
use crate::clock::rfc3339;
use crate::quorum::totp;
use crate::service::error::{MfaRefusal, Result, ServiceError};
use crate::service::Caller;
use crate::store::{Conflict, MfaAttempt, MfaFailure, StoreError};

/// Failures counted within this window (ms)...
pub const FAILURE_WINDOW_MS: i64 = 15 * 60 * 1000;
/// ...lock a principal or custodian out when they reach this count...
pub const FAILURE_LIMIT: u32 = 5;
/// ...for this long (ms).
pub const LOCKOUT_MS: i64 = 15 * 60 * 1000;

/// The AAD of a principal's sealed TOTP secret.
pub(crate) fn totp_aad(principal: &str) -> Vec<u8> {
    let mut aad = b"arca:totp:".to_vec();
    aad.extend_from_slice(principal.as_bytes());
    aad
}

impl Guard {
    /// Checks the caller's `x-arca-totp` code against its enrolment (one use per step),
    /// in an attempt slot reserved first, counting every failure towards lock-out.
    pub(crate) async fn check_mfa(&self, caller: &Caller) -> Result<()> {
        let name = &caller.principal.name;
        // A burst for one principal queues here, in memory, until its slot is reserved or
        // refused, rather than on database connections (which the audit writer needs too).
        let reserving = self.reserving.lock(name).await;
        let now = self.ctx.clock.now_ms();
        // Reading the enrolment is part of the decision the caller is waiting for.
        let system = self.ctx.system();
        let db = self.ctx.db(&system);
        let Some(enrolment) = db.totp_enrolment(name).await? else {
            return Err(ServiceError::Mfa(MfaRefusal::NotEnrolled));
        };
        // Locked out already: refused without a write.
        if enrolment.locked_until.is_some_and(|t| t > now) {
            return Err(ServiceError::Mfa(MfaRefusal::LockedOut));
        }
        // The secret is opened before the slot is taken, so a sealed node or an HSM
        // outage costs the person no attempt.
        let engine = self.ctx.engine()?;
        let secret = engine
            .open_meta(totp_aad(name), enrolment.sealed)
            .await
            .map_err(ServiceError::internal)?;
        let attempt = self.ctx.random_id("att_")?;
        let reserved = db
            .reserve_mfa_attempt(&MfaAttempt {
                principal: name,
                id: &attempt,
                at: now,
                since: now - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
            })
            .await;
        drop(reserving);
        match reserved {
            Ok(()) => {}
            Err(StoreError::Conflict(Conflict::LockedOut)) => {
                tracing::warn!(principal = %name, "MFA attempt refused: no attempt left");
                return Err(ServiceError::Mfa(MfaRefusal::LockedOut));
            }
            Err(StoreError::NotFound) => return Err(ServiceError::Mfa(MfaRefusal::NotEnrolled)),
            Err(e) => return Err(e.into()),
        }
        // From here on the slot is settled as a failure or released by the step's use; a
        // store error leaves it pending, which counts as a failure until the window passes.
        let Some(code) = caller.mfa.as_ref() else {
            self.count_mfa_failure(name, &attempt, "missing").await?;
            return Err(ServiceError::Mfa(MfaRefusal::Missing));
        };
        match totp::verify(&secret, code.expose(), now, enrolment.last_step) {
            Ok(step) => match db.use_principal_totp_step(name, step, &attempt).await {
                Ok(()) => Ok(()),
                Err(StoreError::Conflict(_)) => {
                    self.count_mfa_failure(name, &attempt, "replay").await?;
                    Err(ServiceError::Mfa(MfaRefusal::Rejected))
                }
                Err(e) => Err(e.into()),
            },
            Err(_) => {
                self.count_mfa_failure(name, &attempt, "totp").await?;
                Err(ServiceError::Mfa(MfaRefusal::Rejected))
            }
        }
    }

    async fn count_mfa_failure(&self, principal: &str, attempt: &str, reason: &str) -> Result<()> {
        let now = self.ctx.clock.now_ms();
        let system = self.ctx.system();
        let n = self
            .ctx
            .db(&system)
            .record_mfa_failure(&MfaFailure {
                principal,
                attempt,
                at: now,
                reason,
                since: now - FAILURE_WINDOW_MS,
                limit: FAILURE_LIMIT,
                lock_until: now + LOCKOUT_MS,
            })
            .await?;
        tracing::warn!(principal, reason, failures = n, "MFA check failed");
        if n >= FAILURE_LIMIT {
            tracing::error!(
                alert = "mfa-lockout",
                principal,
                failures = n,
                "principal locked out after repeated MFA failures"
            );
            self.ctx.record_lockout(
                "mfa.locked",
                codes::UNAUTHENTICATED,
                principal,
                &format!("failures={n} locked_until={}", rfc3339(now + LOCKOUT_MS)),
            );
        }
        Ok(())
    }
}
