//! `EnrollTotp`: a principal enrols for the TOTP MFA its roles need.
//!
//! Invariants:
//! - The secret is shown once (an `otpauth://` URI) and rests only sealed under
//!   `arca:meta`, with AAD binding the principal.
//! - A principal already enrolled must present a valid current code to re-enrol.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::authz::stamp::roster_row;
use crate::quorum::totp;
use crate::service::access::{act, totp_aad, Guard};
use crate::service::context::Context;
use crate::service::error::{Result, ServiceError};
use crate::service::Caller;
use crate::store::StoreError;

/// A TOTP enrolment, shown once. No `Debug`: it holds the secret.
pub struct TotpEnrolled {
    /// `otpauth://totp/…` with the secret, for an authenticator app.
    pub uri: Zeroizing<String>,
}

/// The TOTP enrolment service.
pub struct Totp {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
}

impl Totp {
    /// The enrolment service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>) -> Self {
        Totp { ctx, guard }
    }

    /// Enrols the caller: a new secret, shown once.
    pub async fn enroll(&self, caller: &Caller) -> Result<TotpEnrolled> {
        let engine = self.ctx.engine()?;
        let proof = self
            .guard
            .authorize_without_mfa::<act::EnrollTotp>(caller)
            .await?;
        let name = &caller.principal.name;
        let db = self.ctx.db(&proof);
        if db.totp_enrolment(name).await?.is_some() {
            self.guard.check_mfa(caller).await?;
        } else if self
            .guard
            .totp_roster()
            .await?
            .members
            .iter()
            .any(|m| m == name)
        {
            return Err(self.guard.enrolment_deleted(name));
        }
        let secret = crate::secret::random::<20>().map_err(ServiceError::internal)?;
        engine.ensure_meta_key().await?;
        let sealed = engine
            .seal_meta(totp_aad(name), Zeroizing::new(secret.to_vec()))
            .await?;
        // The roster gains the principal in the enrolment's own transaction; another
        // enrolment changing it first makes this one read it again.
        let mut tries = 0;
        loop {
            let roster = self.guard.totp_roster().await?;
            let update = if roster.members.iter().any(|m| m == name) {
                None
            } else {
                let mut next = roster.clone();
                next.members.push(name.clone());
                next.members.sort();
                next.state_seq += 1;
                next.mac = None;
                next.mac = Some(self.ctx.stamp(roster_row(&next)).await?);
                Some(next)
            };
            match db
                .enroll_totp(
                    name,
                    &sealed,
                    self.ctx.clock.now_ms(),
                    update.as_ref().map(|r| (r, roster.state_seq)),
                )
                .await
            {
                Ok(()) => break,
                Err(StoreError::Conflict(_)) if tries < 16 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
        tracing::warn!(principal = %name, "TOTP enrolled");
        Ok(TotpEnrolled {
            uri: Zeroizing::new(totp::otpauth_uri(name, secret.as_ref())),
        })
    }
}
