use super::error::StoreError;
use crate::keys::{
    KeyId,
    WrappedKey as Wrapped, // aliases are followed too
};

pub struct Pool;

impl Pool {
    pub fn get(&self) -> Result<Wrapped, StoreError> {
        Ok(crate::keys::WrappedKey(KeyId(1)))
    }
}
