//! Attempt slots (ADR 14), shared by people's MFA (`access.rs`) and custodians' share
//! and TOTP checks (`quorum.rs`): a slot is reserved before a code is checked, under the
//! holder's row lock, only while failures plus slots in flight within the window stay
//! below the limit.
//!
//! Invariants:
//! - The holder's row lock (a no-op update) orders every reservation and failure of one
//!   holder, across PostgreSQL nodes too (SQLite's IMMEDIATE transaction already
//!   serialises them); what follows reads what the previous holder of the lock wrote.
//! - A reservation is a `pending` failure row: it blocks later attempts but never locks
//!   anyone out by itself.
//!
//! Must not import: the table-family files of `store/`; tonic, prost, cryptoki.

use sqlx::Row;

use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::rows::get;
use super::tx::Tx;

/// Whose attempt: a principal (its enrolment row) or a custodian of a generation.
#[derive(Clone, Copy, Debug)]
pub(super) enum Holder<'a> {
    /// `principal_totp` / `principal_failures`.
    Principal(&'a str),
    /// `custodians` / `custodian_failures`.
    Custodian {
        /// Name.
        name: &'a str,
        /// Quorum generation.
        generation: i64,
    },
}

/// A slot to reserve.
pub(super) struct Slot<'a> {
    /// Whose.
    pub(super) holder: Holder<'a>,
    /// The attempt's id.
    pub(super) id: &'a str,
    /// Unix ms.
    pub(super) at: i64,
    /// Count failures and pending attempts after this time...
    pub(super) since: i64,
    /// ...and reserve only while there are fewer than this many.
    pub(super) limit: u32,
}

/// Reserves `slot` in `tx` (committed by the caller): `Conflict::LockedOut` if the holder
/// is locked out or has no attempt left, `NotFound` if it has no row.
pub(super) async fn reserve_in(tx: &mut Tx<'_>, slot: &Slot<'_>) -> Result<()> {
    let (lock, failures, name, generation) = match slot.holder {
        Holder::Principal(p) => (
            "UPDATE principal_totp SET locked_until = locked_until WHERE principal = $1 \
             RETURNING locked_until",
            "principal_failures",
            p,
            None,
        ),
        Holder::Custodian { name, generation } => (
            "UPDATE custodians SET locked_until = locked_until \
             WHERE name = $1 AND generation = $2 RETURNING locked_until",
            "custodian_failures",
            name,
            Some(generation),
        ),
    };
    let mut q = sqlx::query(lock).bind(name.to_string());
    if let Some(g) = generation {
        q = q.bind(g);
    }
    let row = q
        .fetch_optional(&mut **tx)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
    let locked_until: Option<i64> = get(&row, "locked_until")?;
    if locked_until.is_some_and(|t| t > slot.at) {
        return Err(StoreError::Conflict(Conflict::LockedOut));
    }
    let who = if generation.is_some() {
        "custodian"
    } else {
        "principal"
    };
    let count = format!("SELECT COUNT(*) AS n FROM {failures} WHERE {who} = $1 AND at > $2");
    let row = sqlx::query(sqlx::AssertSqlSafe(count))
        .bind(name.to_string())
        .bind(slot.since)
        .fetch_one(&mut **tx)
        .await
        .map_err(classify)?;
    let n: i64 = row.try_get("n").map_err(|_| StoreError::Corrupt("count"))?;
    if n >= i64::from(slot.limit) {
        return Err(StoreError::Conflict(Conflict::LockedOut));
    }
    let insert = format!(
        "INSERT INTO {failures} ({who}, at, reason, attempt) VALUES ($1, $2, 'pending', $3)"
    );
    sqlx::query(sqlx::AssertSqlSafe(insert))
        .bind(name.to_string())
        .bind(slot.at)
        .bind(slot.id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(classify)?;
    Ok(())
}
