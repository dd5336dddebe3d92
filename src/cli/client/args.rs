//! What every client command shares on its command line: the connection and output
//! options ([`ClientOpts`], flattened into each command) and the value parsers of
//! durations and `k=v` pairs.
//!
//! Invariant: the flags, their environment variables and defaults are the CLI's contract
//! (scripts call them); change them only by adding. Imports nothing of the client.

use clap::{Args, ValueEnum};

/// Connection and output options shared by the client commands.
#[derive(Args, Clone)]
pub(in crate::cli) struct ClientOpts {
    /// Server address (http://host:port).
    #[arg(
        long,
        env = "ARCA_ADDR",
        default_value = "http://127.0.0.1:7420",
        global = true
    )]
    pub(super) addr: String,
    /// Bearer token (prefer ARCA_TOKEN: flags show in process lists).
    #[arg(long, env = "ARCA_TOKEN", hide_env_values = true, global = true)]
    pub(super) token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    pub(super) output: Output,
    /// CA certificate (PEM) that the server's certificate chains to (https:// addresses).
    #[arg(long, env = "ARCA_CACERT", global = true)]
    pub(super) cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "ARCA_CLIENT_CERT", global = true, requires = "client_key")]
    pub(super) client_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "ARCA_CLIENT_KEY", global = true, requires = "client_cert")]
    pub(super) client_key: Option<std::path::PathBuf>,
    /// Prompt for a TOTP code and send it as x-arca-totp (roles with MFA). Scripts set
    /// ARCA_TOTP instead, which is sent whenever it is set.
    #[arg(long, global = true)]
    pub(super) mfa: bool,
}

/// Output format of client commands.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(in crate::cli) enum Output {
    /// Aligned text.
    Human,
    /// One JSON document.
    Json,
}

/// `90s`, `15m`, `12h`, `30d` or plain seconds.
pub(super) fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} too large"))
}

/// `90d`, `12h`, `1d12h`, `30s` → seconds.
pub(super) fn parse_seconds(s: &str) -> Result<u64, String> {
    crate::clock::parse_duration_ms(s)
        .filter(|ms| *ms >= 1000 && ms % 1000 == 0)
        .and_then(|ms| u64::try_from(ms / 1000).ok())
        .ok_or_else(|| format!("invalid duration {s:?}: use e.g. 90d, 12h, 1d12h, 30s"))
}

/// `k=v` (an encryption context entry, or `NAME=age1…` of `operator rekey`).
pub(super) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected k=v, got {s:?}"))
}

/// `NAME=age1…` of `operator init --age-recipient` (the server checks the recipient).
pub(super) fn parse_age_recipient(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, r)) if !name.is_empty() && r.starts_with("age1") => {
            Ok((name.to_string(), r.to_string()))
        }
        _ => Err("expected NAME=age1…".to_string()),
    }
}
