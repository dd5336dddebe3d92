use crate::keys::Caller;
use sqlx::Pool;

pub fn run(c: Caller) -> crate::service::Outcome {
    crate::service::Outcome
}
