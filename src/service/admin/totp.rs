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

use crate::quorum::totp;
use crate::service::access::{act, totp_aad, Guard};
use crate::service::context::Context;
use crate::service::error::{Result, ServiceError};
use crate::service::Caller;

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
        }
        let secret = crate::secret::random::<20>().map_err(ServiceError::internal)?;
        engine.ensure_meta_key().await?;
        let sealed = engine
            .seal_meta(totp_aad(name), Zeroizing::new(secret.to_vec()))
            .await?;
        db.enroll_totp(name, &sealed, self.ctx.clock.now_ms())
            .await?;
        tracing::warn!(principal = %name, "TOTP enrolled");
        Ok(TotpEnrolled {
            uri: Zeroizing::new(totp::otpauth_uri(name, secret.as_ref())),
        })
    }
}
