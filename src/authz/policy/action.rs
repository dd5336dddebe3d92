//! The actions a policy names: one per RPC (and per variant of an RPC that needs its own
//! permission), with what each implies for the rules that allow it (key globs apply,
//! context conditions apply, it hands key material to the caller).
//!
//! Invariants: a policy file names an action by [`Action::as_str`] exactly; adding an RPC
//! adds a name here, nowhere else.
//!
//! Must not import: anything of Arca's (this is the bottom of the policy module), tonic,
//! prost, sqlx, cryptoki.

use std::fmt;

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
    /// `QuorumService.SealStatus` (also allowed by any rule that allows `Unseal`, `Seal`
    /// or `Init`: whoever acts on the seal may see it).
    SealStatus: false, false;
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

    /// Whether a rule's key globs, when it names any, limit the approval requests the
    /// action shows to those about matching keys (`ListRequests`, `GetRequest`; a rule
    /// without keys shows every request).
    pub fn scopes_requests(self) -> bool {
        matches!(self, Action::ListRequests | Action::GetRequest)
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
