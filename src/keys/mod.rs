//! The key hierarchy: key names, ids, versions and their lifecycle states, the wrapped-key
//! format and the canonical encryption context, the [`ObjectId`] of a version's HSM object,
//! and the [`KeyEngine`] that performs the HSM side of wrapping.
//!
//! Invariants:
//! - A key name matches `[a-z0-9][a-z0-9_/-]{0,127}` and is never reused.
//! - Version numbers start at 1 and increase by one per rotation.
//! - Only the primary version wraps; every `Enabled` version unwraps; other states refuse.
//! - State transitions go only along the edges [`VersionState::can_transition_to`] allows.
//! - HSM object ids cross this module's boundary only as [`ObjectId`]: the [`KeyEngine`]
//!   takes and returns it, and converts to the HSM crate's id inside `keys/`.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod access;
mod context;
mod engine;
mod object_id;
pub mod policy;
pub mod state;
mod wrapped;

pub use access::{HsmAccess, HsmOpener, PinSetter};
pub use context::{canonical_context, CanonicalContext, EncryptionContext, MAX_CONTEXT_ENTRIES};
pub use engine::{
    EngineConfig, KeyEngine, AUDIT_MAC_KEY_ID, AUDIT_MAC_KEY_LABEL, META_KEY_ID, META_KEY_LABEL,
    STATE_MAC_KEY_ID, STATE_MAC_KEY_LABEL,
};
pub use object_id::ObjectId;
pub use wrapped::{WrappedKey, WRAPPED_HEADER_LEN, WRAPPED_V1};

use std::fmt;

/// Errors of the key layer.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A wrapped key failed to parse or authenticate. One variant for every way it can fail,
    /// so callers learn nothing about which part was wrong.
    #[error("invalid wrapped key")]
    InvalidWrappedKey,
    /// A key name that does not match the naming rule.
    #[error("invalid key name")]
    InvalidKeyName,
    /// An encryption context over the limits.
    #[error("invalid encryption context: {0}")]
    InvalidContext(&'static str),
    /// Key material of a length Arca does not wrap.
    #[error("plaintext must be 16 to 64 bytes")]
    InvalidPlaintextLength,
    /// The HSM could not be reached, or did not answer in time.
    #[error("HSM unavailable")]
    HsmUnavailable(#[source] Option<arca_hsm::HsmError>),
    /// The HSM object of a version is gone (destroyed).
    #[error("HSM object missing")]
    HsmObjectMissing,
    /// The HSM refused a PIN.
    #[error("HSM login refused")]
    LoginRefused,
    /// Any other HSM failure: a bug or a misconfiguration.
    #[error("HSM failure")]
    Hsm(#[source] arca_hsm::HsmError),
}

/// A validated key name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName(String);

impl KeyName {
    /// Validates `[a-z0-9][a-z0-9_/-]{0,127}`.
    pub fn parse(s: &str) -> Result<Self, KeysError> {
        let b = s.as_bytes();
        let first_ok = matches!(b.first(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = b.iter().skip(1).all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'/' | b'-')
        });
        if first_ok && rest_ok && b.len() <= 128 {
            Ok(KeyName(s.to_string()))
        } else {
            Err(KeysError::InvalidKeyName)
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({})", self.0)
    }
}

/// A key's id: a random 128-bit UUID (v4), carried in every wrapped key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// A new random id (UUID v4 layout) from 16 random bytes.
    pub fn from_random(mut bytes: [u8; 16]) -> Self {
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        KeyId(bytes)
    }

    /// Parses the hyphenated UUID form.
    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::try_parse(s).ok().map(|u| KeyId(*u.as_bytes()))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The lifecycle state of a key version (NIST SP 800-57 names in the docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Active: unwraps; wraps if primary.
    Enabled,
    /// Suspended, reversible: refuses unwrap.
    Disabled,
    /// Deactivated until `destroy_at`; cancellable.
    ScheduledForDestruction,
    /// The HSM object is gone; a tombstone row stays.
    Destroyed,
}

impl VersionState {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Enabled => "ENABLED",
            VersionState::Disabled => "DISABLED",
            VersionState::ScheduledForDestruction => "SCHEDULED_FOR_DESTRUCTION",
            VersionState::Destroyed => "DESTROYED",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ENABLED" => VersionState::Enabled,
            "DISABLED" => VersionState::Disabled,
            "SCHEDULED_FOR_DESTRUCTION" => VersionState::ScheduledForDestruction,
            "DESTROYED" => VersionState::Destroyed,
            _ => return None,
        })
    }

    /// The lifecycle edges: Enabled ⇄ Disabled; Enabled/Disabled → Scheduled;
    /// Scheduled → Disabled (cancel) or Destroyed. Destroyed is final.
    pub fn can_transition_to(self, to: VersionState) -> bool {
        use VersionState::*;
        matches!(
            (self, to),
            (Enabled, Disabled)
                | (Disabled, Enabled)
                | (Enabled, ScheduledForDestruction)
                | (Disabled, ScheduledForDestruction)
                | (ScheduledForDestruction, Disabled)
                | (ScheduledForDestruction, Destroyed)
        )
    }

    /// The states from which `to` may be entered.
    pub fn sources_of(to: VersionState) -> &'static [VersionState] {
        use VersionState::*;
        match to {
            Enabled => &[Disabled],
            Disabled => &[Enabled, ScheduledForDestruction],
            ScheduledForDestruction => &[Enabled, Disabled],
            Destroyed => &[ScheduledForDestruction],
        }
    }
}

/// The HSM label of a key version: `arca:<key-id>:v<n>`.
pub fn version_label(id: &KeyId, version: u32) -> String {
    format!("arca:{id}:v{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        for ok in ["a", "patients-db", "billing/ssn", "0_x", &"a".repeat(128)] {
            assert!(KeyName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "_a",
            "/a",
            "a b",
            "a.b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(KeyName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transitions() {
        use VersionState::*;
        let all = [Enabled, Disabled, ScheduledForDestruction, Destroyed];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_transition_to(to),
                    VersionState::sources_of(to).contains(&from),
                    "{from:?} -> {to:?}"
                );
            }
            assert_eq!(VersionState::parse(from.as_str()), Some(from));
        }
        assert!(!Destroyed.can_transition_to(Enabled));
    }

    #[test]
    fn key_id_roundtrip() {
        let id = KeyId::from_random([0xff; 16]);
        let s = id.to_string();
        assert_eq!(KeyId::parse(&s), Some(id));
        assert_eq!(uuid::Uuid::from_bytes(id.0).get_version_num(), 4);
    }
}
