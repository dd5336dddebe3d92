//! The policy file format as written (versioned TOML, `deny_unknown_fields`; see
//! `policies/README.md`): what `toml` deserialises, before any validation. The loader
//! (`load.rs`) turns it into the validated model (`model.rs`).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The only format version.
pub(super) const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) version: u32,
    #[serde(default)]
    pub(super) roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    pub(super) groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub(super) bindings: Vec<RawBinding>,
    pub(super) break_glass: Option<RawBreakGlass>,
    /// Token lifetimes (`[tokens]`).
    pub(super) tokens: Option<RawTokens>,
    /// Person → the exact principal names that person authenticates as.
    #[serde(default)]
    pub(super) people: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRole {
    #[serde(default)]
    pub(super) description: String,
    #[serde(default)]
    pub(super) mfa: bool,
    /// `"1h"`: the role may be requested with `Elevate` for up to this long.
    pub(super) max_elevation: Option<String>,
    pub(super) rate_limit: Option<RawLimit>,
    #[serde(default)]
    pub(super) allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) per_second: f64,
    pub(super) burst: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) operations: Vec<String>,
    #[serde(default)]
    pub(super) keys: Vec<String>,
    #[serde(default)]
    pub(super) context: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBinding {
    #[serde(default)]
    pub(super) principals: Vec<String>,
    #[serde(default)]
    pub(super) groups: Vec<String>,
    pub(super) roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreakGlass {
    pub(super) principals: Vec<String>,
    pub(super) role: String,
    pub(super) max_duration: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    /// Lifetime of a token created without one (`ttl_seconds = 0`).
    pub(super) default_ttl: Option<String>,
    /// Longest lifetime a token may be created with.
    pub(super) max_ttl: Option<String>,
}
