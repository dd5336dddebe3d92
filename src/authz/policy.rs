//! Role-based access control from policy files (DESIGN §5): roles are operations ×
//! key-name globs (× required encryption-context values), bindings give principals
//! (exact names, globs or groups) roles, and [`Policy::authorize`] is the one function that
//! decides whether a principal may do an [`Action`].
//!
//! Format (versioned TOML, `deny_unknown_fields`; see `policies/README.md`): every
//! `*.toml` file of the policy directory except the ones other loaders own
//! ([`FOREIGN_FILES`]) holds `version = 1` and any of `[roles.NAME]`, `[groups]`,
//! `[[bindings]]`, `[break_glass]`. The files are merged; a role or group defined twice is
//! refused.
//!
//! Invariants:
//! - **Default deny.** An action is allowed only if a role the principal holds has a rule
//!   that lists it, whose key globs match the key (key-scoped actions) and whose context
//!   conditions hold.
//! - **Separation of duties**, checked at load: no role may both retrieve key material
//!   ([`Action::retrieves_material`]) and approve quorum requests ([`Action::Approve`]);
//!   such a policy is refused with a message naming the role.
//! - A token's roles narrow, never widen: a principal holds the roles its bindings give
//!   it, intersected with its token's roles when the token names any.
//! - Deciding is pure and in memory (no I/O), so a refusal takes the same time whether or
//!   not the key exists: callers authorize before any lookup.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::glob_match;
use super::ratelimit::Limit;

/// Files of the policy directory that other loaders own.
pub const FOREIGN_FILES: &[&str] = &["quorum.toml", "alerts.toml", "lifecycle.toml"];
/// Where the server looks when no directory is given (relative to the working directory).
pub const DEFAULT_DIR: &str = "policies";
/// Longest elevation or break-glass grant the format accepts (policies may set less).
pub const MAX_GRANT_MS: i64 = 3600 * 1000;
/// Elevation maximum of a role that sets none but is elevatable.
pub const DEFAULT_ELEVATION_MS: i64 = 3600 * 1000;

/// The shipped role files (the built-in policy when there is no directory).
/// In name order, as [`Policy::load_dir`] reads them.
const SHIPPED: &[(&str, &str)] = &[
    (
        "bindings.toml",
        include_str!("../../policies/bindings.toml"),
    ),
    ("roles.toml", include_str!("../../policies/roles.toml")),
];

/// The only format version.
const VERSION: u32 = 1;

macro_rules! actions {
    ($($(#[$doc:meta])* $name:ident: $key:expr, $ctx:expr;)*) => {
        /// Everything a principal may be allowed to do: one name per RPC (and per variant
        /// of an RPC that needs its own permission). New RPCs add a name here.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Action {
            $($(#[$doc])* $name,)*
        }

        impl Action {
            /// Every action.
            pub const ALL: &'static [Action] = &[$(Action::$name,)*];

            /// The name used in policy files.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Action::$name => stringify!($name),)*
                }
            }

            /// Whether the action names a key (its rules' key globs apply).
            pub fn is_key_scoped(self) -> bool {
                match self {
                    $(Action::$name => $key,)*
                }
            }

            /// Whether the action carries an encryption context (context conditions
            /// apply).
            pub fn carries_context(self) -> bool {
                match self {
                    $(Action::$name => $ctx,)*
                }
            }
        }
    };
}

actions! {
    /// `KeyService.CreateKey`.
    CreateKey: true, false;
    /// `KeyService.GetKey`.
    GetKey: true, false;
    /// `KeyService.ListKeys` (the list shows only keys the principal may list).
    ListKeys: true, false;
    /// `KeyService.GenerateDataKey` (with or without plaintext).
    GenerateDataKey: true, true;
    /// `KeyService.WrapKey`.
    WrapKey: true, true;
    /// `KeyService.UnwrapKey`.
    UnwrapKey: true, true;
    /// `KeyService.RewrapKey`.
    RewrapKey: true, true;
    /// `KeyService.RotateKey`.
    RotateKey: true, false;
    /// `KeyService.DisableKeyVersion`.
    DisableKeyVersion: true, false;
    /// `KeyService.EnableKeyVersion`.
    EnableKeyVersion: true, false;
    /// `KeyService.RetireKeyVersion`.
    RetireKeyVersion: true, false;
    /// `KeyService.RetireKey`.
    RetireKey: true, false;
    /// `KeyService.CancelRetirement`.
    CancelRetirement: true, false;
    /// `KeyService.SetRetention`.
    SetRetention: true, false;
    /// `QuorumService.Init`.
    Init: false, false;
    /// `QuorumService.Unseal`.
    Unseal: false, false;
    /// `QuorumService.Seal`.
    Seal: false, false;
    /// `QuorumService.Rekey`.
    Rekey: false, false;
    /// `QuorumService.ListRequests`.
    ListRequests: false, false;
    /// `QuorumService.GetRequest`.
    GetRequest: false, false;
    /// `QuorumService.Approve`.
    Approve: false, false;
    /// `QuorumService.Reject`.
    Reject: false, false;
    /// `AccessService.CreateToken`.
    CreateToken: false, false;
    /// `AccessService.RevokeToken`.
    RevokeToken: false, false;
    /// `AccessService.ListTokens`.
    ListTokens: false, false;
    /// `AccessService.Elevate`.
    Elevate: false, false;
    /// `AccessService.BreakGlass` (allowed by `[break_glass] principals`, not by roles).
    BreakGlass: false, false;
    /// `AccessService.EnrollTotp`.
    EnrollTotp: false, false;
    /// `AccessService.ListReviews`.
    ListReviews: false, false;
    /// `AccessService.CloseReview`.
    CloseReview: false, false;
    /// `AccessService.UpdatePolicy`.
    UpdatePolicy: false, false;
    /// `AuditService.QueryAudit`.
    QueryAudit: false, false;
    /// `AuditService.VerifyAudit`.
    VerifyAudit: false, false;
}

impl Action {
    /// Parses a policy name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.iter().copied().find(|a| a.as_str() == s)
    }

    /// Whether the action hands key material to the caller (separation of duties).
    pub fn retrieves_material(self) -> bool {
        matches!(self, Action::GenerateDataKey | Action::UnwrapKey)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a policy was refused. Messages name the file, role or value at fault (a policy
/// holds no secret).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or the directory could not be read.
    #[error("cannot read the access policy {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or keys the format does not have.
    #[error("invalid access policy {file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// A `version` this build does not read.
    #[error("access policy {file}: unsupported version {version} (this build reads version 1)")]
    Version {
        /// The file.
        file: String,
        /// The version found.
        version: u32,
    },
    /// Anything else wrong with the content.
    #[error("access policy: {0}")]
    Invalid(String),
    /// A role breaks separation of duties.
    #[error(
        "access policy: role {0:?} both retrieves key material (GenerateDataKey/UnwrapKey) and \
         approves quorum requests (Approve); separation of duties forbids it"
    )]
    SeparationOfDuties(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: u32,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    bindings: Vec<RawBinding>,
    break_glass: Option<RawBreakGlass>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[serde(default)]
    description: String,
    #[serde(default)]
    mfa: bool,
    /// `"1h"`: the role may be requested with `Elevate` for up to this long.
    max_elevation: Option<String>,
    rate_limit: Option<RawLimit>,
    #[serde(default)]
    allow: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    per_second: f64,
    burst: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    operations: Vec<String>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    context: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreakGlass {
    principals: Vec<String>,
    role: String,
    max_duration: Option<String>,
}

/// One allow rule of a role.
#[derive(Clone, Debug, PartialEq)]
struct Rule {
    actions: BTreeSet<Action>,
    /// Key-name globs; empty only for rules without key-scoped actions.
    keys: Vec<String>,
    /// Context key → allowed values (`*` any value; `${principal}`, `${principal.id}`
    /// substituted).
    context: BTreeMap<String, Vec<String>>,
}

/// A role.
#[derive(Clone, Debug, PartialEq)]
pub struct Role {
    name: String,
    description: String,
    rules: Vec<Rule>,
    mfa: bool,
    max_elevation_ms: Option<i64>,
    limit: Option<Limit>,
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
struct Binding {
    principals: Vec<String>,
    groups: Vec<String>,
    roles: Vec<String>,
}

/// Who may take the break-glass role, and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakGlass {
    principals: Vec<String>,
    /// The role taken.
    pub role: String,
    /// Longest grant, ms (≤ 1 h).
    pub max_ms: i64,
}

/// A validated access policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    roles: BTreeMap<String, Role>,
    groups: BTreeMap<String, Vec<String>>,
    bindings: Vec<Binding>,
    break_glass: Option<BreakGlass>,
    digest: String,
}

/// Who asks: the principal's name and the roles it holds now (see [`Policy::roles_of`]).
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// Principal name.
    pub name: &'a str,
    /// Roles held (bound, narrowed by the token, plus active grants).
    pub roles: &'a [String],
}

/// What a principal asks to do.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The action.
    pub action: Action,
    /// The key, for key-scoped actions. `None` asks whether the action is allowed on
    /// some key (a pre-check before a lookup that names the key).
    pub key: Option<&'a str>,
    /// The encryption context, for actions that carry one.
    pub context: Option<&'a BTreeMap<String, String>>,
}

/// What the policy decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Allowed through `role`.
    Allow(Allowed),
    /// Not allowed (default deny).
    Deny,
}

/// An allowed request: the role that allows it and what using it requires.
#[derive(Clone, Debug, PartialEq)]
pub struct Allowed {
    /// The role whose rule allows it.
    pub role: String,
    /// Whether a TOTP code is required (every allowing role asks for MFA).
    pub mfa: bool,
    /// The role's rate limit, applied per principal.
    pub limit: Option<Limit>,
}

impl Default for Policy {
    /// The shipped policy (`policies/roles.toml` and `policies/bindings.toml`).
    fn default() -> Self {
        match Policy::from_files(SHIPPED) {
            Ok(p) => p,
            // The shipped files are tested to load; an empty policy denies everything.
            Err(_) => Policy {
                roles: BTreeMap::new(),
                groups: BTreeMap::new(),
                bindings: Vec::new(),
                break_glass: None,
                digest: String::new(),
            },
        }
    }
}

fn invalid(m: String) -> PolicyError {
    PolicyError::Invalid(m)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn duration(s: &str, what: &str) -> Result<i64, PolicyError> {
    crate::quorum::policy::parse_duration_ms(s)
        .filter(|ms| (1000..=MAX_GRANT_MS).contains(ms))
        .ok_or_else(|| {
            invalid(format!(
                "{what}: invalid duration {s:?} (1s to 1h, e.g. \"30m\")"
            ))
        })
}

impl Policy {
    /// Parses one policy document (e.g. the text of an `UpdatePolicy`).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_files(&[("policy", text)])
    }

    /// Parses and merges named documents (file name, text).
    pub fn from_files<N: AsRef<str>, T: AsRef<str>>(
        files: &[(N, T)],
    ) -> Result<Policy, PolicyError> {
        let mut roles = BTreeMap::new();
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut bindings = Vec::new();
        let mut break_glass: Option<RawBreakGlass> = None;
        let mut hasher = Sha256::new();
        for (file, text) in files {
            let (file, text) = (file.as_ref(), text.as_ref());
            hasher.update((file.len() as u32).to_be_bytes());
            hasher.update(file.as_bytes());
            hasher.update((text.len() as u32).to_be_bytes());
            hasher.update(text.as_bytes());
            let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
                file: file.to_string(),
                message: e.message().to_string(),
            })?;
            if raw.version != VERSION {
                return Err(PolicyError::Version {
                    file: file.to_string(),
                    version: raw.version,
                });
            }
            for (name, r) in raw.roles {
                if roles.contains_key(&name) {
                    return Err(invalid(format!("role {name:?} is defined twice")));
                }
                let role = Self::parse_role(&name, r)?;
                roles.insert(name, role);
            }
            for (name, members) in raw.groups {
                if !valid_name(&name) {
                    return Err(invalid(format!("invalid group name {name:?}")));
                }
                if groups.insert(name.clone(), members).is_some() {
                    return Err(invalid(format!("group {name:?} is defined twice")));
                }
            }
            for b in raw.bindings {
                if b.principals.is_empty() && b.groups.is_empty() {
                    return Err(invalid(format!(
                        "a binding in {file} names no principals or groups"
                    )));
                }
                bindings.push(Binding {
                    principals: b.principals,
                    groups: b.groups,
                    roles: b.roles,
                });
            }
            if let Some(bg) = raw.break_glass {
                if break_glass.is_some() {
                    return Err(invalid("[break_glass] is defined twice".into()));
                }
                break_glass = Some(bg);
            }
        }
        for b in &bindings {
            for r in &b.roles {
                if !roles.contains_key(r) {
                    return Err(invalid(format!("a binding names the unknown role {r:?}")));
                }
            }
            for g in &b.groups {
                if !groups.contains_key(g) {
                    return Err(invalid(format!("a binding names the unknown group {g:?}")));
                }
            }
        }
        let break_glass = match break_glass {
            None => None,
            Some(bg) => {
                let role: &Role = roles.get(&bg.role).ok_or_else(|| {
                    invalid(format!(
                        "[break_glass] names the unknown role {:?}",
                        bg.role
                    ))
                })?;
                let _ = role;
                let max_ms = match bg.max_duration {
                    Some(d) => duration(&d, "[break_glass] max_duration")?,
                    None => MAX_GRANT_MS,
                };
                Some(BreakGlass {
                    principals: bg.principals,
                    role: bg.role,
                    max_ms,
                })
            }
        };
        Ok(Policy {
            roles,
            groups,
            bindings,
            break_glass,
            digest: hex::encode(hasher.finalize()),
        })
    }

    fn parse_role(name: &str, r: RawRole) -> Result<Role, PolicyError> {
        if !valid_name(name) {
            return Err(invalid(format!(
                "invalid role name {name:?} (1-64 of [a-z0-9._-])"
            )));
        }
        let mut rules = Vec::new();
        for raw in r.allow {
            let mut actions = BTreeSet::new();
            for op in &raw.operations {
                let a = Action::parse(op)
                    .ok_or_else(|| invalid(format!("role {name:?}: unknown operation {op:?}")))?;
                if a == Action::BreakGlass {
                    return Err(invalid(format!(
                        "role {name:?}: BreakGlass is allowed by [break_glass] principals, not by roles"
                    )));
                }
                actions.insert(a);
            }
            if actions.is_empty() {
                return Err(invalid(format!(
                    "role {name:?}: a rule lists no operations"
                )));
            }
            let scoped = actions.iter().any(|a| a.is_key_scoped());
            if scoped && raw.keys.is_empty() {
                return Err(invalid(format!(
                    "role {name:?}: a rule with key operations needs keys = [globs]"
                )));
            }
            if !raw.context.is_empty() {
                if let Some(a) = actions.iter().find(|a| !a.carries_context()) {
                    return Err(invalid(format!(
                        "role {name:?}: context conditions apply only to GenerateDataKey, \
                         WrapKey, UnwrapKey and RewrapKey, not {a}"
                    )));
                }
                if raw.context.values().any(Vec::is_empty) {
                    return Err(invalid(format!(
                        "role {name:?}: a context condition allows no value"
                    )));
                }
            }
            rules.push(Rule {
                actions,
                keys: raw.keys,
                context: raw.context,
            });
        }
        let retrieves = rules
            .iter()
            .any(|r| r.actions.iter().any(|a| a.retrieves_material()));
        let approves = rules.iter().any(|r| r.actions.contains(&Action::Approve));
        if retrieves && approves {
            return Err(PolicyError::SeparationOfDuties(name.to_string()));
        }
        let max_elevation_ms = match r.max_elevation {
            Some(d) => Some(duration(&d, &format!("role {name:?} max_elevation"))?),
            None => None,
        };
        let limit = match r.rate_limit {
            None => None,
            Some(l) => {
                let burst = l.burst.unwrap_or(l.per_second);
                if !(l.per_second > 0.0 && l.per_second.is_finite() && burst >= 1.0) {
                    return Err(invalid(format!(
                        "role {name:?}: rate_limit needs per_second > 0 and burst >= 1"
                    )));
                }
                Some(Limit {
                    per_second: l.per_second,
                    burst,
                })
            }
        };
        Ok(Role {
            name: name.to_string(),
            description: r.description,
            rules,
            mfa: r.mfa,
            max_elevation_ms,
            limit,
        })
    }

    /// Reads every role/binding file of `dir` (all `*.toml` but [`FOREIGN_FILES`]), in
    /// name order.
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let read_err = |source| PolicyError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".toml") && !FOREIGN_FILES.contains(&name.as_str()) {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(invalid(format!(
                "no role or binding files (*.toml) in {}",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path)
                .map_err(|source| PolicyError::Read { path, source })?;
            files.push((name, text));
        }
        Policy::from_files(&files)
    }

    /// The policy in force at start: `explicit` if given (it must load), else
    /// [`DEFAULT_DIR`] if it exists, else the shipped built-in copy.
    pub fn resolve(explicit: Option<&Path>) -> Result<(Policy, Option<PathBuf>), PolicyError> {
        match explicit {
            Some(d) => Ok((Policy::load_dir(d)?, Some(d.to_path_buf()))),
            None => {
                let d = Path::new(DEFAULT_DIR);
                if d.is_dir() {
                    Ok((Policy::load_dir(d)?, Some(d.to_path_buf())))
                } else {
                    Ok((Policy::default(), None))
                }
            }
        }
    }

    /// Hex SHA-256 over the files it was read from (names and texts): which policy is in
    /// force, for logs.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// A role by name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// The break-glass settings, if any.
    pub fn break_glass(&self) -> Option<&BreakGlass> {
        self.break_glass.as_ref()
    }

    /// Whether `principal` may take the break-glass role.
    pub fn may_break_glass(&self, principal: &str) -> bool {
        self.break_glass
            .as_ref()
            .is_some_and(|b| b.principals.iter().any(|p| glob_match(p, principal)))
    }

    /// The roles `principal` holds by the bindings, narrowed to `token_roles` when the
    /// token names any. Sorted, without duplicates.
    pub fn roles_of(&self, principal: &str, token_roles: &[String]) -> Vec<String> {
        let in_group = |g: &String| {
            self.groups
                .get(g)
                .is_some_and(|m| m.iter().any(|p| glob_match(p, principal)))
        };
        let mut out = BTreeSet::new();
        for b in &self.bindings {
            if b.principals.iter().any(|p| glob_match(p, principal))
                || b.groups.iter().any(in_group)
            {
                out.extend(b.roles.iter().cloned());
            }
        }
        if !token_roles.is_empty() {
            out.retain(|r| token_roles.contains(r));
        }
        out.into_iter().collect()
    }

    /// The one authorization decision. Default deny.
    pub fn authorize(&self, who: Subject<'_>, req: Request<'_>) -> Decision {
        if req.action == Action::BreakGlass {
            return match (&self.break_glass, self.may_break_glass(who.name)) {
                (Some(bg), true) => Decision::Allow(Allowed {
                    role: bg.role.clone(),
                    mfa: self.roles.get(&bg.role).is_some_and(|r| r.mfa),
                    limit: None,
                }),
                _ => Decision::Deny,
            };
        }
        // Break-glass principals must be able to enrol for the MFA their role needs,
        // whatever else they hold.
        if req.action == Action::EnrollTotp && self.may_break_glass(who.name) {
            return Decision::Allow(Allowed {
                role: String::new(),
                mfa: false,
                limit: None,
            });
        }
        let mut best: Option<Allowed> = None;
        for name in who.roles {
            let Some(role) = self.roles.get(name) else {
                continue;
            };
            if !role.rules.iter().any(|r| rule_allows(r, who.name, &req)) {
                continue;
            }
            let cand = Allowed {
                role: role.name.clone(),
                mfa: role.mfa,
                limit: role.limit,
            };
            // Prefer a role without MFA, then one without a rate limit.
            let rank = |a: &Allowed| (a.mfa, a.limit.is_some());
            if best.as_ref().is_none_or(|b| rank(&cand) < rank(b)) {
                best = Some(cand);
            }
        }
        best.map_or(Decision::Deny, Decision::Allow)
    }
}

fn rule_allows(rule: &Rule, principal: &str, req: &Request<'_>) -> bool {
    if !rule.actions.contains(&req.action) {
        return false;
    }
    if req.action.is_key_scoped() {
        if let Some(key) = req.key {
            if !rule.keys.iter().any(|g| glob_match(g, key)) {
                return false;
            }
        }
    }
    if req.action.carries_context() && !rule.context.is_empty() {
        // Without the context (a pre-check), the rule may still allow the final request.
        if let Some(ctx) = req.context {
            let id = principal.rsplit(':').next().unwrap_or(principal);
            let ok = rule.context.iter().all(|(k, allowed)| {
                ctx.get(k).is_some_and(|v| {
                    allowed.iter().any(|a| match a.as_str() {
                        "*" => true,
                        "${principal}" => v == principal,
                        "${principal.id}" => v == id,
                        lit => v == lit,
                    })
                })
            });
            if !ok {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    type Row<'a> = (
        &'a str,
        &'a [&'a str],
        Action,
        Option<&'a str>,
        Option<&'a BTreeMap<String, String>>,
        bool,
    );

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn decide(p: &Policy, who: &str, token_roles: &[&str], req: Request<'_>) -> Decision {
        let token: Vec<String> = token_roles.iter().map(|s| s.to_string()).collect();
        let roles = p.roles_of(who, &token);
        p.authorize(
            Subject {
                name: who,
                roles: &roles,
            },
            req,
        )
    }

    fn allowed(p: &Policy, who: &str, action: Action, key: Option<&str>) -> bool {
        matches!(
            decide(
                p,
                who,
                &[],
                Request {
                    action,
                    key,
                    context: Some(&BTreeMap::new()),
                }
            ),
            Decision::Allow(_)
        )
    }

    #[test]
    fn the_shipped_policy_loads_and_the_built_in_copy_equals_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let on_disk = Policy::load_dir(&dir).unwrap();
        assert_eq!(on_disk, Policy::default());
        for r in [
            "service",
            "key-admin",
            "custodian",
            "auditor",
            "break-glass",
            "admin",
        ] {
            assert!(on_disk.role(r).is_some(), "{r}");
        }
    }

    /// Roles × operations × key names on the shipped policy.
    #[test]
    fn shipped_roles_table() {
        use Action::*;
        let p = Policy::default();
        let k = Some("billing/ssn");
        #[rustfmt::skip]
        let table: &[(&str, Action, Option<&str>, bool)] = &[
            // A service uses keys, never administers them.
            ("svc:billing", GenerateDataKey, k, true),
            ("svc:billing", WrapKey, k, true),
            ("svc:billing", UnwrapKey, k, true),
            ("svc:billing", RewrapKey, k, true),
            ("svc:billing", CreateKey, k, false),
            ("svc:billing", RotateKey, k, false),
            ("svc:billing", DisableKeyVersion, k, false),
            ("svc:billing", CreateToken, None, false),
            ("svc:billing", Approve, None, false),
            ("svc:billing", QueryAudit, None, false),
            // A key admin administers keys, never sees their material.
            ("key-admin:ann", CreateKey, k, true),
            ("key-admin:ann", GetKey, k, true),
            ("key-admin:ann", ListKeys, k, true),
            ("key-admin:ann", RotateKey, k, true),
            ("key-admin:ann", DisableKeyVersion, k, true),
            ("key-admin:ann", EnableKeyVersion, k, true),
            ("key-admin:ann", RetireKeyVersion, k, true),
            ("key-admin:ann", RetireKey, k, true),
            ("key-admin:ann", CancelRetirement, k, true),
            ("key-admin:ann", SetRetention, k, true),
            ("key-admin:ann", UnwrapKey, k, false),
            ("key-admin:ann", GenerateDataKey, k, false),
            ("key-admin:ann", WrapKey, k, false),
            ("key-admin:ann", Approve, None, false),
            ("key-admin:ann", Elevate, None, true),
            // Custodians unseal and approve; no key operation.
            ("custodian:c1", Unseal, None, true),
            ("custodian:c1", Approve, None, true),
            ("custodian:c1", Reject, None, true),
            ("custodian:c1", UnwrapKey, k, false),
            ("custodian:c1", CreateKey, k, false),
            // Auditors read the audit trail and close reviews; no key operation.
            ("auditor:eve", QueryAudit, None, true),
            ("auditor:eve", VerifyAudit, None, true),
            ("auditor:eve", ListReviews, None, true),
            ("auditor:eve", CloseReview, None, true),
            ("auditor:eve", GetKey, k, false),
            ("auditor:eve", UnwrapKey, k, false),
            ("auditor:eve", ListKeys, k, false),
            // Nobody bound: nothing.
            ("stranger", GetKey, k, false),
            ("stranger", ListRequests, None, false),
            // The dev/bootstrap admin keeps what it had.
            ("dev-admin", CreateToken, None, true),
            ("dev-admin", Init, None, true),
            ("dev-admin", CreateKey, k, true),
            ("dev-admin", UnwrapKey, k, true),
            ("dev-admin", Approve, None, false),
        ];
        for (who, action, key, want) in table {
            assert_eq!(
                allowed(&p, who, *action, *key),
                *want,
                "{who} {action} {key:?}"
            );
        }
    }

    const CUSTOM: &str = r#"
version = 1

[roles.tenant-svc]
mfa = false
[[roles.tenant-svc.allow]]
operations = ["GenerateDataKey", "UnwrapKey"]
keys = ["tenants/*"]
context = { tenant = ["${principal.id}"], purpose = ["billing", "care"] }
[[roles.tenant-svc.allow]]
operations = ["GetKey"]
keys = ["tenants/*", "shared"]

[roles.audit-svc]
[[roles.audit-svc.allow]]
operations = ["WrapKey"]
keys = ["*"]
context = { owner = ["${principal}"], region = ["*"] }

[roles.ops]
mfa = true
max_elevation = "30m"
rate_limit = { per_second = 2.0, burst = 2 }
[[roles.ops.allow]]
operations = ["RotateKey", "GetKey"]
keys = ["*"]

[groups]
oncall = ["alice", "bob"]

[[bindings]]
principals = ["svc:*"]
roles = ["tenant-svc"]

[[bindings]]
groups = ["oncall"]
roles = ["ops"]

[[bindings]]
principals = ["svc:audit"]
roles = ["audit-svc"]

[break_glass]
principals = ["alice"]
role = "ops"
max_duration = "1h"
"#;

    #[test]
    fn globs_groups_context_and_token_narrowing() {
        use Action::*;
        let p = Policy::parse(CUSTOM).unwrap();
        let good = ctx(&[("tenant", "acme"), ("purpose", "care")]);
        let other = ctx(&[("tenant", "globex"), ("purpose", "care")]);
        let bad_purpose = ctx(&[("tenant", "acme"), ("purpose", "ads")]);
        let missing = ctx(&[("tenant", "acme")]);
        let owner_ok = ctx(&[("owner", "svc:audit"), ("region", "eu-1")]);
        let owner_bad = ctx(&[("owner", "audit"), ("region", "eu-1")]);
        let no_region = ctx(&[("owner", "svc:audit")]);
        #[rustfmt::skip]
        let table: &[Row] = &[
            ("svc:acme", &[], GenerateDataKey, Some("tenants/acme"), Some(&good), true),
            ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&good), true),
            ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&other), false),
            ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&bad_purpose), false),
            ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&missing), false),
            ("svc:acme", &[], UnwrapKey, Some("other/x"), Some(&good), false),
            ("svc:acme", &[], WrapKey, Some("tenants/acme"), Some(&good), false),
            ("svc:acme", &[], GetKey, Some("shared"), None, true),
            ("svc:acme", &[], RotateKey, Some("shared"), None, false),
            // A pre-check without key or context: some rule may allow it.
            ("svc:acme", &[], UnwrapKey, None, None, true),
            ("alice", &[], RotateKey, Some("any"), None, true),
            ("carol", &[], RotateKey, Some("any"), None, false),
            // The token narrows: a token naming only another role holds nothing here.
            ("alice", &["tenant-svc"], RotateKey, Some("any"), None, false),
            ("svc:acme", &["tenant-svc", "ops"], GetKey, Some("shared"), None, true),
            ("svc:audit", &[], WrapKey, Some("k"), Some(&owner_ok), true),
            ("svc:audit", &[], WrapKey, Some("k"), Some(&owner_bad), false),
            ("svc:audit", &[], WrapKey, Some("k"), Some(&no_region), false),
            ("alice", &[], BreakGlass, None, None, true),
            ("alice", &["tenant-svc"], EnrollTotp, None, None, true),
            ("carol", &[], EnrollTotp, None, None, false),
            ("bob", &[], BreakGlass, None, None, false),
        ];
        for (who, token, action, key, context, want) in table {
            let d = decide(
                &p,
                who,
                token,
                Request {
                    action: *action,
                    key: *key,
                    context: *context,
                },
            );
            assert_eq!(
                matches!(d, Decision::Allow(_)),
                *want,
                "{who} {token:?} {action} {key:?} {context:?}"
            );
        }
        let Decision::Allow(a) = decide(
            &p,
            "bob",
            &[],
            Request {
                action: RotateKey,
                key: Some("k"),
                context: None,
            },
        ) else {
            panic!("bob may rotate");
        };
        assert!(a.mfa);
        assert_eq!(a.role, "ops");
        assert_eq!(
            a.limit,
            Some(Limit {
                per_second: 2.0,
                burst: 2.0
            })
        );
        assert_eq!(p.role("ops").unwrap().max_elevation_ms(), Some(1_800_000));
        assert_eq!(p.break_glass().unwrap().max_ms, 3_600_000);
    }

    #[test]
    fn separation_of_duties_is_checked_at_load() {
        let bad = r#"
version = 1
[roles.rogue]
[[roles.rogue.allow]]
operations = ["UnwrapKey"]
keys = ["*"]
[[roles.rogue.allow]]
operations = ["Approve"]
"#;
        let e = Policy::parse(bad).unwrap_err();
        assert!(matches!(e, PolicyError::SeparationOfDuties(ref r) if r == "rogue"));
        assert!(e.to_string().contains("\"rogue\""), "{e}");
        assert!(e.to_string().contains("separation of duties"), "{e}");
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let ok = "version = 1\n[roles.r]\n[[roles.r.allow]]\noperations = [\"GetKey\"]\nkeys = [\"*\"]\n";
        Policy::parse(ok).unwrap();
        for (bad, what) in [
            (ok.replace("version = 1", "version = 2"), "version"),
            (ok.replace("GetKey", "GetKeys"), "unknown operation"),
            (format!("{ok}colour = \"red\"\n"), "unknown field"),
            (
                ok.replace("keys = [\"*\"]\n", "keyz = [\"*\"]\n"),
                "unknown field",
            ),
            (ok.replace("keys = [\"*\"]\n", ""), "needs keys"),
            (
                format!("{ok}[[bindings]]\nprincipals = [\"x\"]\nroles = [\"nope\"]\n"),
                "unknown role",
            ),
            (
                format!("{ok}[[bindings]]\ngroups = [\"g\"]\nroles = [\"r\"]\n"),
                "unknown group",
            ),
            (
                format!("{ok}[[bindings]]\nroles = [\"r\"]\n"),
                "no principals",
            ),
            (
                ok.replace(
                    "[[roles.r.allow]]",
                    "max_elevation = \"2h\"\n[[roles.r.allow]]",
                ),
                "invalid duration",
            ),
            (
                ok.replace(
                    "[[roles.r.allow]]",
                    "rate_limit = { per_second = 0.0 }\n[[roles.r.allow]]",
                ),
                "rate_limit",
            ),
            (
                ok.replace(
                    "keys = [\"*\"]",
                    "keys = [\"*\"]\ncontext = { t = [\"a\"] }",
                ),
                "context conditions apply only",
            ),
            (ok.replace("GetKey", "BreakGlass"), "break_glass"),
            (
                ok.replace("[roles.r]", "[roles.R]")
                    .replace("roles.r.", "roles.R."),
                "invalid role name",
            ),
            (
                format!("{ok}[break_glass]\nprincipals = [\"a\"]\nrole = \"zz\"\n"),
                "unknown role",
            ),
            ("not toml".to_string(), "invalid access policy"),
        ] {
            let e = Policy::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{bad:?}: {e}");
        }
        // The same role in two files.
        let e = Policy::from_files(&[("a.toml", ok), ("b.toml", ok)]).unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    #[test]
    fn load_dir_skips_other_loaders_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("quorum.toml"), "operations = []").unwrap();
        std::fs::write(dir.path().join("alerts.toml"), "whatever = 1").unwrap();
        std::fs::write(dir.path().join("lifecycle.toml"), "waiting = 1").unwrap();
        std::fs::write(dir.path().join("README.md"), "# hi").unwrap();
        assert!(Policy::load_dir(dir.path()).is_err(), "no role files");
        std::fs::write(dir.path().join("custom.toml"), CUSTOM).unwrap();
        let p = Policy::load_dir(dir.path()).unwrap();
        assert!(p.role("ops").is_some());
        assert!(matches!(
            Policy::resolve(Some(&dir.path().join("missing"))),
            Err(PolicyError::Read { .. })
        ));
    }
}
