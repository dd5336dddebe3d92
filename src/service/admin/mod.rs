//! The use cases that change access: token administration ([`Tokens`]), elevation,
//! break-glass and reviews ([`Grants`]), policy changes ([`Policies`]) and TOTP enrolment
//! ([`Totp`]). Each authorizes through the [`Guard`](super::Guard); the gated ones open
//! approval requests through the [`Gate`](super::Gate).
//!
//! Must not import: tonic, prost, sqlx, cryptoki; nor `service::quorum` (which runs the
//! approved forms of these use cases, from above).

mod grants;
mod policies;
mod tokens;
mod totp;

pub use grants::{AccessOutcome, Grants, MAX_REASON};
pub use policies::{Policies, ReloadError};
pub(crate) use tokens::{is_bootstrap_as_issued, unscoped_record};
pub use tokens::{NewToken, TokenInfo, TokenOutcome, Tokens, MAX_TTL_MS};
pub use totp::{Totp, TotpEnrolled};
