//! Dual-control state ([`QuorumStore`]): the quorum's sealed configuration
//! (`quorum_config`), its custodians (`custodians`) and their failed attempts
//! (`custodian_failures`); the persistent counters (`counters`: refused HSM logins); and
//! the in-transaction steps a rekey's completion reuses
//! ([`insert_custodian_in`], [`replace_config_in`]).
//!
//! Invariants:
//! - Initialisation happens once (a single-row table); a rekey replaces the configuration
//!   only while the generation it replaces is current (`Conflict::Generation`).
//! - A TOTP step is recorded with a conditional update, so a code is accepted at most once
//!   even across nodes (`Conflict::StepUsed` on a replay).
//! - A share and code are checked only in an attempt slot reserved before (ADR 14):
//!   under the custodian's row lock, a `pending` failure row is added only while the
//!   custodian is not locked out and its failures plus pending attempts in the window are
//!   below the limit (`Conflict::LockedOut` otherwise). A failed check settles its row as
//!   a failure, counted under the same row lock (locking at the limit), so concurrent
//!   attempts on several nodes count each other; a passed check deletes it with the step
//!   it used. A row left pending (a crash) counts until the window passes.
//! - No share and no PIN is stored: the PIN only sealed under the quorum secret, a share
//!   only as its commitment.
//!
//! Must not import: table-family files of `store/` other than `tokens.rs`; tonic, prost,
//! cryptoki.

use sqlx::Row;

use super::attempts::{reserve_in, Holder, Slot};
use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::pool::SqlStore;
use super::rows::get;
use super::tokens::{insert_token_in, TokenRecord};

/// The sealed configuration of the quorum.
#[derive(Clone, Debug)]
pub struct QuorumConfig {
    /// Increases with every rekey.
    pub generation: i64,
    /// K.
    pub threshold: u8,
    /// N.
    pub shares: u8,
    /// The HSM user PIN sealed under the quorum secret (nonce ‖ ciphertext).
    pub sealed_pin: Vec<u8>,
    /// HKDF of the quorum secret, to check a rebuilt secret.
    pub verifier: Vec<u8>,
    /// Unix ms.
    pub created_at: i64,
}

/// One custodian of the current (or a past) generation.
#[derive(Clone, Debug)]
pub struct CustodianRecord {
    /// Name, e.g. `alice`.
    pub name: String,
    /// Quorum generation.
    pub generation: i64,
    /// Shamir x-coordinate of this custodian's share.
    pub share_index: u8,
    /// SHA-256 commitment to the share.
    pub commitment: Vec<u8>,
    /// TOTP secret sealed under a key derived from the share.
    pub totp_sealed: Vec<u8>,
    /// Last TOTP step accepted.
    pub totp_last_step: Option<i64>,
    /// Locked out until (Unix ms).
    pub locked_until: Option<i64>,
}

/// A custodian's attempt to reserve before its share and code are checked.
#[derive(Clone, Debug)]
pub struct CustodianAttempt<'a> {
    /// Custodian.
    pub name: &'a str,
    /// Quorum generation.
    pub generation: i64,
    /// The attempt's id (random, unique), to settle or release it by.
    pub id: &'a str,
    /// Unix ms.
    pub at: i64,
    /// Count failures and pending attempts after this time (Unix ms)...
    pub since: i64,
    /// ...and reserve only while there are fewer than this many.
    pub limit: u32,
}

/// A custodian's failed attempt, and the lock-out rule to apply.
#[derive(Clone, Debug)]
pub struct Failure<'a> {
    /// Custodian.
    pub name: &'a str,
    /// Quorum generation.
    pub generation: i64,
    /// The reserved attempt this failure settles.
    pub attempt: &'a str,
    /// Unix ms.
    pub at: i64,
    /// What failed (`share`, `totp`, `totp replay`).
    pub reason: &'a str,
    /// Count failures after this time (Unix ms)...
    pub since: i64,
    /// ...and lock the custodian when there are this many...
    pub limit: u32,
    /// ...until this time (Unix ms).
    pub lock_until: i64,
}

/// A persistent counter (`counters`, migration 0012): it only grows and is never deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Logins the HSM refused (each sealed the node that saw it).
    HsmLoginsRefused,
}

impl Counter {
    /// Its row's name.
    pub fn name(self) -> &'static str {
        match self {
            Counter::HsmLoginsRefused => "hsm_logins_refused",
        }
    }
}

/// Storage of dual-control state (approval requests are `ApprovalStore`'s).
#[async_trait::async_trait]
pub trait QuorumStore: Send + Sync + 'static {
    /// Adds one to `counter` (made at 1 the first time) and returns its new value.
    async fn bump_counter(&self, counter: Counter, now: i64) -> Result<u64>;

    /// The value of `counter` (0 if it never counted).
    async fn counter(&self, counter: Counter) -> Result<u64>;

    /// The configuration, if the quorum was initialised.
    async fn quorum_config(&self) -> Result<Option<QuorumConfig>>;

    /// Stores the configuration, custodians and custodian tokens in one transaction.
    /// `AlreadyExists` if the quorum was initialised before.
    async fn init_quorum(
        &self,
        cfg: &QuorumConfig,
        custodians: &[CustodianRecord],
        tokens: &[TokenRecord],
    ) -> Result<()>;

    /// A custodian of the given generation.
    async fn custodian(&self, name: &str, generation: i64) -> Result<CustodianRecord>;

    /// Reserves an attempt slot before a share and code are checked:
    /// `Conflict::LockedOut` if the custodian is locked out or its failures and pending
    /// attempts within the window reach the limit; `NotFound` for no such custodian.
    async fn reserve_custodian_attempt(&self, attempt: &CustodianAttempt<'_>) -> Result<()>;

    /// Records that `step` was used and releases the attempt's slot, in one transaction;
    /// `Conflict::StepUsed` if that step or a later one was already used (a replay; the
    /// slot stays reserved).
    async fn use_totp_step(
        &self,
        name: &str,
        generation: i64,
        step: i64,
        attempt: &str,
    ) -> Result<()>;

    /// Settles a reserved attempt as a failure and returns how many failures the
    /// custodian has within the policy's window; locks the custodian when that count
    /// reaches the limit.
    async fn record_failure(&self, failure: &Failure<'_>) -> Result<u32>;
}

/// Inside a transaction: adds a custodian of its generation, created at `now`.
pub(super) async fn insert_custodian_in(
    tx: &mut sqlx::AnyConnection,
    c: &CustodianRecord,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO custodians (name, generation, share_index, commitment, totp_sealed, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(c.name.clone())
    .bind(c.generation)
    .bind(i64::from(c.share_index))
    .bind(hex::encode(&c.commitment))
    .bind(hex::encode(&c.totp_sealed))
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Inside a transaction: replaces the configuration with `cfg`, only while
/// `previous_generation` is current (`Conflict::Generation` otherwise).
pub(super) async fn replace_config_in(
    tx: &mut sqlx::AnyConnection,
    cfg: &QuorumConfig,
    previous_generation: i64,
    now: i64,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE quorum_config SET generation = $1, threshold = $2, shares = $3, \
         sealed_pin = $4, verifier = $5, updated_at = $6 WHERE id = 1 AND generation = $7",
    )
    .bind(cfg.generation)
    .bind(i64::from(cfg.threshold))
    .bind(i64::from(cfg.shares))
    .bind(hex::encode(&cfg.sealed_pin))
    .bind(hex::encode(&cfg.verifier))
    .bind(now)
    .bind(previous_generation)
    .execute(&mut *tx)
    .await
    .map_err(classify)?;
    if done.rows_affected() != 1 {
        return Err(StoreError::Conflict(Conflict::Generation));
    }
    Ok(())
}

fn custodian_from_row(row: &sqlx::any::AnyRow) -> Result<CustodianRecord> {
    Ok(CustodianRecord {
        name: get(row, "name")?,
        generation: get(row, "generation")?,
        share_index: u8::try_from(get::<i64>(row, "share_index")?)
            .map_err(|_| StoreError::Corrupt("share index"))?,
        commitment: hex::decode(get::<String>(row, "commitment")?)
            .map_err(|_| StoreError::Corrupt("commitment"))?,
        totp_sealed: hex::decode(get::<String>(row, "totp_sealed")?)
            .map_err(|_| StoreError::Corrupt("totp"))?,
        totp_last_step: get(row, "totp_last_step")?,
        locked_until: get(row, "locked_until")?,
    })
}

#[async_trait::async_trait]
impl QuorumStore for SqlStore {
    async fn bump_counter(&self, counter: Counter, now: i64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "INSERT INTO counters (name, value, updated_at) VALUES ($1, 1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = counters.value + 1, updated_at = $2 \
             RETURNING value",
        )
        .bind(counter.name())
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        let v: i64 = get(&row, "value")?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt("counter"))
    }

    async fn counter(&self, counter: Counter) -> Result<u64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT value FROM counters WHERE name = $1")
            .bind(counter.name())
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?;
        u64::try_from(v.unwrap_or(0)).map_err(|_| StoreError::Corrupt("counter"))
    }

    async fn quorum_config(&self) -> Result<Option<QuorumConfig>> {
        let row = sqlx::query(
            "SELECT generation, threshold, shares, sealed_pin, verifier, created_at \
             FROM quorum_config WHERE id = 1",
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(QuorumConfig {
            generation: get(&row, "generation")?,
            threshold: u8::try_from(get::<i64>(&row, "threshold")?)
                .map_err(|_| StoreError::Corrupt("threshold"))?,
            shares: u8::try_from(get::<i64>(&row, "shares")?)
                .map_err(|_| StoreError::Corrupt("shares"))?,
            sealed_pin: hex::decode(get::<String>(&row, "sealed_pin")?)
                .map_err(|_| StoreError::Corrupt("sealed pin"))?,
            verifier: hex::decode(get::<String>(&row, "verifier")?)
                .map_err(|_| StoreError::Corrupt("verifier"))?,
            created_at: get(&row, "created_at")?,
        }))
    }

    async fn init_quorum(
        &self,
        cfg: &QuorumConfig,
        custodians: &[CustodianRecord],
        tokens: &[TokenRecord],
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO quorum_config (id, generation, threshold, shares, sealed_pin, verifier, created_at, updated_at) \
             VALUES (1, $1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(cfg.generation)
        .bind(i64::from(cfg.threshold))
        .bind(i64::from(cfg.shares))
        .bind(hex::encode(&cfg.sealed_pin))
        .bind(hex::encode(&cfg.verifier))
        .bind(cfg.created_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        for c in custodians {
            insert_custodian_in(&mut tx, c, cfg.created_at).await?;
        }
        for t in tokens {
            insert_token_in(&mut *tx, t).await?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(())
    }

    async fn custodian(&self, name: &str, generation: i64) -> Result<CustodianRecord> {
        let row = sqlx::query(
            "SELECT name, generation, share_index, commitment, totp_sealed, totp_last_step, locked_until \
             FROM custodians WHERE name = $1 AND generation = $2",
        )
        .bind(name.to_string())
        .bind(generation)
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?
        .ok_or(StoreError::NotFound)?;
        custodian_from_row(&row)
    }

    async fn reserve_custodian_attempt(&self, a: &CustodianAttempt<'_>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let slot = Slot {
            holder: Holder::Custodian {
                name: a.name,
                generation: a.generation,
            },
            id: a.id,
            at: a.at,
            since: a.since,
            limit: a.limit,
        };
        reserve_in(&mut tx, &slot).await?;
        tx.commit().await.map_err(classify)
    }

    async fn use_totp_step(
        &self,
        name: &str,
        generation: i64,
        step: i64,
        attempt: &str,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE custodians SET totp_last_step = $1 \
             WHERE name = $2 AND generation = $3 AND (totp_last_step IS NULL OR totp_last_step < $1)",
        )
        .bind(step)
        .bind(name.to_string())
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(Conflict::StepUsed));
        }
        sqlx::query("DELETE FROM custodian_failures WHERE attempt = $1 AND reason = 'pending'")
            .bind(attempt.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn record_failure(&self, f: &Failure<'_>) -> Result<u32> {
        let Failure {
            name,
            generation,
            attempt,
            at,
            reason,
            since,
            limit,
            lock_until,
        } = *f;
        let mut tx = self.begin_write().await?;
        // The same row lock as the reservation's.
        sqlx::query(
            "UPDATE custodians SET locked_until = locked_until WHERE name = $1 AND generation = $2",
        )
        .bind(name.to_string())
        .bind(generation)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let settled = sqlx::query(
            "UPDATE custodian_failures SET reason = $1 WHERE attempt = $2 AND reason = 'pending'",
        )
        .bind(reason.to_string())
        .bind(attempt.to_string())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if settled.rows_affected() != 1 {
            // The slot is gone (never reserved, or settled already): the failure still
            // counts, as its own row.
            sqlx::query(
                "INSERT INTO custodian_failures (custodian, at, reason) VALUES ($1, $2, $3)",
            )
            .bind(name.to_string())
            .bind(at)
            .bind(reason.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM custodian_failures \
             WHERE custodian = $1 AND at > $2 AND reason <> 'pending'",
        )
        .bind(name.to_string())
        .bind(since)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let n: i64 = row.try_get("n").map_err(|_| StoreError::Corrupt("count"))?;
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if n >= limit {
            sqlx::query(
                "UPDATE custodians SET locked_until = $1 WHERE name = $2 AND generation = $3",
            )
            .bind(lock_until)
            .bind(name.to_string())
            .bind(generation)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(n)
    }
}
