//! The second sink: sealed checkpoints of the head as JSON lines
//! (`{"seq":…,"head":"hex","seal":"hex","time":"RFC 3339"}`), appended and fsync'd on a
//! task of their own. Ship the file to write-once storage: a database whose tail was
//! cut no longer reaches the last checkpoint, and a checkpoint cannot be forged without
//! the HSM key.
//!
//! Invariant: the sink never blocks the writer: a checkpoint that finds the queue full is
//! dropped and counted (the next one covers it, since each seals the whole chain).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::AuditError;

/// One line of the checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Last seq sealed.
    pub seq: u64,
    /// Its hash (hex).
    pub head: String,
    /// HMAC-SHA256 by `arca:audit-mac` of head || seq (hex).
    pub seal: String,
    /// When (RFC 3339 UTC).
    pub time: String,
}

/// The sink's queue.
#[derive(Clone)]
pub struct CheckpointSink {
    tx: tokio::sync::mpsc::Sender<Checkpoint>,
}

impl CheckpointSink {
    /// Starts the task appending to `path` (created 0600 if absent).
    pub fn start(path: PathBuf) -> CheckpointSink {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Checkpoint>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut lines = vec![first];
                while let Ok(more) = rx.try_recv() {
                    lines.push(more);
                }
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || append(&path, &lines)).await;
                if !matches!(written, Ok(Ok(()))) {
                    crate::metrics::global()
                        .audit_checkpoints_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!("cannot write the audit checkpoint file");
                }
            }
        });
        CheckpointSink { tx }
    }

    /// Queues a checkpoint (never waits).
    pub fn push(&self, c: Checkpoint) {
        if self.tx.try_send(c).is_err() {
            crate::metrics::global()
                .audit_checkpoints_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("audit checkpoint sink is stuck; checkpoint dropped");
        }
    }
}

fn append(path: &Path, lines: &[Checkpoint]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let mut buf = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut buf, l).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    f.sync_data()
}

/// Reads every checkpoint in the file (none if it does not exist). A line that does not
/// parse is an error: the file is append-only.
pub fn read(path: &Path) -> Result<Vec<Checkpoint>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AuditError::Checkpoints(e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|_| {
                AuditError::Checkpoints(std::io::Error::other("a line is not a checkpoint"))
            })
        })
        .collect()
}
