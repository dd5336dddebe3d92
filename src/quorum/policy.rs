//! The quorum policy (`policies/quorum.toml`): which operations wait for K-of-N approval,
//! and how long an approval request lives.
//!
//! Versioned TOML with `deny_unknown_fields`, read and validated once at start-up: an
//! unknown key, an unknown operation name, a duplicate or an out-of-range lifetime stops
//! the server from starting. Without a file the built-in default applies; it equals the
//! shipped `policies/quorum.toml` (a unit test holds them together).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::approvals::Operation;

/// Where the server looks for the policy when no path is given (relative to the working
/// directory).
pub const DEFAULT_PATH: &str = "policies/quorum.toml";

/// The policy file shipped with Arca (the built-in default must equal it).
#[cfg(test)]
const SHIPPED: &str = include_str!("../../policies/quorum.toml");

/// The only format version.
const VERSION: u32 = 1;
/// Shortest request lifetime.
const MIN_TTL_MS: i64 = 1000;
/// Longest request lifetime.
const MAX_TTL_MS: i64 = 30 * DAY_MS;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// Why a policy was refused. Messages name the offending value (a policy holds no
/// secret).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the quorum policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or keys the format does not have.
    #[error("invalid quorum policy: {0}")]
    Syntax(String),
    /// A `version` this build does not read.
    #[error("unsupported quorum policy version {0} (this build reads version 1)")]
    Version(u32),
    /// An operation name Arca does not know.
    #[error("unknown operation {0:?} in the quorum policy")]
    UnknownOperation(String),
    /// The same operation twice.
    #[error("operation {0:?} listed twice in the quorum policy")]
    DuplicateOperation(String),
    /// A lifetime that does not parse or is out of range.
    #[error("invalid request_ttl {0:?}: use e.g. \"24h\", \"30m\" or \"1h30m\", from 1s to 30d")]
    Ttl(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u32,
    operations: Vec<String>,
    request_ttl: String,
}

/// A validated quorum policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumPolicy {
    operations: BTreeSet<Operation>,
    request_ttl_ms: i64,
}

impl Default for QuorumPolicy {
    /// The shipped policy: every key-lifecycle, rekey, policy and elevation operation,
    /// re-enabling a version included (one admin must not undo a quorum-approved
    /// disable); requests live 24 hours.
    fn default() -> Self {
        QuorumPolicy {
            operations: [
                Operation::RotateKey,
                Operation::DisableKeyVersion,
                Operation::EnableKeyVersion,
                Operation::RetireKeyVersion,
                Operation::RetireKey,
                Operation::CancelRetirement,
                Operation::SetRetention,
                Operation::Rekey,
                Operation::UpdatePolicy,
                Operation::Elevate,
            ]
            .into_iter()
            .collect(),
            request_ttl_ms: DAY_MS,
        }
    }
}

impl QuorumPolicy {
    /// Parses and validates policy text.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.message().to_string()))?;
        if raw.version != VERSION {
            return Err(PolicyError::Version(raw.version));
        }
        let mut operations = BTreeSet::new();
        for name in raw.operations {
            let Some(op) = Operation::parse(&name) else {
                return Err(PolicyError::UnknownOperation(name));
            };
            if !operations.insert(op) {
                return Err(PolicyError::DuplicateOperation(name));
            }
        }
        let request_ttl_ms = parse_duration_ms(&raw.request_ttl)
            .filter(|ms| (MIN_TTL_MS..=MAX_TTL_MS).contains(ms))
            .ok_or(PolicyError::Ttl(raw.request_ttl))?;
        Ok(QuorumPolicy {
            operations,
            request_ttl_ms,
        })
    }

    /// Reads and validates the policy file at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The policy in force: `explicit` if given (it must exist), else [`DEFAULT_PATH`] if
    /// that file exists, else the built-in default. Returns the file read, if any.
    pub fn resolve(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), PolicyError> {
        match explicit {
            Some(p) => Ok((Self::load(p)?, Some(p.to_path_buf()))),
            None => {
                let p = Path::new(DEFAULT_PATH);
                if p.is_file() {
                    Ok((Self::load(p)?, Some(p.to_path_buf())))
                } else {
                    Ok((Self::default(), None))
                }
            }
        }
    }

    /// Whether `op` waits for K-of-N approval.
    pub fn requires(&self, op: Operation) -> bool {
        self.operations.contains(&op)
    }

    /// How long a request collects approvals, in ms.
    pub fn request_ttl_ms(&self) -> i64 {
        self.request_ttl_ms
    }

    /// The operations under approval, in a stable order.
    pub fn operations(&self) -> impl Iterator<Item = Operation> + '_ {
        self.operations.iter().copied()
    }
}

impl fmt::Display for QuorumPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<&str> = self.operations().map(Operation::as_str).collect();
        write!(
            f,
            "operations [{}], request_ttl {}s",
            ops.join(", "),
            self.request_ttl_ms / 1000
        )
    }
}

pub use crate::clock::parse_duration_ms;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_file_is_the_built_in_default() {
        let shipped = QuorumPolicy::parse(SHIPPED).unwrap();
        assert_eq!(shipped, QuorumPolicy::default());
        assert!(shipped.requires(Operation::RotateKey));
        assert!(shipped.requires(Operation::DisableKeyVersion));
        assert!(shipped.requires(Operation::EnableKeyVersion));
        // Gateable, but not gated as shipped.
        assert!(!shipped.requires(Operation::CreateToken));
        assert!(QuorumPolicy::parse(
            "version = 1\noperations = [\"CreateToken\"]\nrequest_ttl = \"1h\"\n"
        )
        .unwrap()
        .requires(Operation::CreateToken));
        assert_eq!(shipped.request_ttl_ms(), DAY_MS);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let ok = "version = 1\noperations = [\"RotateKey\"]\nrequest_ttl = \"2s\"\n";
        let p = QuorumPolicy::parse(ok).unwrap();
        assert_eq!(p.request_ttl_ms(), 2000);
        assert_eq!(p.operations().collect::<Vec<_>>(), [Operation::RotateKey]);
        for (bad, what) in [
            (ok.replace("version = 1", "version = 2"), "version"),
            (ok.replace("RotateKey", "RotateKeys"), "unknown operation"),
            (
                ok.replace("[\"RotateKey\"]", "[\"RotateKey\", \"RotateKey\"]"),
                "twice",
            ),
            (format!("{ok}waiting_period = \"7d\"\n"), "unknown field"),
            (ok.replace("request_ttl = \"2s\"\n", ""), "missing field"),
            (ok.replace("\"2s\"", "\"0s\""), "request_ttl"),
            (ok.replace("\"2s\"", "\"31d\""), "request_ttl"),
            (ok.replace("\"2s\"", "\"2\""), "request_ttl"),
            (ok.replace("\"2s\"", "\"2w\""), "request_ttl"),
            (ok.replace("\"2s\"", "\"h\""), "request_ttl"),
            ("not toml".to_string(), "invalid"),
        ] {
            let e = QuorumPolicy::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{bad:?}: {e}");
        }
        // An empty list is a valid policy: nothing waits for approval.
        let none = ok.replace("[\"RotateKey\"]", "[]");
        assert!(!QuorumPolicy::parse(&none)
            .unwrap()
            .requires(Operation::RotateKey));
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("1s", 1000),
            ("90s", 90_000),
            ("30m", 1_800_000),
            ("24h", 86_400_000),
            ("1h30m", 5_400_000),
            ("7d", 7 * DAY_MS),
            ("250ms", 250),
            ("1s500ms", 1500),
        ] {
            assert_eq!(parse_duration_ms(s), Some(ms), "{s}");
        }
        for bad in [
            "",
            "h",
            "1",
            "1x",
            "-1s",
            "1.5h",
            "99999999999999999999s",
            "ms",
            "5m s",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolve_prefers_an_explicit_file_and_refuses_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.toml");
        std::fs::write(&p, "version = 1\noperations = []\nrequest_ttl = \"1h\"\n").unwrap();
        let (policy, from) = QuorumPolicy::resolve(Some(&p)).unwrap();
        assert_eq!(from.as_deref(), Some(p.as_path()));
        assert_eq!(policy.request_ttl_ms(), 3_600_000);
        assert!(matches!(
            QuorumPolicy::resolve(Some(&dir.path().join("missing.toml"))),
            Err(PolicyError::Read { .. })
        ));
    }
}
