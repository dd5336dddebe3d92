//! Records the writer keeps for a later batch (the carry), and the count of records lost.
//!
//! Owns: the carry (records of failed batches, job and alert records of the writer), the
//! writer's numbering of the records it holds (tickets), and the count of records that
//! found no place, shared with [`super::AuditLog`].
//!
//! Invariants:
//! - No record is lost unnoticed: a record that finds no place (the queue full, or the
//!   carry full at [`MAX_CARRY`]) is counted, in memory and in
//!   `arca_audit_records_lost_total`, and the count is written as an `audit.records_lost`
//!   record once the carry has room again ([`Carry::take_lost`]).
//! - A held record keeps its ticket for as long as it waits, so an attempt that is found
//!   stored later names exactly the records that leave the carry.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::audit::record::PendingRecord;

/// Records of failed batches kept for writing after recovery.
const MAX_CARRY: usize = 100_000;

/// A record waiting in the writer under the writer's own number for it (its ticket; its
/// seq is known only once a batch holding it commits).
pub(super) struct Held {
    pub(super) ticket: u64,
    pub(super) rec: PendingRecord,
}

/// Records not yet stored: those of failed batches, and job records of the writer.
pub(super) struct Carry {
    held: Vec<Held>,
    next_ticket: u64,
    /// Records that found no place, not yet written down.
    lost: Arc<AtomicU64>,
}

impl Carry {
    /// An empty carry counting losses in `lost`.
    pub(super) fn new(lost: Arc<AtomicU64>) -> Self {
        Carry {
            held: Vec::new(),
            next_ticket: 0,
            lost,
        }
    }

    /// A new ticket.
    pub(super) fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// Puts a job record of the writer in the carry.
    pub(super) fn hold(&mut self, rec: PendingRecord) {
        let ticket = self.ticket();
        self.keep(Held { ticket, rec });
    }

    /// Keeps a record for the next batch, unless the carry is full (then it is counted
    /// as lost, and the count written later).
    pub(super) fn keep(&mut self, held: Held) {
        if self.held.len() < MAX_CARRY {
            self.held.push(held);
        } else {
            count_lost(&self.lost, 1);
        }
    }

    /// Records lost since the last call, to be written down now; none while the carry is
    /// full (they stay counted, so the note keeps the whole count).
    pub(super) fn take_lost(&self) -> u64 {
        if self.held.len() < MAX_CARRY {
            self.lost.swap(0, Ordering::Relaxed)
        } else {
            0
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// Takes every held record, oldest first, for a batch.
    pub(super) fn take(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held)
    }

    /// Puts `older` back in front of what the carry holds now.
    pub(super) fn restore(&mut self, mut older: Vec<Held>) {
        older.append(&mut self.held);
        self.held = older;
    }

    /// Removes the records of `tickets` (found stored) and returns them.
    pub(super) fn remove(&mut self, tickets: &[u64]) -> Vec<Held> {
        let done: HashSet<u64> = tickets.iter().copied().collect();
        let (stored, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| done.contains(&h.ticket));
        self.held = kept;
        stored
    }
}

/// Counts `n` records that found no place (written later as `audit.records_lost`).
pub(super) fn count_lost(lost: &AtomicU64, n: u64) {
    lost.fetch_add(n, Ordering::Relaxed);
    crate::metrics::global()
        .audit_records_lost
        .fetch_add(n, Ordering::Relaxed);
}
