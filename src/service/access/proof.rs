//! Proofs of authorization: [`Authorized<A>`] for an action `A` as a type, and
//! [`Attempt<A>`] for the one use case that must look a key up before it knows its name
//! (a wrapped key names its key by id).
//!
//! Invariants:
//! - Only the [`Guard`](super::Guard) mints these (their fields are private to this
//!   module's parent); a proof for one action cannot stand for another.
//! - A proof carries what was decided on: the principal, the key, the canonical context
//!   (the one the HSM binds and the audit digests) and the policy snapshot (policy in force
//!   and roles held) the decision used.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::authz::policy::{Action, Policy};
use crate::authz::Principal;
use crate::keys::{CanonicalContext, KeyName};

/// An action as a type: `Authorized<act::UnwrapKey>` cannot be passed where
/// `Authorized<act::RotateKey>` is wanted.
pub trait Act: Send + Sync + 'static {
    /// The policy's name of the action.
    const ACTION: Action;
}

macro_rules! acts {
    ($($name:ident),* $(,)?) => {
        /// One marker type per policy action ([`Action`]).
        pub mod act {
            use super::{Act, Action};
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub struct $name;
                impl Act for $name {
                    const ACTION: Action = Action::$name;
                }
            )*
        }
    };
}

acts!(
    CreateKey,
    GetKey,
    ListKeys,
    GenerateDataKey,
    WrapKey,
    UnwrapKey,
    RewrapKey,
    RotateKey,
    DisableKeyVersion,
    EnableKeyVersion,
    RetireKeyVersion,
    RetireKey,
    CancelRetirement,
    SetRetention,
    Init,
    Unseal,
    Seal,
    SealStatus,
    Rekey,
    ListRequests,
    GetRequest,
    Approve,
    Reject,
    CreateToken,
    RevokeToken,
    ListTokens,
    Elevate,
    BreakGlass,
    EnrollTotp,
    ListReviews,
    CloseReview,
    UpdatePolicy,
    QueryAudit,
    VerifyAudit,
);

/// What a decision is about: the key (for key-scoped actions) and the encryption context
/// (for actions that carry one).
#[derive(Debug, Default)]
pub struct Scope {
    pub(super) key: Option<KeyName>,
    pub(super) context: Option<CanonicalContext>,
}

impl Scope {
    /// No key, no context (actions on the service, or "on some key").
    pub fn none() -> Self {
        Scope::default()
    }

    /// The key `name`.
    pub fn key(name: KeyName) -> Self {
        Scope {
            key: Some(name),
            context: None,
        }
    }

    /// The key `name` with an encryption context.
    pub fn key_with(name: KeyName, context: CanonicalContext) -> Self {
        Scope {
            key: Some(name),
            context: Some(context),
        }
    }
}

/// The policy in force and the roles the caller held when a decision was made.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) policy: Arc<Policy>,
    pub(super) roles: Vec<String>,
}

/// Proof that the caller may do `A` on the proof's key (with its context): the policy
/// allowed it, the role's rate limit passed, and MFA passed where the role needs it.
pub struct Authorized<A: Act> {
    pub(super) principal: Arc<Principal>,
    pub(super) key: Option<KeyName>,
    pub(super) context: Option<CanonicalContext>,
    pub(super) snapshot: Snapshot,
    pub(super) _act: PhantomData<A>,
}

impl<A: Act> Authorized<A> {
    /// Who was authorized.
    pub fn principal(&self) -> &Arc<Principal> {
        &self.principal
    }

    /// The key decided on (key-scoped actions).
    pub fn key(&self) -> Option<&KeyName> {
        self.key.as_ref()
    }

    /// The canonical context decided on (actions that carry one).
    pub fn context(&self) -> Option<&CanonicalContext> {
        self.context.as_ref()
    }

    /// The person behind the caller (`[people]`), by the policy this decision used.
    pub fn person(&self) -> String {
        self.snapshot.policy.person_of(&self.principal.name)
    }

    /// The person behind `principal`, by the policy this decision used: people are
    /// compared under one policy.
    pub fn person_of(&self, principal: &str) -> String {
        self.snapshot.policy.person_of(principal)
    }

    /// The canonical context bytes (empty without a context), for the HSM's AAD.
    pub fn context_bytes(&self) -> Vec<u8> {
        self.context
            .as_ref()
            .map(|c| c.bytes().to_vec())
            .unwrap_or_default()
    }
}

impl<A: Act> std::fmt::Debug for Authorized<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorized")
            .field("action", &A::ACTION)
            .field("principal", &self.principal.name)
            .field("key", &self.key)
            .finish()
    }
}

/// Proof that the caller may do `A` on some key: enough to resolve a wrapped key's key id
/// to its name, which [`Guard::confirm`](super::Guard::confirm) then decides on, for the
/// same caller, with the same policy snapshot (one decision per call).
pub struct Attempt<A: Act> {
    pub(super) principal: Arc<Principal>,
    pub(super) snapshot: Snapshot,
    pub(super) _act: PhantomData<A>,
}
