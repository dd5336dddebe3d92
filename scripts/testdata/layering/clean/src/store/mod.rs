//! store: a facade over its children; children share error.rs, not this file.
mod error;
mod sql;
mod tokens;

pub use error::StoreError;
pub use sql::Pool;

pub(in crate::store) fn helper() -> Result<(), StoreError> {
    tokens::touch()
}

#[cfg(test)]
mod tests {
    // Test code may reach across layers.
    use crate::service::Caller;
}

#[cfg(test)]
mod contract;
