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
//! One concern per file, in the order they depend on one another:
//! - `action.rs`: the actions a policy names ([`Action`]);
//! - `schema.rs`: the file format as written (the serde types);
//! - `model.rs`: the validated policy ([`Policy`], [`Role`], [`BreakGlass`]) and its
//!   read-only queries;
//! - `load.rs`: reading, validating and merging files into a [`Policy`] ([`PolicyError`]);
//! - `decide.rs`: the decision ([`Subject`], [`Request`] → [`Decision`], [`Allowed`]).
//!
//! This file only declares them and re-exports their public items, so callers name
//! everything as `crate::authz::policy::X`.
//!
//! Invariants (each enforced in the file named):
//! - **Default deny** (`decide.rs`). An action is allowed only if a role the principal
//!   holds has a rule that lists it, whose key globs match the key (key-scoped actions)
//!   and whose context conditions hold.
//! - **Separation of duties**, checked at load (`load.rs`): no role may both retrieve key
//!   material ([`Action::retrieves_material`]) and approve quorum requests
//!   ([`Action::Approve`]); such a policy is refused with a message naming the role.
//! - A token's roles narrow, never widen (`decide.rs`): a principal holds the roles its
//!   bindings give it, intersected with its token's roles when the token names any.
//! - Deciding is pure and in memory (no I/O), so a refusal takes the same time whether or
//!   not the key exists: callers authorize before any lookup.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod action;
mod decide;
mod load;
mod model;
mod schema;

#[cfg(test)]
mod tests;

pub use action::Action;
pub use decide::{Allowed, Decision, Request, Subject};
pub use load::{PolicyError, DEFAULT_DIR, FOREIGN_FILES, MAX_GRANT_MS};
pub use model::{
    BreakGlass, Policy, Role, TokenLifetimes, DEFAULT_ELEVATION_MS, DEFAULT_TOKEN_TTL_MS,
    MAX_TOKEN_TTL_MS,
};
