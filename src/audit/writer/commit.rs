//! The batch commit: records numbered, encrypted and chained on the head and appended in
//! one transaction with the waiting seal, bounded by the commit timeout; and the
//! attempts whose outcome is unknown.
//!
//! Owns: the head this writer committed last, the attempt in flight, and the unresolved
//! attempts (batches whose commit failed or timed out, which may have been stored all the
//! same: a connection lost during `COMMIT`, a transaction the server finished after the
//! writer gave up on it).
//!
//! Invariants:
//! - Nothing is stored twice. Every attempt is noted before it can reach the store (its
//!   head, its last row, its records' tickets), so a failure, or the timeout dropping the
//!   commit, leaves it to be resolved ([`Appender::resolve`]) before its records are
//!   written again. While attempts are unresolved, a head moved under the writer is
//!   never built on directly (it may be one of them having landed): the batch fails, and
//!   the next one resolves first.
//! - A head update is conditional on the head the batch was built on, so of two batches
//!   built on one head at most one commits.
//! - The commit is bounded by the commit timeout and marked busy while it runs
//!   ([`Appender::commit_bounded`]); the seal it took is put back if it fails.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::carry::Held;
use super::health::Health;
use super::keys::KeyState;
use super::seal::Sealer;
use crate::audit::chain::build_rows;
use crate::audit::AuditError;
use crate::store::{AuditAppend, AuditRow, AuditStore, BoxFuture, StoreError};

/// A batch whose commit failed or timed out: it may have been stored all the same.
pub(super) struct Attempt {
    /// Which attempt (the writer's count of them).
    pub(super) id: u64,
    /// The head it was built on: its head update is conditional on it.
    pub(super) before: (u64, [u8; 32]),
    /// Its last row.
    pub(super) last: (u64, [u8; 32]),
    /// Its records.
    pub(super) tickets: Vec<u64>,
}

/// The writer's appends to the store.
pub(super) struct Appender {
    store: Arc<dyn AuditStore>,
    health: Arc<Health>,
    /// The bound on each store call.
    limit: Duration,
    /// The head this writer committed last (`None` until the first commit, and after a
    /// failure).
    head: Option<(u64, [u8; 32])>,
    /// Failed batches that may have been stored all the same, all built on one head.
    unresolved: Vec<Attempt>,
    /// The batch being committed, once its rows are built (see [`Appender::commit`]).
    in_flight: Arc<Mutex<Option<Attempt>>>,
    /// Commit attempts made.
    attempts: u64,
}

impl Appender {
    /// Appends to `store`, each call bounded by `limit` and reported to `health`.
    pub(super) fn new(store: Arc<dyn AuditStore>, health: Arc<Health>, limit: Duration) -> Self {
        Appender {
            store,
            health,
            limit,
            head: None,
            unresolved: Vec::new(),
            in_flight: Arc::new(Mutex::new(None)),
            attempts: 0,
        }
    }

    /// Whether attempts wait to be resolved.
    pub(super) fn has_unresolved(&self) -> bool {
        !self.unresolved.is_empty()
    }

    /// After a failed commit: whatever reached the store may be there, so the attempt
    /// becomes unresolved. Returns its id (none if it never reached the store).
    pub(super) fn keep_unresolved(&mut self) -> Option<u64> {
        let attempt = self.in_flight.lock().ok().and_then(|mut a| a.take());
        let id = attempt.as_ref().map(|a| a.id);
        self.unresolved.extend(attempt);
        id
    }

    /// [`Appender::commit`], bounded by the commit timeout and marked busy meanwhile; the
    /// seal it took is put back if it fails (a commit dropped by the timeout cannot do
    /// that itself).
    pub(super) async fn commit_bounded(
        &mut self,
        records: &[Held],
        keys: &mut KeyState,
        seals: &mut Sealer,
    ) -> Result<u64, AuditError> {
        let seal = seals.peek();
        let health = Arc::clone(&self.health);
        let limit = self.limit;
        let r = health
            .bounded(limit, self.commit(records, keys, seals))
            .await;
        if r.is_err() {
            seals.put_back(seal);
        }
        r
    }

    /// [`Appender::resolve`], bounded by the commit timeout and marked busy meanwhile.
    pub(super) async fn resolve_bounded(
        &mut self,
        seals: &mut Sealer,
    ) -> Result<Option<Attempt>, AuditError> {
        let health = Arc::clone(&self.health);
        let limit = self.limit;
        health.bounded(limit, self.resolve(seals)).await
    }

    /// Finds out what became of the unresolved attempts, and returns the one stored, if
    /// any (its head is handed to `seals`). First the head, then the attempts' last rows:
    /// an attempt stored before the head was read is visible then. One found stored: every
    /// other attempt is void (all were built on one head). None found: those built on
    /// another head than the current one are void; those built on it may still commit (a
    /// PostgreSQL transaction the writer gave up on), and the next batch, built on the
    /// same head, races them safely: only one of them can move the head.
    pub(super) async fn resolve(
        &mut self,
        seals: &mut Sealer,
    ) -> Result<Option<Attempt>, AuditError> {
        let head = self.store.audit_head().await?;
        let mut stored = None;
        // Newest first: while sealed, rows are not encrypted, so an older attempt of the
        // same records at the same seqs has the same rows as a newer one.
        for (i, a) in self.unresolved.iter().enumerate().rev() {
            if head.0 < a.last.0 {
                continue;
            }
            match self.store.audit_row(a.last.0).await {
                Ok(row) if row.hash == a.last.1 => {
                    stored = Some(i);
                    break;
                }
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.head = Some(head);
        let Some(i) = stored else {
            self.unresolved.retain(|a| a.before == head);
            return Ok(None);
        };
        let a = self.unresolved.swap_remove(i);
        self.unresolved.clear();
        seals.covers(a.last);
        tracing::warn!(
            first_seq = a.before.0 + 1,
            last_seq = a.last.0,
            "an audit batch reported as failed was stored; not written again"
        );
        Ok(Some(a))
    }

    /// Appends `records` (and the ready seal, if any) in one transaction; returns the
    /// first seq.
    ///
    /// Fast path: built on the head this writer committed last, before the transaction
    /// (one round trip on SQLite). Locking path, when the head is unknown or another
    /// writer moved it: the store takes the head inside the transaction and the batch is
    /// built on it there. Either way the attempt is noted in `in_flight` before it can
    /// reach the store, so a failure (or the timeout dropping this future) leaves it to
    /// be resolved. While attempts are unresolved the locking path is not taken: a moved
    /// head may be one of them having landed, and a batch built on it would hold their
    /// records a second time.
    async fn commit(
        &mut self,
        records: &[Held],
        keys: &mut KeyState,
        seals: &mut Sealer,
    ) -> Result<u64, AuditError> {
        let mut key = keys.batch_key(records.len())?;
        let dek = key.key;
        self.attempts += 1;
        let attempt = self.attempts;
        let tickets: Vec<u64> = records.iter().map(|r| r.ticket).collect();
        let seal = seals.take();
        let fast = match self.head {
            Some(h) => match build_rows(h.0, h.1, records.iter().map(|r| &r.rec), dek) {
                Ok(rows) => {
                    key.count();
                    note_attempt(&self.in_flight, attempt, h, &rows, &tickets);
                    let batch = AuditAppend {
                        rows,
                        seal: seal.clone(),
                    };
                    match self.store.audit_append_at(h, batch).await {
                        Ok(nh) => Some(Ok(nh)),
                        Err(StoreError::AlreadyExists | StoreError::Conflict(_)) => {
                            // Refused whole: nothing of it was stored.
                            clear_attempt(&self.in_flight);
                            if self.unresolved.is_empty() {
                                None
                            } else {
                                Some(Err(AuditError::Unavailable))
                            }
                        }
                        Err(e) => Some(Err(e.into())),
                    }
                }
                Err(e) => Some(Err(e)),
            },
            None if self.unresolved.is_empty() => None,
            None => Some(Err(AuditError::Unavailable)),
        };
        let appended = match fast {
            Some(r) => r,
            None => {
                key.count();
                let in_flight = Arc::clone(&self.in_flight);
                let carried = seal.clone();
                let tickets = &tickets;
                let build =
                    move |seq: u64,
                          prev: [u8; 32]|
                          -> BoxFuture<'_, Result<AuditAppend, StoreError>> {
                        let seal = carried.clone();
                        let in_flight = Arc::clone(&in_flight);
                        Box::pin(async move {
                            let rows = build_rows(seq, prev, records.iter().map(|r| &r.rec), dek)
                                .map_err(|_| StoreError::Corrupt("audit batch"))?;
                            note_attempt(&in_flight, attempt, (seq, prev), &rows, tickets);
                            Ok(AuditAppend { rows, seal })
                        })
                    };
                self.store
                    .audit_append(&build)
                    .await
                    .map_err(AuditError::from)
            }
        };
        let (last_seq, last_hash) = match appended {
            Ok(h) => h,
            Err(e) => {
                // (`commit_bounded` puts the seal back.)
                self.head = None;
                return Err(e);
            }
        };
        clear_attempt(&self.in_flight);
        self.head = Some((last_seq, last_hash));
        if !records.is_empty() {
            // Rows stored on the head every unresolved attempt was built on: they are
            // void now. (A seal alone does not move the head.)
            self.unresolved.clear();
            seals.covers((last_seq, last_hash));
        }
        seals.stored(seal);
        Ok(last_seq + 1 - records.len() as u64)
    }
}

/// Notes an attempt about to reach the store (none for a batch of no rows).
fn note_attempt(
    slot: &Mutex<Option<Attempt>>,
    id: u64,
    before: (u64, [u8; 32]),
    rows: &[AuditRow],
    tickets: &[u64],
) {
    if let (Some(last), Ok(mut s)) = (rows.last(), slot.lock()) {
        *s = Some(Attempt {
            id,
            before,
            last: (last.seq, last.hash),
            tickets: tickets.to_vec(),
        });
    }
}

fn clear_attempt(slot: &Mutex<Option<Attempt>>) {
    if let Ok(mut s) = slot.lock() {
        *s = None;
    }
}
