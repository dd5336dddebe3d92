//! Loading a policy: reading the directory (or the shipped copy), parsing each file
//! (`schema.rs`), validating and merging them into a [`Policy`], and the digest of
//! what was read. Every rule a policy must follow is checked here, once; a policy that
//! breaks one is refused whole (the service keeps the one in force).
//!
//! Invariants:
//! - **Separation of duties**, by role, by principal and by person: no role both
//!   retrieves key material ([`Action::retrieves_material`]) and approves quorum requests
//!   ([`Action::Approve`]); no principal name can match both a binding that gives a role
//!   retrieving material and one that gives a role approving (globs are compared for a
//!   common match); no person (`[people]`) holds both through their principals.
//! - **People**: `[people]` names, per person, the exact principals (no globs) that
//!   person authenticates as; a principal belongs to at most one person (claimed twice:
//!   refused, naming the file and the principal). A principal nobody claims is a person
//!   of its own.
//! - Names are unique across files: a role, group or `[break_glass]` defined twice is
//!   refused; bindings name only roles and groups that exist.
//! - Durations lie within 1 s and [`MAX_GRANT_MS`]; rate limits have a rate above 0 and a
//!   burst of at least 1.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::action::Action;
use super::model::{Binding, BreakGlass, Policy, Role, Rule, TokenLifetimes, MAX_TOKEN_TTL_MS};
use super::schema::{RawBreakGlass, RawFile, RawRole, RawTokens, VERSION};
use crate::authz::globs_overlap;
use crate::authz::ratelimit::Limit;

/// Files of the policy directory that other loaders own.
pub const FOREIGN_FILES: &[&str] = &["quorum.toml", "alerts.toml", "lifecycle.toml"];
/// Where the server looks when no directory is given (relative to the working directory).
pub const DEFAULT_DIR: &str = "policies";
/// Longest elevation or break-glass grant the format accepts (policies may set less).
pub const MAX_GRANT_MS: i64 = 3600 * 1000;

/// The shipped role files (the built-in policy when there is no directory).
/// In name order, as [`Policy::load_dir`] reads them.
const SHIPPED: &[(&str, &str)] = &[
    (
        "bindings.toml",
        include_str!("../../../policies/bindings.toml"),
    ),
    ("roles.toml", include_str!("../../../policies/roles.toml")),
];

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
    /// A principal is claimed by two people.
    #[error(
        "access policy {file}: principal {principal:?} is claimed by two people ({first:?} and \
         {second:?}); a principal belongs to one person"
    )]
    PrincipalClaimedTwice {
        /// The file of the second claim.
        file: String,
        /// The principal.
        principal: String,
        /// The person who claimed it first.
        first: String,
        /// The person who claimed it again.
        second: String,
    },
    /// Principal names that one binding gives a role retrieving key material and another
    /// (or the same) gives a role that approves.
    #[error(
        "access policy: a principal matching both {material_principals:?} (role \
         {material_role:?}, which retrieves key material) and {approve_principals:?} (role \
         {approve_role:?}, which approves quorum requests) would hold both; separation of \
         duties forbids it"
    )]
    PrincipalSeparationOfDuties {
        /// The pattern of the binding to the material role.
        material_principals: String,
        /// That role.
        material_role: String,
        /// The pattern of the binding to the approving role.
        approve_principals: String,
        /// That role.
        approve_role: String,
    },
    /// A person holds, through their principals, a role retrieving key material and a
    /// role that approves.
    #[error(
        "access policy: person {person:?} both retrieves key material (role {material_role:?} \
         as {material_principal:?}) and approves quorum requests (role {approve_role:?} as \
         {approve_principal:?}); separation of duties forbids it"
    )]
    PersonSeparationOfDuties {
        /// The person.
        person: String,
        /// Their principal holding the material role.
        material_principal: String,
        /// That role.
        material_role: String,
        /// Their principal holding the approving role.
        approve_principal: String,
        /// That role.
        approve_role: String,
    },
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
                tokens: TokenLifetimes::default(),
                people: BTreeMap::new(),
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

/// `[tokens]`: each lifetime from 1 minute to [`MAX_TOKEN_TTL_MS`], the default no
/// longer than the maximum; one left out is the built-in value (the default shortened to
/// the maximum if that is lower).
fn token_lifetimes(t: RawTokens) -> Result<TokenLifetimes, PolicyError> {
    let parse = |s: &str, what: &str| {
        crate::quorum::policy::parse_duration_ms(s)
            .filter(|ms| (60_000..=MAX_TOKEN_TTL_MS).contains(ms))
            .ok_or_else(|| {
                invalid(format!(
                    "[tokens] {what}: invalid duration {s:?} (1m to 365d, e.g. \"90d\")"
                ))
            })
    };
    let builtin = TokenLifetimes::default();
    let max_ms = match t.max_ttl {
        Some(s) => parse(&s, "max_ttl")?,
        None => builtin.max_ms,
    };
    let default_ms = match t.default_ttl {
        Some(s) => parse(&s, "default_ttl")?,
        None => builtin.default_ms.min(max_ms),
    };
    if default_ms > max_ms {
        return Err(invalid(
            "[tokens] default_ttl is longer than max_ttl".into(),
        ));
    }
    Ok(TokenLifetimes { default_ms, max_ms })
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
        let mut tokens: Option<RawTokens> = None;
        // Principal → person, and the people defined so far.
        let mut people: BTreeMap<String, String> = BTreeMap::new();
        let mut persons: BTreeSet<String> = BTreeSet::new();
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
            if let Some(t) = raw.tokens {
                if tokens.is_some() {
                    return Err(invalid("[tokens] is defined twice".into()));
                }
                tokens = Some(t);
            }
            for (person, principals) in raw.people {
                Self::claim(file, &person, principals, &mut persons, &mut people)?;
            }
        }
        for person in &persons {
            if let Some(other) = people.get(person).filter(|o| *o != person) {
                return Err(invalid(format!(
                    "person {person:?} is also a principal that person {other:?} claims"
                )));
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
        let tokens = match tokens {
            None => TokenLifetimes::default(),
            Some(t) => token_lifetimes(t)?,
        };
        let policy = Policy {
            roles,
            groups,
            bindings,
            break_glass,
            tokens,
            people,
            digest: hex::encode(hasher.finalize()),
        };
        policy.check_principal_duties()?;
        policy.check_people_duties()?;
        Ok(policy)
    }

    /// Adds `person`'s claims (from `file`) to `people`.
    fn claim(
        file: &str,
        person: &str,
        principals: Vec<String>,
        persons: &mut BTreeSet<String>,
        people: &mut BTreeMap<String, String>,
    ) -> Result<(), PolicyError> {
        if !valid_name(person) {
            return Err(invalid(format!(
                "{file}: invalid person name {person:?} (1-64 of [a-z0-9._-])"
            )));
        }
        if !persons.insert(person.to_string()) {
            return Err(invalid(format!("person {person:?} is defined twice")));
        }
        if principals.is_empty() {
            return Err(invalid(format!(
                "{file}: person {person:?} names no principals"
            )));
        }
        for p in principals {
            if p.is_empty() || p.len() > 256 || p.contains('*') {
                return Err(invalid(format!(
                    "{file}: person {person:?}: {p:?} is not an exact principal name (a person \
                     claims exact names, never globs)"
                )));
            }
            match people.get(&p) {
                Some(first) if first == person => {}
                Some(first) => {
                    return Err(PolicyError::PrincipalClaimedTwice {
                        file: file.to_string(),
                        principal: p,
                        first: first.clone(),
                        second: person.to_string(),
                    })
                }
                None => {
                    people.insert(p, person.to_string());
                }
            }
        }
        Ok(())
    }

    /// The principal patterns a binding applies to: its own and its groups' members.
    fn patterns_of<'a>(&'a self, b: &'a Binding) -> impl Iterator<Item = &'a String> + 'a {
        b.principals
            .iter()
            .chain(b.groups.iter().filter_map(|g| self.groups.get(g)).flatten())
    }

    fn role_retrieves(&self, role: &str) -> bool {
        self.roles.get(role).is_some_and(|r| {
            r.rules
                .iter()
                .any(|rule| rule.actions.iter().any(|a| a.retrieves_material()))
        })
    }

    fn role_approves(&self, role: &str) -> bool {
        self.roles.get(role).is_some_and(|r| {
            r.rules
                .iter()
                .any(|rule| rule.actions.contains(&Action::Approve))
        })
    }

    /// Separation of duties per principal: no name may match both a binding to a role
    /// that retrieves key material and a binding to one that approves.
    fn check_principal_duties(&self) -> Result<(), PolicyError> {
        for m in &self.bindings {
            let Some(material_role) = m.roles.iter().find(|r| self.role_retrieves(r)) else {
                continue;
            };
            for a in &self.bindings {
                let Some(approve_role) = a.roles.iter().find(|r| self.role_approves(r)) else {
                    continue;
                };
                for pm in self.patterns_of(m) {
                    if let Some(pa) = self.patterns_of(a).find(|pa| globs_overlap(pm, pa)) {
                        return Err(PolicyError::PrincipalSeparationOfDuties {
                            material_principals: pm.clone(),
                            material_role: material_role.clone(),
                            approve_principals: pa.clone(),
                            approve_role: approve_role.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Separation of duties per person: no person may hold, through any of their
    /// principals, a role that retrieves key material and (through the same or another)
    /// a role that approves.
    fn check_people_duties(&self) -> Result<(), PolicyError> {
        let mut by_person: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (principal, person) in &self.people {
            by_person.entry(person).or_default().push(principal);
        }
        for (person, principals) in by_person {
            let mut material = None;
            let mut approve = None;
            for p in principals {
                for role in self.roles_of(p, &[]) {
                    if material.is_none() && self.role_retrieves(&role) {
                        material = Some((p, role.clone()));
                    }
                    if approve.is_none() && self.role_approves(&role) {
                        approve = Some((p, role));
                    }
                }
            }
            if let (Some((mp, mr)), Some((ap, ar))) = (material, approve) {
                return Err(PolicyError::PersonSeparationOfDuties {
                    person: person.to_string(),
                    material_principal: mp.to_string(),
                    material_role: mr,
                    approve_principal: ap.to_string(),
                    approve_role: ar,
                });
            }
        }
        Ok(())
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
}
