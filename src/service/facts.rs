//! What a call's audit record says about its subject, returned by the use case with its
//! answer (never fed through a side channel).
//!
//! Invariant: facts hold no secret: a key name and version, and the encryption context
//! only as a keyed digest (`Context::context_digest`).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use super::error::Result;

/// The subject of a call, for its audit record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The key the call is about.
    pub key: Option<String>,
    /// The version it used or changed.
    pub version: Option<u32>,
    /// The keyed digest of its canonical encryption context.
    pub context_digest: Option<String>,
    /// What the answer does not say, for auditors (a policy refusal answered as an
    /// invalid wrapped key).
    pub detail: Option<&'static str>,
}

impl Facts {
    /// Facts naming `key` (and `version`).
    pub fn key(key: &str, version: Option<u32>) -> Self {
        Facts {
            key: Some(key.to_string()),
            version,
            context_digest: None,
            detail: None,
        }
    }
}

/// A use case's answer, with its facts on success and on failure alike.
pub struct Outcome<T> {
    /// The answer.
    pub result: Result<T>,
    /// What the audit record says about the call.
    pub facts: Facts,
}

impl<T> Outcome<T> {
    /// An answer with `facts`.
    pub fn new(result: Result<T>, facts: Facts) -> Self {
        Outcome { result, facts }
    }

    /// Applies `f` to a successful answer.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        Outcome {
            result: self.result.map(f),
            facts: self.facts,
        }
    }
}

impl<T> From<Result<T>> for Outcome<T> {
    /// An answer whose call has no subject to record.
    fn from(result: Result<T>) -> Self {
        Outcome {
            result,
            facts: Facts::default(),
        }
    }
}
