use sqlx::query; // sqlx belongs in store/
// sqlx named in a comment is fine.

pub struct Caller;
pub struct Outcome;

pub fn run() {
    crate::store::serve(&Caller);
}
