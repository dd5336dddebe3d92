//! The audit trail ([`AuditStore`]): the one place that reads and writes `audit_log`,
//! `audit_seals`, `audit_deks` and `audit_head` (migration 0006).
//!
//! Invariants:
//! - A batch is appended in one transaction that first takes the head (`FOR UPDATE` on
//!   PostgreSQL; `BEGIN IMMEDIATE` already holds the write lock on SQLite), so sequence
//!   numbers are gapless and the chain is one chain across every node on the database.
//! - The head moves only forward and only in the transaction that inserts the rows it
//!   names; the database refuses UPDATE and DELETE on the log, seals and data keys.
//! - On SQLite the fast path ([`AuditStore::audit_append_at`]) runs on a connection of
//!   the audit writer's own, not the writer pool's, so a batch neither waits for the
//!   pool nor behind other writes in it; SQLite's write lock orders the two. A batch
//!   never waits behind an earlier one still running there: it fails at once, so no
//!   batch commits long after its callers were answered.
//! - A seal already stored for its seq is not stored again (`ON CONFLICT DO NOTHING`): a
//!   batch whose commit was reported failed may have stored the seal it carried, and the
//!   writer then hands the same seal in again. (A different seal already there for that
//!   seq is kept, and verification checks it.)
//! - This module stores what it is given: it neither computes hashes nor decrypts. The
//!   chain and encryption are `crate::audit`'s, handed in as the batch builder.
//! - A batch refused because the head moved changed nothing (`Conflict::AuditHead`).
//!
//! Must not import: the other table-family files of `store/`; tonic, prost, cryptoki.

use std::future::Future;
use std::pin::Pin;

use sqlx::any::AnyRow;

use super::classify::{classify, classify_sqlite};
use super::connect::Backend;
use super::error::{Conflict, Result, StoreError};
use super::pool::SqlStore;
use super::rows::get;

/// A future that may borrow, for the batch builder.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One stored audit row, exactly as stored (the chain covers these fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// Gapless sequence number, from 1.
    pub seq: u64,
    /// Unix ms (UTC).
    pub time_ms: i64,
    /// `rpc`, `job` or `alert`.
    pub kind: String,
    /// The operation (RPC method name, or a job action).
    pub operation: String,
    /// gRPC status code number.
    pub result: u32,
    /// Id of the data key that encrypts `body`; empty when written while sealed.
    pub dek_id: String,
    /// Encrypted details (or clear ones when `dek_id` is empty).
    pub body: Vec<u8>,
    /// `h_seq = SHA-256(h_{seq-1} || canonical(row))`.
    pub hash: [u8; 32],
}

/// A seal of the head after a batch: HMAC-SHA256 by the HSM over `head || seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSeal {
    /// Last seq of the batch.
    pub seq: u64,
    /// Its hash.
    pub head: [u8; 32],
    /// The HMAC.
    pub seal: [u8; 32],
    /// The node that sealed it.
    pub node: String,
    /// Unix ms.
    pub time_ms: i64,
}

/// What a batch builder returns: the rows to append after the head (possibly none), and a
/// seal of an already committed head to store with them (sealing runs off the commit
/// path, so a batch usually carries the seal of an earlier one).
pub struct AuditAppend {
    /// Rows numbered from the head's seq + 1.
    pub rows: Vec<AuditRow>,
    /// Seal of the last row.
    pub seal: Option<AuditSeal>,
}

/// Builds a batch from the head `(seq, hash)`, inside the append transaction.
pub type AppendBuilder<'a> =
    dyn Fn(u64, [u8; 32]) -> BoxFuture<'a, Result<AuditAppend>> + Send + Sync + 'a;

/// Storage of the audit trail.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Takes the head, calls `build` with it, appends the rows and the seal, moves the
    /// head, commits. Returns the new head `(seq, hash)`.
    async fn audit_append(&self, build: &AppendBuilder<'_>) -> Result<(u64, [u8; 32])>;
    /// Appends a batch built on `head`, the head the caller last committed. Fails with
    /// `AlreadyExists` or `Conflict::AuditHead` (and changes nothing) if the head has moved
    /// since: the caller then appends through [`AuditStore::audit_append`]. On SQLite this
    /// is one round trip to the database.
    async fn audit_append_at(
        &self,
        head: (u64, [u8; 32]),
        batch: AuditAppend,
    ) -> Result<(u64, [u8; 32])>;
    /// Stores a sealed data key of the details encryption.
    async fn audit_insert_dek(&self, id: &str, sealed: &[u8], now: i64) -> Result<()>;
    /// A sealed data key by id.
    async fn audit_dek(&self, id: &str) -> Result<Vec<u8>>;
    /// Up to `limit` rows with `seq >= from`, by seq.
    async fn audit_rows(&self, from: u64, limit: u32) -> Result<Vec<AuditRow>>;
    /// Up to `limit` rows with `from <= seq` and `since <= time_ms < until`, by seq.
    async fn audit_rows_in_time(
        &self,
        from: u64,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>>;
    /// The row numbered `seq`.
    async fn audit_row(&self, seq: u64) -> Result<AuditRow>;
    /// Seals with `seq >= from`, by seq.
    async fn audit_seals(&self, from: u64) -> Result<Vec<AuditSeal>>;
    /// The head `(seq, hash)`.
    async fn audit_head(&self) -> Result<(u64, [u8; 32])>;
}

fn hash_of(s: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| StoreError::Corrupt("audit hash"))?;
    Ok(out)
}

fn u64_of(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("audit sequence number"))
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt("audit sequence number"))
}

const ROW_COLUMNS: &str = "seq, time_ms, kind, operation, result, dek_id, body, hash";

fn row_from(row: &AnyRow) -> Result<AuditRow> {
    use base64::Engine;
    Ok(AuditRow {
        seq: u64_of(get(row, "seq")?)?,
        time_ms: get(row, "time_ms")?,
        kind: get(row, "kind")?,
        operation: get(row, "operation")?,
        result: u32::try_from(get::<i64>(row, "result")?)
            .map_err(|_| StoreError::Corrupt("audit result"))?,
        dek_id: get(row, "dek_id")?,
        body: base64::engine::general_purpose::STANDARD
            .decode(get::<String>(row, "body")?)
            .map_err(|_| StoreError::Corrupt("audit body"))?,
        hash: hash_of(&get::<String>(row, "hash")?)?,
    })
}

fn seal_from(row: &AnyRow) -> Result<AuditSeal> {
    Ok(AuditSeal {
        seq: u64_of(get(row, "seq")?)?,
        head: hash_of(&get::<String>(row, "head")?)?,
        seal: hash_of(&get::<String>(row, "seal")?)?,
        node: get(row, "node")?,
        time_ms: get(row, "time_ms")?,
    })
}

/// Appends `batch` after `head` on the audit writer's SQLite connection, in one
/// `BEGIN IMMEDIATE` transaction: rows, seal, head (conditional on the head not having
/// moved). A row numbered head + 1 already there (another process wrote) fails the INSERT
/// on the primary key. `Ok(false)`: the head moved; nothing was written. Whatever fails,
/// the transaction rolls back when it is dropped.
fn append_sqlite(
    conn: &mut rusqlite::Connection,
    head: (u64, [u8; 32]),
    batch: &AuditAppend,
) -> std::result::Result<bool, rusqlite::Error> {
    use base64::Engine;
    fn int(v: u64) -> std::result::Result<i64, rusqlite::Error> {
        i64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, i64::MAX))
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !batch.rows.is_empty() {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit_log (seq, time_ms, kind, operation, result, dek_id, body, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for r in &batch.rows {
            insert.execute(rusqlite::params![
                int(r.seq)?,
                r.time_ms,
                r.kind,
                r.operation,
                i64::from(r.result),
                r.dek_id,
                base64::engine::general_purpose::STANDARD.encode(&r.body),
                hex::encode(r.hash),
            ])?;
        }
    }
    if let Some(seal) = &batch.seal {
        tx.prepare_cached(
            "INSERT INTO audit_seals (seq, head, seal, node, time_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (seq) DO NOTHING",
        )?
        .execute(rusqlite::params![
            int(seal.seq)?,
            hex::encode(seal.head),
            hex::encode(seal.seal),
            seal.node,
            seal.time_ms,
        ])?;
    }
    if let Some(last) = batch.rows.last() {
        let moved = tx
            .prepare_cached("UPDATE audit_head SET seq = ?1, hash = ?2 WHERE id = 1 AND seq = ?3")?
            .execute(rusqlite::params![
                int(last.seq)?,
                hex::encode(last.hash),
                int(head.0)?
            ])?;
        if moved != 1 {
            return Ok(false);
        }
    }
    tx.commit()?;
    Ok(true)
}

#[async_trait::async_trait]
impl AuditStore for SqlStore {
    async fn audit_append_at(
        &self,
        head: (u64, [u8; 32]),
        batch: AuditAppend,
    ) -> Result<(u64, [u8; 32])> {
        let new_head = batch.rows.last().map_or(head, |l| (l.seq, l.hash));
        if self.backend() == Backend::Postgres {
            // The locking path, refusing a head that moved.
            return self
                .audit_append(&move |seq, hash| {
                    let batch = AuditAppend {
                        rows: batch.rows.clone(),
                        seal: batch.seal.clone(),
                    };
                    Box::pin(async move {
                        if (seq, hash) != head {
                            return Err(StoreError::Conflict(Conflict::AuditHead));
                        }
                        Ok(batch)
                    })
                })
                .await;
        }
        // SQLite: synchronously, on the calling thread (the audit writer's own), so the
        // outcome is always known: the append is never abandoned half-way, and nothing of
        // it outlives the call. SQLite's busy_timeout bounds the wait for the write lock.
        let Some(own) = &self.audit_conn else {
            return Err(StoreError::Corrupt("no audit connection"));
        };
        // One append at a time, and none queued behind another (a second writer in this
        // process): it fails at once instead.
        let Ok(mut held) = own.slot().try_lock() else {
            return Err(StoreError::Unavailable("audit connection busy".into()));
        };
        let mut conn = match held.take() {
            Some(c) => c,
            None => own.connect().map_err(classify_sqlite)?,
        };
        match append_sqlite(&mut conn, head, &batch) {
            Ok(true) => {
                *held = Some(conn);
                Ok(new_head)
            }
            Ok(false) => {
                *held = Some(conn);
                Err(StoreError::Conflict(Conflict::AuditHead))
            }
            Err(e) => {
                let e = classify_sqlite(e);
                // A lost race for the head leaves a healthy connection (its transaction
                // rolled back); after any other error it is closed, and the next append
                // opens a fresh one.
                if matches!(e, StoreError::AlreadyExists) && conn.is_autocommit() {
                    *held = Some(conn);
                }
                Err(e)
            }
        }
    }

    async fn audit_append(&self, build: &AppendBuilder<'_>) -> Result<(u64, [u8; 32])> {
        use base64::Engine;
        let mut tx = self.begin_write().await?;
        let head_sql = match self.backend() {
            Backend::Postgres => "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
            Backend::Sqlite => "SELECT seq, hash FROM audit_head WHERE id = 1",
        };
        let head = sqlx::query(head_sql)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        let seq = u64_of(get(&head, "seq")?)?;
        let hash = hash_of(&get::<String>(&head, "hash")?)?;
        let batch = build(seq, hash).await?;
        let new_head = batch.rows.last().map_or((seq, hash), |l| (l.seq, l.hash));
        // Chunks keep the statement under every back end's bind-parameter limit.
        for chunk in batch.rows.chunks(256) {
            let mut sql = format!("INSERT INTO audit_log ({ROW_COLUMNS}) VALUES ");
            for i in 0..chunk.len() {
                let b = i * 8;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8
                ));
            }
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(i64_of(r.seq)?)
                    .bind(r.time_ms)
                    .bind(r.kind.clone())
                    .bind(r.operation.clone())
                    .bind(i64::from(r.result))
                    .bind(r.dek_id.clone())
                    .bind(base64::engine::general_purpose::STANDARD.encode(&r.body))
                    .bind(hex::encode(r.hash));
            }
            q.execute(&mut *tx).await.map_err(classify)?;
        }
        if let Some(s) = &batch.seal {
            sqlx::query(
                "INSERT INTO audit_seals (seq, head, seal, node, time_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (seq) DO NOTHING",
            )
            .bind(i64_of(s.seq)?)
            .bind(hex::encode(s.head))
            .bind(hex::encode(s.seal))
            .bind(s.node.clone())
            .bind(s.time_ms)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        if batch.rows.is_empty() {
            // A seal on its own.
            tx.commit().await.map_err(classify)?;
            return Ok(new_head);
        }
        let moved =
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1 AND seq = $3")
                .bind(i64_of(new_head.0)?)
                .bind(hex::encode(new_head.1))
                .bind(i64_of(seq)?)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        if moved.rows_affected() != 1 {
            return Err(StoreError::Conflict(Conflict::AuditHead));
        }
        tx.commit().await.map_err(classify)?;
        Ok(new_head)
    }

    async fn audit_insert_dek(&self, id: &str, sealed: &[u8], now: i64) -> Result<()> {
        use base64::Engine;
        sqlx::query("INSERT INTO audit_deks (id, sealed, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(base64::engine::general_purpose::STANDARD.encode(sealed))
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn audit_dek(&self, id: &str) -> Result<Vec<u8>> {
        use base64::Engine;
        let s: String = sqlx::query_scalar("SELECT sealed FROM audit_deks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?
            .ok_or(StoreError::NotFound)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| StoreError::Corrupt("audit data key"))
    }

    async fn audit_rows(&self, from: u64, limit: u32) -> Result<Vec<AuditRow>> {
        let sql =
            format!("SELECT {ROW_COLUMNS} FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64_of(from)?)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(row_from).collect()
    }

    async fn audit_rows_in_time(
        &self,
        from: u64,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM audit_log WHERE seq >= $1 AND time_ms >= $2 \
             AND time_ms < $3 ORDER BY seq LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64_of(from)?)
            .bind(since)
            .bind(until)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(row_from).collect()
    }

    async fn audit_row(&self, seq: u64) -> Result<AuditRow> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM audit_log WHERE seq = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64_of(seq)?)
            .fetch_optional(&self.reader)
            .await
            .map_err(classify)?
            .ok_or(StoreError::NotFound)?;
        row_from(&row)
    }

    async fn audit_seals(&self, from: u64) -> Result<Vec<AuditSeal>> {
        let rows = sqlx::query(
            "SELECT seq, head, seal, node, time_ms FROM audit_seals WHERE seq >= $1 ORDER BY seq",
        )
        .bind(i64_of(from)?)
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        rows.iter().map(seal_from).collect()
    }

    async fn audit_head(&self) -> Result<(u64, [u8; 32])> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.reader)
            .await
            .map_err(classify)?;
        Ok((
            u64_of(get(&row, "seq")?)?,
            hash_of(&get::<String>(&row, "hash")?)?,
        ))
    }
}
