//! The audit record: what is kept about each RPC or background action.
//!
//! Clear columns (`seq`, `time`, `kind`, `operation`, `result`) are what the store can
//! filter on; everything else ([`Details`]) is encrypted. No field may ever carry key
//! material, plaintext, a token, a share, a PIN or a context value; the context appears
//! only as `context_digest`, an HMAC under a key derived in the HSM at unseal and held
//! only in this process's memory.

use serde::{Deserialize, Serialize};

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One gRPC call.
    Rpc,
    /// A background or start-up action (start-up, auto-unseal, approved request run,
    /// rotation, retention, destruction, the writer's own notes).
    Job,
    /// An alert raised by a rule.
    Alert,
}

impl Kind {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rpc => "rpc",
            Kind::Job => "job",
            Kind::Alert => "alert",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "rpc" => Some(Kind::Rpc),
            "job" => Some(Kind::Job),
            "alert" => Some(Kind::Alert),
            _ => None,
        }
    }
}

/// The encrypted part of a record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// Node that wrote it.
    pub node: String,
    /// Request id (`x-request-id`), empty for jobs.
    pub request_id: String,
    /// Authenticated principal; empty when authentication failed.
    pub principal: String,
    /// `token:<token id>`, `certificate` (a client certificate alone), `bearer` (a token
    /// presented, not accepted), `none`, or `system` for jobs.
    pub auth_method: String,
    /// Key name, when the call named or revealed one the caller may use.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_name: Option<String>,
    /// Key version.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_version: Option<u32>,
    /// Client address.
    pub client: String,
    /// HMAC-SHA256 (hex) of the canonical encryption context under the audit digest key.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub context_digest: Option<String>,
    /// Handler latency, microseconds.
    pub latency_us: u64,
    /// For jobs and alerts: what happened (a rule name and its group, an action). Never
    /// a secret.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
}

/// A record before it has a place in the chain.
#[derive(Clone, Debug)]
pub struct PendingRecord {
    /// Unix ms.
    pub time_ms: i64,
    /// Kind.
    pub kind: Kind,
    /// RPC method name or action.
    pub operation: String,
    /// gRPC code number.
    pub result: u32,
    /// The encrypted part.
    pub details: Details,
}

/// A record read back and decrypted.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    /// Unix ms.
    #[serde(skip)]
    pub time_ms: i64,
    /// Kind.
    pub kind: Kind,
    /// Operation.
    pub operation: String,
    /// gRPC code name.
    pub result: String,
    /// Details.
    #[serde(flatten)]
    pub details: Details,
}

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a gRPC status code number (`UNKNOWN` for anything else).
pub fn code_name(code: u32) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// The number of a gRPC status code name (case-insensitive).
pub fn code_of_name(name: &str) -> Option<u32> {
    CODE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
}

/// Code numbers used by the audit layer itself.
pub mod codes {
    /// OK.
    pub const OK: u32 = 0;
    /// PERMISSION_DENIED.
    pub const PERMISSION_DENIED: u32 = 7;
    /// UNAVAILABLE.
    pub const UNAVAILABLE: u32 = 14;
    /// DATA_LOSS.
    pub const DATA_LOSS: u32 = 15;
    /// UNAUTHENTICATED.
    pub const UNAUTHENTICATED: u32 = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_round_trip() {
        for i in 0..17 {
            assert_eq!(code_of_name(code_name(i)), Some(i));
        }
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_of_name("unauthenticated"), Some(16));
    }
}
