//! Row decoding shared by the table families: a typed column, a version number, an HSM
//! object id.
//!
//! Invariant: a value that does not decode is `StoreError::Corrupt` naming what it was,
//! never a panic and never a default.
//!
//! Must not import: any other file of `store/` but `error.rs`; tonic, prost, cryptoki.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::error::{Result, StoreError};
use crate::keys::ObjectId;

/// Column `col` of `row` as a `T`; `Corrupt` if it has another type.
pub(super) fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col)
        .map_err(|_| StoreError::Corrupt("column type"))
}

/// A stored version number (BIGINT) as a `u32`.
pub(super) fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt("version number"))
}

/// An HSM object id from its stored form (32 hex digits).
pub(super) fn object_id_from_hex(s: &str) -> Result<ObjectId> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id).map_err(|_| StoreError::Corrupt("hsm id"))?;
    Ok(ObjectId(id))
}
