//! Access control in the service (DESIGN §5): the [`Guard`] that authenticates callers and
//! makes each call's one authorization decision, the proofs it mints ([`Authorized`],
//! [`Attempt`], [`Authenticated`]), and MFA for people's roles.
//!
//! The use cases that *change* access (tokens, elevation, break-glass, reviews, policy
//! updates, TOTP enrolment) live in `service::admin`, above this module.
//!
//! Must not import: tonic, prost, sqlx, cryptoki; nor any other service module but
//! `context`, `error` and `cache` (this is what the others build on).

mod guard;
mod mfa;
mod proof;

pub use guard::{Guard, REFRESH};
pub(crate) use mfa::totp_aad;
pub use mfa::{FAILURE_LIMIT, FAILURE_WINDOW_MS, LOCKOUT_MS};
pub use proof::{act, Act, Attempt, Authorized, Scope};
