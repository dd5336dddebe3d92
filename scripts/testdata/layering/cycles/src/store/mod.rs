mod lifecycle;
mod sql;
mod tokens;

pub use sql::classify;

/// Used by the children, and this file uses a child: a cycle.
pub enum StoreError {
    Conflict,
}

pub fn open() -> tokens::TokenStore {
    tokens::TokenStore
}
