//! Job leases ([`LeaseStore`]): the `job_leases` rows that keep each background job on one
//! node at a time (DESIGN §7: jobs run exactly once across nodes).
//!
//! Invariants:
//! - A lease has one holder until it expires: taking it is one conditional upsert, so two
//!   nodes racing for a free lease cannot both win.
//! - Time is the caller's (`now`), never read here.
//!
//! Must not import: the other files of `store/` but `pool.rs`, `classify.rs` and
//! `error.rs`; tonic, prost, cryptoki.

use super::classify::classify;
use super::error::Result;
use super::pool::SqlStore;

/// Storage of job leases.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes or renews the lease `name` for `holder` until `now + ttl_ms`, if it is free,
    /// expired or already `holder`'s. Returns whether `holder` holds it.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: i64) -> Result<bool>;

    /// Gives the lease up (if `holder` holds it).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
}

#[async_trait::async_trait]
impl LeaseStore for SqlStore {
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO job_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE job_leases.holder = excluded.holder OR job_leases.expires_at <= $4",
        )
        .bind(name.to_string())
        .bind(holder.to_string())
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("UPDATE job_leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name.to_string())
            .bind(holder.to_string())
            .execute(&self.writer)
            .await
            .map_err(classify)?;
        Ok(())
    }
}
