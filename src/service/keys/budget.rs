//! Wrap budgets: each node reserves wraps of a version in blocks in the store
//! (`--wrap-reservation`), so counting wraps costs no database write per request.
//!
//! Invariants:
//! - A wrap is taken from the budget before its HSM call, so the stored `wrap_count` (the
//!   sum of reservations) is never below the wraps made.
//! - Reservations never pass the lifecycle policy's usage limit; an exhausted version
//!   answers `false` and its caller rotates.
//! - One refill at a time per node; a refill is started in the background when half a
//!   block is left, so requests rarely wait for the database.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::keys::KeyId;
use crate::service::context::{Context, Db};
use crate::service::error::Result;

/// A version's wraps reserved in the store and not yet used, on this node.
#[derive(Default)]
struct Budget {
    left: u64,
    refilling: bool,
}

enum Take {
    Taken,
    TakenRefill,
    Empty,
}

/// The budgets of this node.
pub(super) struct Budgets {
    ctx: Arc<Context>,
    budgets: Mutex<HashMap<(KeyId, u32), Budget>>,
    refill: tokio::sync::Mutex<()>,
}

impl Budgets {
    pub(super) fn new(ctx: Arc<Context>) -> Self {
        Budgets {
            ctx,
            budgets: Mutex::new(HashMap::new()),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one wrap against the version's budget: `false` if the version has reached
    /// the usage limit. When the budget runs low a refill is reserved in the background;
    /// when it is empty, the request waits for the refill. `db` is the caller's (it was
    /// authorized to wrap under this key).
    pub(super) async fn take(
        self: &Arc<Self>,
        db: Db<'_>,
        key: KeyId,
        version: u32,
    ) -> Result<bool> {
        let block = self.ctx.cfg.wrap_reservation.max(1);
        loop {
            match self.try_take(key, version, block) {
                Take::Taken => return Ok(true),
                Take::TakenRefill => {
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        // The caller's decision covers this refill of its own wrap budget.
                        let system = this.ctx.system();
                        let db = this.ctx.db(&system);
                        if let Err(e) = this.refill(db, key, version, block).await {
                            tracing::warn!(error = %e, "background wrap reservation failed");
                        }
                    });
                    return Ok(true);
                }
                Take::Empty => {
                    if !self.refill(db, key, version, block).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    fn try_take(&self, key: KeyId, version: u32, block: u64) -> Take {
        // A poisoned lock counts as an empty budget: the store decides (fail closed).
        let Ok(mut b) = self.budgets.lock() else {
            return Take::Empty;
        };
        let budget = b.entry((key, version)).or_default();
        if budget.left == 0 {
            return Take::Empty;
        }
        budget.left -= 1;
        if budget.left < block / 2 && !budget.refilling {
            budget.refilling = true;
            Take::TakenRefill
        } else {
            Take::Taken
        }
    }

    /// Reserves up to `block` more wraps in the store, within the usage limit. `false`
    /// when the version has no wraps left at all.
    async fn refill(&self, db: Db<'_>, key: KeyId, version: u32, block: u64) -> Result<bool> {
        let _one = self.refill.lock().await;
        let low = self
            .budgets
            .lock()
            .map(|b| b.get(&(key, version)).map_or(0, |x| x.left) < block / 2 + 1)
            .unwrap_or(true);
        let result = if low {
            db.reserve_wraps_within(&key, version, block, self.ctx.cfg.lifecycle.usage_limit)
                .await
        } else {
            Ok(block)
        };
        let mut left = 0;
        if let Ok(mut b) = self.budgets.lock() {
            let budget = b.entry((key, version)).or_default();
            budget.refilling = false;
            if let (true, Ok(granted)) = (low, &result) {
                budget.left += granted;
            }
            left = budget.left;
        }
        result?;
        Ok(left > 0)
    }
}
