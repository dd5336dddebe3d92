//! MFA for people's roles: the caller's `x-arca-totp` code checked against its enrolment,
//! one use per 30-second step, with failures counted towards a lock-out.
//!
//! Invariants:
//! - A TOTP secret exists in clear only while a code is checked (or shown once at
//!   enrolment); it rests sealed under `arca:meta` with AAD binding the principal.
//! - Every failed attempt (missing, wrong or replayed code) is counted; [`FAILURE_LIMIT`]
//!   in [`FAILURE_WINDOW_MS`] lock the principal out for [`LOCKOUT_MS`] and log an ERROR.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use super::guard::Guard;
use crate::quorum::totp;
use crate::service::error::{MfaRefusal, Result, ServiceError};
use crate::service::Caller;
use crate::store::{MfaFailure, StoreError};

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
    /// counting every failure towards lock-out.
    pub(crate) async fn check_mfa(&self, caller: &Caller) -> Result<()> {
        let name = &caller.principal.name;
        // One check at a time per principal on this node: the lock-out is read, the code
        // checked and the failure counted before the next attempt is looked at.
        let _one = self.mfa_checks.lock(name).await;
        let now = self.ctx.clock.now_ms();
        // Reading the enrolment is part of the decision the caller is waiting for.
        let system = self.ctx.system();
        let db = self.ctx.db(&system);
        let Some(enrolment) = db.totp_enrolment(name).await? else {
            return Err(ServiceError::Mfa(MfaRefusal::NotEnrolled));
        };
        if enrolment.locked_until.is_some_and(|t| t > now) {
            return Err(ServiceError::Mfa(MfaRefusal::LockedOut));
        }
        let Some(code) = caller.mfa.as_ref() else {
            self.count_mfa_failure(name, "missing").await?;
            return Err(ServiceError::Mfa(MfaRefusal::Missing));
        };
        let engine = self.ctx.engine()?;
        let secret = engine
            .open_meta(totp_aad(name), enrolment.sealed)
            .await
            .map_err(ServiceError::internal)?;
        match totp::verify(&secret, code.expose(), now, enrolment.last_step) {
            Ok(step) => match db.use_principal_totp_step(name, step).await {
                Ok(()) => Ok(()),
                Err(StoreError::Conflict(_)) => {
                    self.count_mfa_failure(name, "replay").await?;
                    Err(ServiceError::Mfa(MfaRefusal::Rejected))
                }
                Err(e) => Err(e.into()),
            },
            Err(_) => {
                self.count_mfa_failure(name, "totp").await?;
                Err(ServiceError::Mfa(MfaRefusal::Rejected))
            }
        }
    }

    async fn count_mfa_failure(&self, principal: &str, reason: &str) -> Result<()> {
        let now = self.ctx.clock.now_ms();
        let system = self.ctx.system();
        let n = self
            .ctx
            .db(&system)
            .record_mfa_failure(&MfaFailure {
                principal,
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
        }
        Ok(())
    }
}
