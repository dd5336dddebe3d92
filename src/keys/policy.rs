//! The lifecycle policy (`policies/lifecycle.toml`): retirement waiting periods (default,
//! minimum, maximum), the shortest rotation period, and the usage limit after which a
//! version is rotated.
//!
//! Versioned TOML with `deny_unknown_fields`, read and validated once at start-up; a bad
//! file stops the server from starting. Without a file the built-in default applies; it
//! equals the shipped file (a unit test holds them together).
//!
//! Invariants: `1 s ≤ min ≤ default ≤ max ≤ 10 years`; `1 ≤ usage_limit ≤ 2^32`.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::clock::parse_duration_ms;

/// Where the server looks for the policy when no path is given.
pub const DEFAULT_PATH: &str = "policies/lifecycle.toml";

#[cfg(test)]
const SHIPPED: &str = include_str!("../../policies/lifecycle.toml");

const VERSION: u32 = 1;
const SECOND_MS: i64 = 1000;
const DAY_MS: i64 = 86_400_000;
const MAX_PERIOD_MS: i64 = 3650 * DAY_MS;
/// The largest usage limit: 2^32 wraps per version.
pub const MAX_USAGE_LIMIT: u64 = 1 << 32;

/// Why a lifecycle policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum LifecyclePolicyError {
    /// The file could not be read.
    #[error("cannot read the lifecycle policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or keys the format does not have.
    #[error("invalid lifecycle policy: {0}")]
    Syntax(String),
    /// A `version` this build does not read.
    #[error("unsupported lifecycle policy version {0} (this build reads version 1)")]
    Version(u32),
    /// A duration that does not parse or is out of range.
    #[error("invalid {field} {value:?}: use e.g. \"7d\", \"12h\" or \"1d12h\", from 1s to 3650d")]
    Duration {
        /// Which setting.
        field: &'static str,
        /// The text.
        value: String,
    },
    /// Waiting periods out of order.
    #[error("waiting periods must satisfy min_waiting_period ≤ default_waiting_period ≤ max_waiting_period")]
    Order,
    /// A usage limit out of range.
    #[error("usage_limit must be from 1 to 4294967296")]
    UsageLimit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: u32,
    default_waiting_period: String,
    min_waiting_period: String,
    max_waiting_period: String,
    min_rotation_period: String,
    usage_limit: u64,
}

/// A validated lifecycle policy. Durations in ms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// Waiting period when a retirement names none.
    pub default_waiting_ms: i64,
    /// Shortest waiting period allowed.
    pub min_waiting_ms: i64,
    /// Longest waiting period allowed.
    pub max_waiting_ms: i64,
    /// Shortest rotation period a key may have.
    pub min_rotation_ms: i64,
    /// Wraps per version before it is rotated.
    pub usage_limit: u64,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        LifecyclePolicy {
            default_waiting_ms: 7 * DAY_MS,
            min_waiting_ms: DAY_MS,
            max_waiting_ms: 90 * DAY_MS,
            min_rotation_ms: DAY_MS,
            usage_limit: 1 << 30,
        }
    }
}

fn duration(field: &'static str, value: String) -> Result<i64, LifecyclePolicyError> {
    parse_duration_ms(&value)
        .filter(|ms| (SECOND_MS..=MAX_PERIOD_MS).contains(ms))
        .ok_or(LifecyclePolicyError::Duration { field, value })
}

impl LifecyclePolicy {
    /// Parses and validates policy text.
    pub fn parse(text: &str) -> Result<Self, LifecyclePolicyError> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| LifecyclePolicyError::Syntax(e.message().to_string()))?;
        if raw.version != VERSION {
            return Err(LifecyclePolicyError::Version(raw.version));
        }
        let p = LifecyclePolicy {
            default_waiting_ms: duration("default_waiting_period", raw.default_waiting_period)?,
            min_waiting_ms: duration("min_waiting_period", raw.min_waiting_period)?,
            max_waiting_ms: duration("max_waiting_period", raw.max_waiting_period)?,
            min_rotation_ms: duration("min_rotation_period", raw.min_rotation_period)?,
            usage_limit: raw.usage_limit,
        };
        if !(p.min_waiting_ms <= p.default_waiting_ms && p.default_waiting_ms <= p.max_waiting_ms) {
            return Err(LifecyclePolicyError::Order);
        }
        if !(1..=MAX_USAGE_LIMIT).contains(&p.usage_limit) {
            return Err(LifecyclePolicyError::UsageLimit);
        }
        Ok(p)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, LifecyclePolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| LifecyclePolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// `explicit` if given (it must exist), else [`DEFAULT_PATH`] if it exists, else the
    /// built-in default.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, LifecyclePolicyError> {
        match explicit {
            Some(p) => Self::load(p),
            None if Path::new(DEFAULT_PATH).is_file() => Self::load(Path::new(DEFAULT_PATH)),
            None => Ok(Self::default()),
        }
    }

    /// The waiting period for a retirement asking for `requested_ms` (0: the default),
    /// if the policy allows it.
    pub fn waiting_period(&self, requested_ms: i64) -> Option<i64> {
        let ms = if requested_ms == 0 {
            self.default_waiting_ms
        } else {
            requested_ms
        };
        (self.min_waiting_ms..=self.max_waiting_ms)
            .contains(&ms)
            .then_some(ms)
    }
}

impl fmt::Display for LifecyclePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waiting period {}s (min {}s, max {}s), min rotation period {}s, usage limit {}",
            self.default_waiting_ms / 1000,
            self.min_waiting_ms / 1000,
            self.max_waiting_ms / 1000,
            self.min_rotation_ms / 1000,
            self.usage_limit
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shipped_file_is_the_built_in_default() {
        assert_eq!(
            LifecyclePolicy::parse(SHIPPED).unwrap(),
            LifecyclePolicy::default()
        );
    }

    #[test]
    fn waiting_periods_stay_within_bounds() {
        let p = LifecyclePolicy::default();
        assert_eq!(p.waiting_period(0), Some(7 * DAY_MS));
        assert_eq!(p.waiting_period(DAY_MS), Some(DAY_MS));
        assert_eq!(p.waiting_period(DAY_MS - 1), None);
        assert_eq!(p.waiting_period(91 * DAY_MS), None);
        assert_eq!(p.waiting_period(-5), None);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for (bad, what) in [
            (SHIPPED.replace("version = 1", "version = 2"), "version"),
            (
                SHIPPED.replace("\"1d\"\nmax", "\"8d\"\nmax"),
                "min_waiting_period ≤",
            ),
            (SHIPPED.replace("\"90d\"", "\"0s\""), "max_waiting_period"),
            (
                SHIPPED.replace("\"90d\"", "\"3651d\""),
                "max_waiting_period",
            ),
            (SHIPPED.replace("1073741824", "0"), "usage_limit"),
            (SHIPPED.replace("1073741824", "4294967297"), "usage_limit"),
            (format!("{SHIPPED}extra = 1\n"), "unknown field"),
            ("nonsense".to_string(), "invalid"),
        ] {
            let e = LifecyclePolicy::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }
}
