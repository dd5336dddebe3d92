//! The validated policy: roles (rules of actions × key globs × context conditions),
//! groups, bindings and the break-glass settings, as the loader (`load.rs`) built
//! them, and the read-only queries over them. Values of these types exist only through
//! the loader, so every one has passed its checks.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::{BTreeMap, BTreeSet};

use super::action::Action;
use crate::authz::ratelimit::Limit;

/// Elevation maximum of a role that sets none but is elevatable.
pub const DEFAULT_ELEVATION_MS: i64 = 3600 * 1000;

/// Lifetime of a token created without one, when the policy sets none (90 days).
pub const DEFAULT_TOKEN_TTL_MS: i64 = 90 * DAY_MS;
/// Longest token lifetime, when the policy sets none; also the most a policy may set
/// (365 days).
pub const MAX_TOKEN_TTL_MS: i64 = 365 * DAY_MS;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// How long tokens live (`[tokens]`): `CreateToken` with no lifetime gets `default_ms`,
/// and one above `max_ms` is refused. No token made by `CreateToken` lives forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLifetimes {
    /// Lifetime of a token created with none, ms (≤ `max_ms`).
    pub default_ms: i64,
    /// Longest lifetime, ms (≤ [`MAX_TOKEN_TTL_MS`]).
    pub max_ms: i64,
}

impl Default for TokenLifetimes {
    fn default() -> Self {
        TokenLifetimes {
            default_ms: DEFAULT_TOKEN_TTL_MS,
            max_ms: MAX_TOKEN_TTL_MS,
        }
    }
}

/// One allow rule of a role.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Rule {
    pub(super) actions: BTreeSet<Action>,
    /// Key-name globs; empty only for rules without key-scoped actions.
    pub(super) keys: Vec<String>,
    /// Context key → allowed values (`*` any value; `${principal}`, `${principal.id}`
    /// substituted).
    pub(super) context: BTreeMap<String, Vec<String>>,
}

/// A role.
#[derive(Clone, Debug, PartialEq)]
pub struct Role {
    pub(super) name: String,
    pub(super) description: String,
    pub(super) rules: Vec<Rule>,
    pub(super) mfa: bool,
    pub(super) max_elevation_ms: Option<i64>,
    pub(super) limit: Option<Limit>,
}

impl Role {
    /// What the role is for (free text from the policy).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether using this role needs a TOTP code.
    pub fn mfa(&self) -> bool {
        self.mfa
    }

    /// How long an elevation to this role may last, if it may be requested at all.
    pub fn max_elevation_ms(&self) -> Option<i64> {
        self.max_elevation_ms
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Binding {
    pub(super) principals: Vec<String>,
    pub(super) groups: Vec<String>,
    pub(super) roles: Vec<String>,
}

/// Who may take the break-glass role, and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakGlass {
    pub(super) principals: Vec<String>,
    /// The role taken.
    pub role: String,
    /// Longest grant, ms (≤ 1 h).
    pub max_ms: i64,
}

/// A validated access policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub(super) roles: BTreeMap<String, Role>,
    pub(super) groups: BTreeMap<String, Vec<String>>,
    pub(super) bindings: Vec<Binding>,
    pub(super) break_glass: Option<BreakGlass>,
    pub(super) tokens: TokenLifetimes,
    /// Exact principal name → the person it belongs to (`[people]`).
    pub(super) people: BTreeMap<String, String>,
    pub(super) digest: String,
}

impl Policy {
    /// Hex SHA-256 over the files it was read from (names and texts): which policy is in
    /// force, for logs.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// A role by name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// The person behind `principal`: the one whose `[people]` entry names it, else the
    /// principal itself (a principal no person claims is a person of its own). Requester
    /// and approvers, and the actor and reviewer of a break-glass, are compared by this.
    pub fn person_of(&self, principal: &str) -> String {
        self.people
            .get(principal)
            .cloned()
            .unwrap_or_else(|| principal.to_string())
    }

    /// The break-glass settings, if any.
    pub fn break_glass(&self) -> Option<&BreakGlass> {
        self.break_glass.as_ref()
    }

    /// Token lifetimes (`[tokens]`, else the defaults).
    pub fn token_lifetimes(&self) -> TokenLifetimes {
        self.tokens
    }
}
