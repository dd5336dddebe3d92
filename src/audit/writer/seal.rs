//! Seals of the head: computed by the HSM beside the commits, stored with the next batch
//! (or on their own when the writer is idle), then appended to the checkpoint file.
//!
//! Owns: the newest committed head not yet sealed, the HMAC in flight, the seal computed
//! and not yet stored, and the checkpoint sink.
//!
//! Invariants:
//! - At most one HSM call in flight for seals, and none on a request's path: a request
//!   never waits behind the HSM queue for its record. Since each seal covers the whole
//!   chain up to its head, a seal that trails several batches covers them all, and the
//!   heads in between get no seal of their own.
//! - A seal is taken by the batch that stores it, and put back if that batch fails (see
//!   `commit`), so it is not lost with a failed commit; a newer seal replaces an older one
//!   not yet stored.
//! - A seal goes to the checkpoint file only after the transaction storing it committed.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::Arc;

use crate::audit::chain::seal_input;
use crate::audit::checkpoint::{Checkpoint, CheckpointSink};
use crate::audit::AuditKeys;
use crate::clock::Clock;
use crate::store::AuditSeal;

/// The sealing of the head.
pub(super) struct Sealer {
    /// The newest committed head no seal has been started for.
    unsealed: Option<(u64, [u8; 32])>,
    /// The HMAC in flight.
    sealing: Option<tokio::task::JoinHandle<Option<AuditSeal>>>,
    /// A seal computed and not yet stored.
    ready: Option<AuditSeal>,
    sink: Option<CheckpointSink>,
}

impl Sealer {
    /// Nothing to seal yet; stored seals go to `sink`.
    pub(super) fn new(sink: Option<CheckpointSink>) -> Self {
        Sealer {
            unsealed: None,
            sealing: None,
            ready: None,
            sink,
        }
    }

    /// A head committed (or found stored) that a seal should cover.
    pub(super) fn covers(&mut self, head: (u64, [u8; 32])) {
        self.unsealed = Some(head);
    }

    /// Collects a finished seal, and starts sealing the newest head if none is in flight
    /// and the HSM is `open`.
    pub(super) async fn poll(
        &mut self,
        open: bool,
        keys: &Arc<dyn AuditKeys>,
        clock: &dyn Clock,
        node: &str,
    ) {
        if self.sealing.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = self.sealing.take() {
                if let Ok(Some(s)) = t.await {
                    if self.ready.as_ref().is_none_or(|r| r.seq < s.seq) {
                        self.ready = Some(s);
                    }
                }
            }
        }
        if self.sealing.is_none() && open {
            if let Some((seq, head)) = self.unsealed.take() {
                let keys = Arc::clone(keys);
                let node = node.to_string();
                let now = clock.now_ms();
                self.sealing = Some(tokio::spawn(async move {
                    match keys.mac(seal_input(&head, seq)).await {
                        Ok(mac) => Some(AuditSeal {
                            seq,
                            head,
                            seal: *mac,
                            node,
                            time_ms: now,
                        }),
                        Err(e) => {
                            tracing::warn!(error = %e, "audit head not sealed (a later seal covers it)");
                            None
                        }
                    }
                }));
            }
        }
    }

    /// Whether a seal waits to be stored.
    pub(super) fn has_ready(&self) -> bool {
        self.ready.is_some()
    }

    /// The seal waiting to be stored, if any (left in place).
    pub(super) fn peek(&self) -> Option<AuditSeal> {
        self.ready.clone()
    }

    /// Takes the seal waiting to be stored, for a batch.
    pub(super) fn take(&mut self) -> Option<AuditSeal> {
        self.ready.take()
    }

    /// Puts back the seal a failed batch took, unless a seal is waiting already.
    pub(super) fn put_back(&mut self, seal: Option<AuditSeal>) {
        if self.ready.is_none() {
            self.ready = seal;
        }
    }

    /// A seal stored by a committed batch: appended to the checkpoint file.
    pub(super) fn stored(&self, seal: Option<AuditSeal>) {
        if let (Some(sink), Some(s)) = (&self.sink, seal) {
            sink.push(Checkpoint {
                seq: s.seq,
                head: hex::encode(s.head),
                seal: hex::encode(s.seal),
                time: crate::clock::rfc3339(s.time_ms),
            });
        }
    }
}
