//! Alerts: rules from `policies/alerts.toml` evaluated on every committed record.
//!
//! A rule counts the records that match its operations and results, per principal, per
//! client address or overall, in a sliding window; when the count goes above its
//! threshold it fires once, then stays quiet for that group until a window has passed.
//! Each alert becomes an `alert` audit record, an ERROR log line, a Prometheus counter
//! (`arca_alerts_total{rule}`) and, with a webhook configured, a JSON POST (retried with
//! backoff on its own task: requests never wait for it).
//!
//! Invariants: an alert carries the rule, the group (a principal name or an address) and
//! a count; never a key, a token or a context value. Alert records do not feed rules.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Deserialize;

use super::record::{code_of_name, Kind, PendingRecord};
use super::AuditError;

/// The built-in copy of the shipped `policies/alerts.toml`.
pub const DEFAULT_ALERTS: &str = include_str!("../../policies/alerts.toml");

/// The alert rules file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertPolicy {
    /// Format version: 1.
    pub version: u32,
    /// Where alerts are POSTed (`http://` only; the command line's `--alert-webhook`
    /// wins).
    #[serde(default)]
    pub webhook: Option<String>,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// What a rule counts per.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// The authenticated principal.
    Principal,
    /// The client address.
    Client,
    /// Everything together.
    All,
}

/// One rule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name (the `rule` label and the alert record's detail).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Operations counted (RPC method names or job actions); `"*"` counts any.
    pub operations: Vec<String>,
    /// Result code names counted (e.g. `OK`, `UNAUTHENTICATED`); empty counts any.
    #[serde(default)]
    pub results: Vec<String>,
    /// Grouping.
    pub per: Per,
    /// Fires when more than this many match within the window (0: at the first).
    pub threshold: u64,
    /// The window, seconds.
    pub window_seconds: u64,
}

impl AlertPolicy {
    /// Parses and checks a rules file.
    pub fn parse(text: &str) -> Result<AlertPolicy, AuditError> {
        let p: AlertPolicy =
            toml::from_str(text).map_err(|e| AuditError::Policy(e.message().to_string()))?;
        if p.version != 1 {
            return Err(AuditError::Policy(
                "unsupported version (expected 1)".into(),
            ));
        }
        for r in &p.rules {
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(AuditError::Policy(format!("bad rule name {:?}", r.name)));
            }
            if r.operations.is_empty() {
                return Err(AuditError::Policy(format!(
                    "rule {}: no operations",
                    r.name
                )));
            }
            if r.window_seconds == 0 || r.window_seconds > 86_400 {
                return Err(AuditError::Policy(format!(
                    "rule {}: window_seconds must be 1 to 86400",
                    r.name
                )));
            }
            if let Some(bad) = r.results.iter().find(|c| code_of_name(c).is_none()) {
                return Err(AuditError::Policy(format!(
                    "rule {}: unknown result code {bad:?}",
                    r.name
                )));
            }
        }
        if let Some(url) = &p.webhook {
            parse_http_url(url).map_err(|e| AuditError::Policy(e.to_string()))?;
        }
        Ok(p)
    }

    /// `path`, else `policies/alerts.toml` in the working directory if present, else the
    /// built-in copy.
    pub fn resolve(path: Option<&std::path::Path>) -> Result<AlertPolicy, AuditError> {
        let default = std::path::Path::new("policies/alerts.toml");
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| AuditError::Policy(format!("{}: {e}", p.display())))?,
            None if default.exists() => std::fs::read_to_string(default)
                .map_err(|e| AuditError::Policy(format!("{}: {e}", default.display())))?,
            None => DEFAULT_ALERTS.to_string(),
        };
        AlertPolicy::parse(&text)
    }
}

/// A rule that fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fired {
    /// Rule name.
    pub rule: String,
    /// What the rule groups by.
    pub per: Per,
    /// The group (principal or address; empty for `all`).
    pub group: String,
    /// Matches in the window.
    pub count: u64,
    /// Window, seconds.
    pub window_seconds: u64,
    /// Unix ms.
    pub at_ms: i64,
}

struct Compiled {
    rule: Rule,
    codes: Vec<u32>,
}

/// The evaluator (owned by the audit writer task).
pub struct AlertEngine {
    rules: Vec<Compiled>,
    hits: HashMap<(usize, String), VecDeque<i64>>,
    quiet_until: HashMap<(usize, String), i64>,
    seen: u64,
}

impl AlertEngine {
    /// Compiles the rules.
    pub fn new(policy: &AlertPolicy) -> Self {
        AlertEngine {
            rules: policy
                .rules
                .iter()
                .map(|r| Compiled {
                    codes: r.results.iter().filter_map(|c| code_of_name(c)).collect(),
                    rule: r.clone(),
                })
                .collect(),
            hits: HashMap::new(),
            quiet_until: HashMap::new(),
            seen: 0,
        }
    }

    /// Feeds one committed record; returns the rules it made fire.
    pub fn observe(&mut self, r: &PendingRecord) -> Vec<Fired> {
        if r.kind == Kind::Alert {
            return Vec::new();
        }
        self.seen += 1;
        if self.seen % 4096 == 0 {
            self.prune(r.time_ms);
        }
        let mut fired = Vec::new();
        for (i, c) in self.rules.iter().enumerate() {
            let op_ok = c
                .rule
                .operations
                .iter()
                .any(|o| o == "*" || *o == r.operation);
            let code_ok = c.codes.is_empty() || c.codes.contains(&r.result);
            if !(op_ok && code_ok) {
                continue;
            }
            let group = match c.rule.per {
                Per::Principal => r.details.principal.clone(),
                Per::Client => r.details.client.clone(),
                Per::All => String::new(),
            };
            let window = i64::try_from(c.rule.window_seconds * 1000).unwrap_or(i64::MAX);
            let key = (i, group);
            let q = self.hits.entry(key.clone()).or_default();
            q.push_back(r.time_ms);
            while q.front().is_some_and(|t| *t <= r.time_ms - window) {
                q.pop_front();
            }
            // Only whether the count is above the threshold matters.
            let cap = usize::try_from(c.rule.threshold.saturating_add(1)).unwrap_or(usize::MAX);
            while q.len() > cap {
                q.pop_front();
            }
            let count = q.len() as u64;
            if count > c.rule.threshold
                && self.quiet_until.get(&key).is_none_or(|t| r.time_ms >= *t)
            {
                self.quiet_until.insert(key.clone(), r.time_ms + window);
                fired.push(Fired {
                    rule: c.rule.name.clone(),
                    per: c.rule.per,
                    group: key.1,
                    count,
                    window_seconds: c.rule.window_seconds,
                    at_ms: r.time_ms,
                });
            }
        }
        fired
    }

    fn prune(&mut self, now: i64) {
        let rules = &self.rules;
        self.hits.retain(|(i, _), q| {
            let w = rules.get(*i).map_or(0, |c| {
                i64::try_from(c.rule.window_seconds * 1000).unwrap_or(i64::MAX)
            });
            q.back().is_some_and(|t| *t > now - w)
        });
        self.quiet_until.retain(|_, t| *t > now);
    }
}

/// A parsed `http://host:port/path` webhook address.
#[derive(Clone, Debug)]
pub struct HttpUrl {
    /// `host:port`.
    pub authority: String,
    /// `/path?query`.
    pub path: String,
}

/// Parses a webhook URL. Only plain `http://` is supported (point it at a local relay or
/// a collector on a private network for TLS).
pub fn parse_http_url(url: &str) -> Result<HttpUrl, &'static str> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("the alert webhook must be an http:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err("bad alert webhook URL");
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(HttpUrl {
        authority,
        path: path.to_string(),
    })
}

/// Delivers alerts to a webhook on its own task: a bounded queue (an alert that finds it
/// full is dropped and counted), up to 5 attempts each with exponential backoff.
#[derive(Clone)]
pub struct Webhook {
    tx: tokio::sync::mpsc::Sender<String>,
}

impl Webhook {
    /// Starts the delivery task.
    pub fn start(url: HttpUrl) -> Webhook {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                let mut delay = Duration::from_millis(250);
                let mut delivered = false;
                for attempt in 1..=5 {
                    match post(&url, &body).await {
                        Ok(status) if (200..300).contains(&status) => {
                            delivered = true;
                            break;
                        }
                        Ok(status) => {
                            tracing::warn!(attempt, status, "alert webhook refused the alert")
                        }
                        Err(e) => tracing::warn!(attempt, error = %e, "alert webhook unreachable"),
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                if !delivered {
                    crate::metrics::global()
                        .webhook_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!("alert webhook delivery failed after 5 attempts");
                }
            }
        });
        Webhook { tx }
    }

    /// Queues one alert (never waits).
    pub fn send(&self, f: &Fired, node: &str) {
        let body = serde_json::json!({
            "rule": f.rule,
            "per": match f.per { Per::Principal => "principal", Per::Client => "client", Per::All => "all" },
            "group": f.group,
            "count": f.count,
            "window_seconds": f.window_seconds,
            "time": crate::clock::rfc3339(f.at_ms),
            "node": node,
        })
        .to_string();
        if self.tx.try_send(body).is_err() {
            crate::metrics::global()
                .webhook_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(rule = %f.rule, "alert webhook queue full; alert not delivered");
        }
    }
}

/// One HTTP/1.1 POST; returns the status code.
async fn post(url: &HttpUrl, body: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut conn = tokio::net::TcpStream::connect(&url.authority).await?;
        let req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nUser-Agent: arca\r\n\r\n{body}",
            url.path,
            url.authority,
            body.len()
        );
        conn.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status line"))
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| std::io::Error::other("timed out"))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::record::Details;

    fn rec(op: &str, result: u32, principal: &str, t: i64) -> PendingRecord {
        PendingRecord {
            time_ms: t,
            kind: Kind::Rpc,
            operation: op.into(),
            result,
            details: Details {
                principal: principal.into(),
                client: "127.0.0.1".into(),
                ..Details::default()
            },
        }
    }

    #[test]
    fn shipped_rules_parse() {
        let p = AlertPolicy::parse(DEFAULT_ALERTS).unwrap();
        assert!(p.rules.iter().any(|r| r.name == "mass_unwrap"));
    }

    #[test]
    fn unknown_fields_and_codes_are_refused() {
        assert!(AlertPolicy::parse("version = 1\nbogus = 2\n").is_err());
        let bad = "version = 1\n[[rule]]\nname = \"x\"\noperations = [\"*\"]\nresults = [\"NOPE\"]\nper = \"all\"\nthreshold = 1\nwindow_seconds = 60\n";
        assert!(AlertPolicy::parse(bad).is_err());
        assert!(AlertPolicy::parse("version = 1\nwebhook = \"https://x\"\n").is_err());
    }

    #[test]
    fn fires_once_above_threshold_per_principal_then_again_after_the_window() {
        let p = AlertPolicy::parse(
            "version = 1\n[[rule]]\nname = \"mass_unwrap\"\noperations = [\"UnwrapKey\"]\nresults = [\"OK\"]\nper = \"principal\"\nthreshold = 100\nwindow_seconds = 60\n",
        )
        .unwrap();
        let mut e = AlertEngine::new(&p);
        let mut fired = Vec::new();
        for i in 0..200 {
            fired.extend(e.observe(&rec("UnwrapKey", 0, "svc:a", 1000 + i)));
            // Other principals, other results and other operations do not count.
            fired.extend(e.observe(&rec("UnwrapKey", 3, "svc:a", 1000 + i)));
            fired.extend(e.observe(&rec("WrapKey", 0, "svc:a", 1000 + i)));
        }
        for i in 0..50 {
            fired.extend(e.observe(&rec("UnwrapKey", 0, "svc:b", 1000 + i)));
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].group, "svc:a");
        assert_eq!(fired[0].count, 101);
        // A minute later, another burst fires again.
        let mut again = Vec::new();
        for i in 0..150 {
            again.extend(e.observe(&rec("UnwrapKey", 0, "svc:a", 70_000 + i)));
        }
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn threshold_zero_fires_at_the_first() {
        let p = AlertPolicy::parse(
            "version = 1\n[[rule]]\nname = \"break_glass\"\noperations = [\"BreakGlass\"]\nper = \"principal\"\nthreshold = 0\nwindow_seconds = 1\n",
        )
        .unwrap();
        let mut e = AlertEngine::new(&p);
        assert_eq!(e.observe(&rec("BreakGlass", 0, "p", 1)).len(), 1);
        assert_eq!(e.observe(&rec("BreakGlass", 0, "p", 5000)).len(), 1);
    }

    #[test]
    fn urls() {
        let u = parse_http_url("http://127.0.0.1:9000/hook?x=1").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9000");
        assert_eq!(u.path, "/hook?x=1");
        assert_eq!(
            parse_http_url("http://example").unwrap().authority,
            "example:80"
        );
        assert!(parse_http_url("ftp://x").is_err());
        assert!(parse_http_url("http://u:p@x/").is_err());
    }
}
