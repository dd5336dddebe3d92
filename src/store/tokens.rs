//! Bearer tokens ([`TokenStore`]): the one place that reads and writes the `tokens` table —
//! issuing, looking up by hash, listing, revoking — and the in-transaction steps that
//! the quorum's set-up and rekey reuse ([`insert_token_in`],
//! [`revoke_custodian_tokens_in`]).
//!
//! Invariants:
//! - Only the SHA-256 of a token is stored, never the token.
//! - A token id and a token hash are each unique (the database refuses a second one).
//! - Revocation is final: a revoked token is never un-revoked, and revoking it again is
//!   `Conflict::Revoked`. Revoking drops the row's state MAC and advances its
//!   `state_seq` (ADR 12); a revoked row grants nothing, whatever it carries.
//! - The MAC is a column value computed above the store; this file never judges it.
//!
//! Must not import: the other table-family files of `store/`; tonic, prost, cryptoki.

use sqlx::any::AnyRow;

use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::pool::SqlStore;
use super::rows::get;
use crate::secret::TokenHash;

/// A bearer token's stored form (the token itself is never stored).
#[derive(Clone, Debug)]
pub struct TokenRecord {
    /// Public token id (for listing and revocation).
    pub id: String,
    /// SHA-256 of the token.
    pub hash: TokenHash,
    /// The principal the token authenticates.
    pub principal: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; `None` = no expiry.
    pub expires_at: Option<i64>,
    /// Key-name globs the token may touch; empty = every key its roles allow.
    pub key_globs: Vec<String>,
    /// Source networks it may be used from; empty = anywhere.
    pub cidrs: Vec<String>,
    /// Certificate principal it only works with (over mutual TLS).
    pub bound_principal: Option<String>,
    /// Free text.
    pub description: String,
    /// Unix ms when revoked.
    pub revoked_at: Option<i64>,
    /// The row's state sequence: 1 when issued, +1 at revocation (ADR 12).
    pub state_seq: i64,
    /// The row's state MAC (hex, `arca:state-mac`), `q:`-prefixed while it is stamped
    /// only by the quorum at init (restamped by the HSM at unseal), or `None`: not
    /// stamped (written before state MACs, or revoked).
    pub mac: Option<String>,
}

/// Storage of bearer tokens.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores a new token. `AlreadyExists` if its id or hash is taken.
    async fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    /// The token with that hash.
    async fn token_by_hash(&self, hash: &TokenHash) -> Result<TokenRecord>;
    /// Every token, newest first (hashes only, never a token).
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Marks a token revoked at `now` (its MAC is dropped: a revoked row grants nothing);
    /// `NotFound` if no such id; `Conflict::Revoked` if it was revoked already.
    async fn revoke_token(&self, id: &str, now: i64) -> Result<()>;
    /// Replaces the MAC of the live token `id` at sequence `seq` whose MAC is still
    /// `was`; false if the row changed (or was revoked) meanwhile.
    async fn stamp_token(&self, id: &str, seq: i64, was: Option<&str>, mac: &str) -> Result<bool>;
}

/// Every column of a token row, in the order [`insert_token_in`] binds them.
const TOKEN_COLUMNS: &str = "id, token_hash, principal, roles, created_at, \
     expires_at, revoked_at, key_globs, cidrs, bound_principal, description, state_seq, mac";

fn list(v: &[String]) -> String {
    v.join(",")
}

fn unlist(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// Inserts a token row through `exec` (a pool or an open transaction).
pub(super) async fn insert_token_in<'e, E>(exec: E, t: &TokenRecord) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO tokens (id, token_hash, principal, roles, created_at, expires_at, revoked_at, \
         key_globs, cidrs, bound_principal, description, state_seq, mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(t.id.clone())
    .bind(t.hash.to_hex())
    .bind(t.principal.clone())
    .bind(list(&t.roles))
    .bind(t.created_at)
    .bind(t.expires_at)
    .bind(t.revoked_at)
    .bind(list(&t.key_globs))
    .bind(list(&t.cidrs))
    .bind(t.bound_principal.clone())
    .bind(t.description.clone())
    .bind(t.state_seq)
    .bind(t.mac.clone())
    .execute(exec)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Inside a transaction: revokes every custodian token not revoked yet (a rekey makes
/// them all belong to an earlier generation) and returns their ids.
pub(super) async fn revoke_custodian_tokens_in(
    tx: &mut sqlx::AnyConnection,
    now: i64,
) -> Result<Vec<String>> {
    let revoked: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM tokens WHERE principal LIKE 'custodian:%' AND revoked_at IS NULL",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(classify)?;
    sqlx::query(
        "UPDATE tokens SET revoked_at = $1, state_seq = state_seq + 1, mac = NULL \
         WHERE principal LIKE 'custodian:%' AND revoked_at IS NULL",
    )
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    Ok(revoked)
}

/// A token record from a row selected with [`TOKEN_COLUMNS`].
fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(get::<String>(row, "token_hash")?, &mut hash)
        .map_err(|_| StoreError::Corrupt("token hash"))?;
    Ok(TokenRecord {
        id: get(row, "id")?,
        hash: TokenHash(hash),
        principal: get(row, "principal")?,
        roles: unlist(&get::<String>(row, "roles")?),
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        revoked_at: get(row, "revoked_at")?,
        key_globs: unlist(&get::<String>(row, "key_globs")?),
        cidrs: unlist(&get::<String>(row, "cidrs")?),
        bound_principal: get(row, "bound_principal")?,
        description: get(row, "description")?,
        state_seq: get(row, "state_seq")?,
        mac: get(row, "mac")?,
    })
}

#[async_trait::async_trait]
impl TokenStore for SqlStore {
    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        insert_token_in(&self.writer, token).await
    }

    async fn token_by_hash(&self, hash: &TokenHash) -> Result<TokenRecord> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_hash = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(hash.to_hex())
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?
            .ok_or(StoreError::NotFound)?;
        token_from_row(&row)
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at DESC, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1, state_seq = state_seq + 1, mac = NULL \
                 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tokens WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?;
        match exists {
            Some(_) => Err(StoreError::Conflict(Conflict::Revoked)),
            None => Err(StoreError::NotFound),
        }
    }

    async fn stamp_token(&self, id: &str, seq: i64, was: Option<&str>, mac: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tokens SET mac = $1 WHERE id = $2 AND state_seq = $3 \
             AND revoked_at IS NULL AND COALESCE(mac, '') = $4",
        )
        .bind(mac.to_string())
        .bind(id.to_string())
        .bind(seq)
        .bind(was.unwrap_or("").to_string())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }
}
