//! Dual control (DESIGN §2) as use cases: custodians and their checks, the init and rekey
//! ceremonies, approval requests and their exactly-once execution, sealing and unsealing.
//!
//! Files import downwards only: `custodians` ← `ceremony` ← `approvals` ← `sealing` (an
//! unseal runs what a crash left approved but unrun).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod approvals;
mod ceremony;
mod custodians;
mod sealing;

pub use approvals::{
    Approvals, ApproveOutcome, Executors, MAX_REASON_BYTES, MAX_REQUEST_PAGE,
    REKEY_NEEDS_LIVE_APPROVER,
};
pub use ceremony::{Ceremony, AGE_PARAM_PREFIX};
pub use custodians::{CustodianKit, Custodians, MIN_THRESHOLD};
pub use sealing::{SealStatus, Sealing, UNSEAL_PROGRESS_TTL_MS};
