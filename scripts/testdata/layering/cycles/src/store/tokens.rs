use super::StoreError;

pub struct TokenStore;

fn conflict() -> StoreError {
    StoreError::Conflict
}
