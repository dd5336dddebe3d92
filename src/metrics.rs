//! Prometheus metrics: counters, gauges and histograms on atomics, rendered by hand in the
//! text exposition format, served on an admin HTTP port (`--metrics-listen`).
//!
//! Invariants:
//! - Labels hold only operation names, gRPC code names and alert rule names: never a
//!   principal, key name or any value a caller chose.
//! - Recording is lock-free on the hot path once a label set exists (a read lock finds
//!   it; the write lock is taken once per new label set).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

/// Bucket upper bounds, seconds.
const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 15],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Every metric of the process.
#[derive(Default)]
pub struct Metrics {
    requests: RwLock<BTreeMap<(String, &'static str), Arc<AtomicU64>>>,
    latency: RwLock<BTreeMap<String, Arc<Histogram>>>,
    alerts: RwLock<BTreeMap<String, Arc<AtomicU64>>>,
    /// HSM call latency (queueing included).
    pub hsm_latency: Histogram,
    /// HSM calls that failed (any error but a failed GCM authentication).
    pub hsm_errors: AtomicU64,
    /// Times the HSM refused the login and the node sealed itself.
    pub hsm_logins_refused: AtomicU64,
    /// Logins the HSM refused over the life of the database (every node, every restart),
    /// as last read from or written to its persistent counter.
    pub hsm_logins_refused_recorded: AtomicU64,
    /// Stored rows refused because their state MAC did not verify (ADR 12).
    pub state_forged: AtomicU64,
    /// HSM sessions in use now: workers running a call (each worker owns one session).
    pub hsm_sessions_in_use: AtomicI64,
    /// Audit batch commit latency.
    pub audit_commit: Histogram,
    /// Audit records committed.
    pub audit_records: AtomicU64,
    /// Audit batches committed.
    pub audit_batches: AtomicU64,
    /// Audit batches that failed.
    pub audit_failures: AtomicU64,
    /// Records waiting for the writer.
    pub audit_queue_depth: AtomicI64,
    /// Checkpoints dropped because the sink was stuck.
    pub audit_checkpoints_dropped: AtomicU64,
    /// Audit records that found no place (a full queue or carry).
    pub audit_records_lost: AtomicU64,
    /// Webhook deliveries that failed after every retry.
    pub webhook_failures: AtomicU64,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn counter<K: Ord + Clone>(
    map: &RwLock<BTreeMap<K, Arc<AtomicU64>>>,
    key: &K,
) -> Option<Arc<AtomicU64>> {
    if let Some(c) = map.read().ok()?.get(key) {
        return Some(Arc::clone(c));
    }
    let mut w = map.write().ok()?;
    Some(Arc::clone(w.entry(key.clone()).or_default()))
}

impl Metrics {
    /// Counts a finished request and its latency.
    pub fn request(&self, operation: &str, code: &'static str, latency: Duration) {
        if let Some(c) = counter(&self.requests, &(operation.to_string(), code)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let h = {
            let found = self
                .latency
                .read()
                .ok()
                .and_then(|m| m.get(operation).cloned());
            match found {
                Some(h) => Some(h),
                None => self
                    .latency
                    .write()
                    .ok()
                    .map(|mut m| Arc::clone(m.entry(operation.to_string()).or_default())),
            }
        };
        if let Some(h) = h {
            h.observe(latency);
        }
    }

    /// Counts an alert.
    pub fn alert(&self, rule: &str) {
        if let Some(c) = counter(&self.alerts, &rule.to_string()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition, with `gauges` (name, help, value) computed by the caller.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP arca_requests_total gRPC requests by operation and result.\n");
        out.push_str("# TYPE arca_requests_total counter\n");
        if let Ok(m) = self.requests.read() {
            for ((op, code), c) in m.iter() {
                let _ = writeln!(
                    out,
                    "arca_requests_total{{operation=\"{op}\",result=\"{code}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP arca_request_duration_seconds Request latency by operation.\n");
        out.push_str("# TYPE arca_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.read() {
            for (op, h) in m.iter() {
                h.render(
                    &mut out,
                    "arca_request_duration_seconds",
                    &format!("operation=\"{op}\""),
                );
            }
        }
        out.push_str("# HELP arca_hsm_operation_duration_seconds HSM call latency.\n");
        out.push_str("# TYPE arca_hsm_operation_duration_seconds histogram\n");
        self.hsm_latency
            .render(&mut out, "arca_hsm_operation_duration_seconds", "");
        let simple: [(&str, &str, &str, u64); 10] = [
            (
                "arca_hsm_errors_total",
                "counter",
                "HSM calls that failed.",
                self.hsm_errors.load(Ordering::Relaxed),
            ),
            (
                "arca_hsm_logins_refused_total",
                "counter",
                "Times the HSM refused the login and the node sealed itself.",
                self.hsm_logins_refused.load(Ordering::Relaxed),
            ),
            (
                "arca_hsm_logins_refused_recorded",
                "gauge",
                "Logins the HSM refused over the life of the database (all nodes, all restarts).",
                self.hsm_logins_refused_recorded.load(Ordering::Relaxed),
            ),
            (
                "arca_state_forged_total",
                "counter",
                "Stored rows refused: not authenticated by the HSM.",
                self.state_forged.load(Ordering::Relaxed),
            ),
            (
                "arca_audit_records_total",
                "counter",
                "Audit records committed.",
                self.audit_records.load(Ordering::Relaxed),
            ),
            (
                "arca_audit_batches_total",
                "counter",
                "Audit batches committed.",
                self.audit_batches.load(Ordering::Relaxed),
            ),
            (
                "arca_audit_failures_total",
                "counter",
                "Audit batches that failed to commit.",
                self.audit_failures.load(Ordering::Relaxed),
            ),
            (
                "arca_audit_checkpoints_dropped_total",
                "counter",
                "Checkpoints not written because the sink was stuck.",
                self.audit_checkpoints_dropped.load(Ordering::Relaxed),
            ),
            (
                "arca_audit_records_lost_total",
                "counter",
                "Audit records that found the queue full (their calls were refused before their handlers ran).",
                self.audit_records_lost.load(Ordering::Relaxed),
            ),
            (
                "arca_alert_webhook_failures_total",
                "counter",
                "Alert webhook deliveries that failed after every retry.",
                self.webhook_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP arca_audit_queue_depth Audit records waiting for the writer.\n\
             # TYPE arca_audit_queue_depth gauge\narca_audit_queue_depth {}",
            self.audit_queue_depth.load(Ordering::Relaxed).max(0)
        );
        out.push_str("# HELP arca_audit_commit_duration_seconds Audit batch commit latency.\n");
        out.push_str("# TYPE arca_audit_commit_duration_seconds histogram\n");
        self.audit_commit
            .render(&mut out, "arca_audit_commit_duration_seconds", "");
        out.push_str("# HELP arca_alerts_total Alerts raised, by rule.\n");
        out.push_str("# TYPE arca_alerts_total counter\n");
        if let Ok(m) = self.alerts.read() {
            for (rule, c) in m.iter() {
                let _ = writeln!(
                    out,
                    "arca_alerts_total{{rule=\"{rule}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

/// Serves `GET /metrics` (HTTP/1.1, one request per connection) on `listener` with the
/// text `render` returns. Anything else gets 404; a slow client is dropped after 5 s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors, say: pause rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    let n = conn.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
            let ok = line.starts_with(b"GET /metrics ") || line == b"GET /metrics";
            let (status, body) = if ok {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("UnwrapKey", "OK", Duration::from_micros(300));
        m.request("UnwrapKey", "OK", Duration::from_millis(3));
        m.alert("mass_unwrap");
        let text = m.render(&[("arca_sealed", "1 while sealed.", 0.0)]);
        assert!(text.contains("arca_requests_total{operation=\"UnwrapKey\",result=\"OK\"} 2"));
        assert!(text.contains(
            "arca_request_duration_seconds_bucket{operation=\"UnwrapKey\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains("arca_request_duration_seconds_count{operation=\"UnwrapKey\"} 2"));
        assert!(text.contains("arca_alerts_total{rule=\"mass_unwrap\"} 1"));
        assert!(text.contains("arca_sealed 0"));
    }
}
