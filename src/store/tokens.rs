//! Bearer-token rows: the one place that reads and writes the `tokens` table. Only the
//! SHA-256 of a token is stored.

use sqlx::any::AnyRow;

use super::sql::{classify, get, SqlStore};
use super::{Result, StoreError, TokenRecord};
use crate::secret::TokenHash;

/// Every column of a token row, in the order [`insert_token_in`] binds them.
pub(super) const TOKEN_COLUMNS: &str = "id, token_hash, principal, roles, created_at, \
     expires_at, revoked_at, key_globs, cidrs, bound_principal, description";

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
         key_globs, cidrs, bound_principal, description) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
    .execute(exec)
    .await
    .map_err(classify)?;
    Ok(())
}

/// A token record from a row selected with [`TOKEN_COLUMNS`].
pub(super) fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
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
    })
}

/// Token administration.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Every token, newest first (hashes only, never a token).
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Marks a token revoked at `now`; `NotFound` if no such id; `StateConflict` if it
    /// was revoked already.
    async fn revoke_token(&self, id: &str, now: i64) -> Result<()>;
}

#[async_trait::async_trait]
impl TokenStore for SqlStore {
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at DESC, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<()> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
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
            Some(_) => Err(StoreError::StateConflict { current: "revoked" }),
            None => Err(StoreError::NotFound),
        }
    }
}
