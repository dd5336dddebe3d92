//! The decision: [`Policy::authorize`] answers whether a [`Subject`] may make a
//! [`Request`], and through which role ([`Allowed`]); [`Policy::roles_of`] says which roles
//! a principal holds by the bindings and its token.
//!
//! Invariants:
//! - **Default deny.** An action is allowed only if a role the principal holds has a rule
//!   that lists it, whose key globs match the key (key-scoped actions) and whose context
//!   conditions hold.
//! - A token's roles narrow, never widen.
//! - Pure and in memory (no I/O), so a refusal takes the same time whether or not the key
//!   exists: callers authorize before any lookup.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::{BTreeMap, BTreeSet};

use super::action::Action;
use super::model::{Policy, Rule};
use crate::authz::glob_match;
use crate::authz::ratelimit::Limit;

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

impl Policy {
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
    let implied = req.action == Action::SealStatus
        && rule
            .actions
            .iter()
            .any(|a| matches!(a, Action::Unseal | Action::Seal | Action::Init));
    if !rule.actions.contains(&req.action) && !implied {
        return false;
    }
    if req.action.is_key_scoped() || (req.action.scopes_requests() && !rule.keys.is_empty()) {
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
