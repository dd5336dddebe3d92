//! [`AuditLog`]: the group-commit writer. A call's record is built by the transport from
//! what the call's answer carries; the writer only digests contexts for it
//! ([`AuditLog::context_digest`]).
//!
//! Requests submit a record and await its durability ([`AuditLog::record`], bounded by
//! the configured timeout). One task, on a thread of its own, takes whatever is queued
//! (up to `max_batch`), numbers, encrypts and chains it in one store transaction, then
//! answers every waiter. So the cost of a commit (an fsync, a PostgreSQL round trip) is
//! shared by every request that arrived while the previous batch was committing.
//!
//! Sealing runs beside the commits, not in them: after a commit the head is sealed by
//! the HSM (one HMAC; at most one in flight, since each seal covers the whole chain up to
//! its head), and the seal is stored with the next batch, or on its own when the writer
//! is idle, then appended to the checkpoint file. A request therefore never waits behind
//! the HSM queue for its record, and a seal trails the head by about one batch.
//!
//! Files, one concern each:
//! - `handle`: [`AuditLog`], what requests and jobs call (reserve, submit, record).
//! - `queue`: a queued record and its waiter (the claim shared by caller and writer),
//!   [`Reservation`], and how a withheld response is recorded.
//! - `keys`: the HSM-derived keys: the context [`DigestKey`] and the data keys.
//! - `seal`: the seal of the head (computed beside the commits) and the checkpoint file.
//! - `commit`: the batch commit, bounded by the commit timeout, and the unresolved
//!   attempts it leaves.
//! - `carry`: records kept for a later batch, and the count of records lost.
//! - `health`: whether the writer commits, and the bound on its store calls.
//! - `run`: the writer thread and its loop; job and alert records of the writer.
//!
//! Invariants (each kept in the file named):
//! - A waiter hears `Ok` only after the transaction holding its record committed (`run`,
//!   `commit`): a call's response leaves only after its record is durable.
//! - A call's record has its place in the queue before the call's handler runs
//!   ([`AuditLog::reserve`]): a full queue refuses the call before it can change anything.
//!   Records that find no place (a refused call's own, a background action's) are counted
//!   and the count is written as an `audit.records_lost` record when the writer can
//!   (`carry`): no record is lost unnoticed.
//! - The writer never hangs a request: a caller waits at most its timeout, whatever the
//!   store does (`queue`); every store call of the writer is bounded (`health`,
//!   `commit`). A batch that takes longer than the commit timeout is dropped (its
//!   transaction rolls back) and reported failed, except an SQLite append on the head the
//!   writer committed last, which runs synchronously on this thread to its end (SQLite's
//!   busy timeout bounds its wait for the lock); health reports the writer stuck while a
//!   store call outlasts the timeout.
//! - The log says what callers heard (`queue`): a record whose caller gave up while it was
//!   queued says the response was withheld; when a batch commits after some of its callers
//!   gave up, an `audit.responses_withheld` record names their seqs.
//! - Nothing is stored twice (`commit`): a batch whose commit failed or timed out is an
//!   unresolved attempt; before its records are written again, the writer reads the head
//!   and the attempt's last row. Found there, the attempt is taken as stored (its records
//!   leave the carry) and an `audit.late_commit` record says so; otherwise it can no
//!   longer be stored once the head has moved past the head it was built on (its head
//!   update is conditional on that head), and while the head is still there, the next
//!   batch is built on the same head, so at most one of the two commits.
//! - Records of a failed batch are kept (with result `UNAVAILABLE`, since their requests
//!   were refused) and written when the store recovers, after an `audit.write_failed`
//!   job record; while the store keeps failing, the writer retries every 250 ms, so it
//!   reports healthy again without waiting for traffic (`run`, `carry`).
//! - At most one HSM call per batch, and none that a request waits for: the seal is one
//!   HMAC of the newest head, at most one in flight, so several batches may share one
//!   (`seal`); data keys are made at unseal and every 2^24 records (`keys`).
//! - Details are encrypted under a data key made in the HSM whenever the HSM is open (no
//!   record is stored in clear while it is open); the data key lives only in the writer's
//!   memory and sealed in `audit_deks` (`keys`).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod carry;
mod commit;
mod handle;
mod health;
mod keys;
mod queue;
mod run;
mod seal;

use std::time::Duration;

pub use handle::AuditLog;
pub use keys::{dek_aad, dek_derivation, DigestKey, DERIVED_DEK};
pub use queue::Reservation;

/// Tuning of the audit writer.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// This node's name in records.
    pub node: String,
    /// How long a request waits for its record to be durable.
    pub timeout: Duration,
    /// How long one batch commit may take.
    pub commit_timeout: Duration,
    /// Records per batch at most.
    pub max_batch: usize,
    /// Places for records: a call holds one from [`AuditLog::reserve`] until the writer
    /// takes its record.
    pub queue: usize,
    /// The checkpoint file.
    pub checkpoints: Option<std::path::PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            node: "arca".into(),
            timeout: Duration::from_secs(2),
            commit_timeout: Duration::from_secs(2),
            max_batch: 256,
            queue: 65_536,
            checkpoints: None,
        }
    }
}
