//! A queued record and its waiter: the claim that caller and writer share, the caller's
//! bounded wait, the reserved place ([`Reservation`]), and how a record says that its
//! response was withheld.
//!
//! Owns: what travels through the queue ([`Submission`]) and the protocol by which a
//! caller and the writer agree on what the caller heard.
//!
//! Invariants:
//! - A caller waits at most its timeout, whatever the store does ([`Wait::until`]).
//! - Exactly one of caller and writer moves a waiter's claim out of `QUEUED`: the writer
//!   to `TAKEN` when it puts the record in a batch (the record then says what that
//!   batch's outcome tells the caller), the caller to `ABANDONED` when its wait ends first
//!   (the record then says the response was withheld).
//! - An answer that reached the caller before its wait ended is taken; otherwise the
//!   writer learns that its answer failed, and the log says the response was withheld.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::record::{code_name, codes, PendingRecord};
use crate::audit::AuditError;

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

/// A call's place in the audit queue ([`super::AuditLog::reserve`]).
pub struct Reservation(pub(super) mpsc::OwnedPermit<Submission>);

/// A record in the queue.
pub(super) struct Submission {
    pub(super) rec: PendingRecord,
    /// The waiter: its answer channel and the claim it shares with the writer.
    pub(super) done: Option<Waiter>,
}

impl Submission {
    /// A record nobody waits for (a background action).
    pub(super) fn unwaited(rec: PendingRecord) -> Self {
        Submission { rec, done: None }
    }

    /// A record whose caller waits for it, and the caller's side of the wait.
    pub(super) fn waited(rec: PendingRecord) -> (Self, Wait) {
        let (answer, rx) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(QUEUED));
        let s = Submission {
            rec,
            done: Some(Waiter {
                answer,
                claim: Arc::clone(&claim),
            }),
        };
        (s, Wait { rx, claim })
    }
}

/// The writer's side of a caller waiting for its record (see the module's invariants).
pub(super) struct Waiter {
    answer: oneshot::Sender<Result<u64, AuditError>>,
    claim: Arc<AtomicU8>,
}

impl Waiter {
    /// Claims the record for a batch; false if its caller has already given up.
    pub(super) fn take(&self) -> bool {
        self.claim
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && !self.answer.is_closed()
    }

    /// Answers the caller; false if it is gone.
    pub(super) fn answer(self, r: Result<u64, AuditError>) -> bool {
        self.answer.send(r).is_ok()
    }
}

/// The caller's side of a waited record.
pub(super) struct Wait {
    rx: oneshot::Receiver<Result<u64, AuditError>>,
    claim: Arc<AtomicU8>,
}

impl Wait {
    /// Waits for the writer's answer, at most `timeout`.
    ///
    /// When the time is up, a record still queued is abandoned (the writer writes it
    /// saying the response was withheld); a record already in a batch stays there, and if
    /// that batch then commits, the writer finds this caller gone and writes an
    /// `audit.responses_withheld` record naming its seq. An answer that arrived before the
    /// wait ended is taken.
    pub(super) async fn until(mut self, timeout: Duration) -> Result<u64, AuditError> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(r)) => return r,
            Ok(Err(_)) => return Err(AuditError::Unavailable),
            Err(_) => {}
        }
        // Time is up. Still queued: abandoned. In a batch: the channel is closed first,
        // so the writer's answer either came before (and is taken here) or fails (and
        // the writer records the response as withheld).
        let _ = self
            .claim
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        self.rx.close();
        match self.rx.try_recv() {
            Ok(r) => r,
            Err(_) => Err(AuditError::Unavailable),
        }
    }
}

/// The detail of an `audit.responses_withheld` record.
pub(super) fn withheld_detail(seqs: &[u64]) -> String {
    // Every seq, as ranges (`12-15,18`): a batch's seqs are consecutive, so this stays short.
    let mut ranges: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        ranges.push(if i == j {
            seqs[i].to_string()
        } else {
            format!("{}-{}", seqs[i], seqs[j])
        });
        i = j + 1;
    }
    format!(
        "the callers of seq {} gave up before their records were durable: their responses were withheld (UNAVAILABLE)",
        ranges.join(",")
    )
}

/// Marks `rec` as a call whose response was withheld (the caller got `UNAVAILABLE`),
/// keeping the handler's own result in the detail. Idempotent.
pub(super) fn withheld(rec: &mut PendingRecord, why: &str) {
    if rec.result == codes::UNAVAILABLE
        && rec
            .details
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("response withheld"))
    {
        return;
    }
    rec.details.detail = Some(format!(
        "response withheld ({why}); the handler answered {}",
        code_name(rec.result)
    ));
    rec.result = codes::UNAVAILABLE;
}

#[cfg(test)]
mod tests {
    #[test]
    fn withheld_seqs_are_named_as_ranges() {
        let d = super::withheld_detail(&[3, 5, 6, 7, 9]);
        assert!(d.starts_with("the callers of seq 3,5-7,9 gave up"), "{d}");
    }
}
