//! The one error type of the client commands. `main` prints it as `error: {it}` and exits
//! with status 1; every variant's text is part of what scripts and tests read.
//!
//! Invariant: a refused call shows the gRPC code, the server's message, its stable reason
//! (`x-arca-reason`) when it has one and, unless the message already names it, the
//! request id the server answered with. Imports nothing
//! of the client.

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub(in crate::cli) enum CliError {
    /// The server answered the call with an error status.
    #[error(
        "{code:?}: {message}{}{}",
        reason_note(.reason.as_deref()),
        request_id_note(.message, .request_id.as_deref())
    )]
    Refused {
        code: tonic::Code,
        message: String,
        reason: Option<String>,
        request_id: Option<String>,
    },
    /// No connection to the server.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    /// The address or the TLS settings are not usable.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// A file the command reads (`what` names it and its path).
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
    /// A secret read from a file or stdin was empty.
    #[error("empty {0}")]
    Empty(&'static str),
    /// Key material given in base64 was not base64.
    #[error("{0} is not valid base64")]
    NotBase64(&'static str),
    /// The token or TOTP code cannot travel as a header value.
    #[error("the {0} is not a valid header value")]
    NotAHeader(&'static str),
    /// `--shares` disagrees with the number of `--custodian` names.
    #[error("--shares must equal the number of --custodian names")]
    SharesMismatch,
    /// `audit verify` found a bad record (its report is already printed).
    #[error("audit verification failed at seq {0}")]
    AuditBroken(u64),
    /// Reading stdin or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Refused {
            code: s.code(),
            message: s.message().to_string(),
            reason: s
                .metadata()
                .get("x-arca-reason")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            request_id: s
                .metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

/// ` [REASON]`, the stable reason of a typed refusal, if the server gave one.
fn reason_note(reason: Option<&str>) -> String {
    reason.map(|r| format!(" [{r}]")).unwrap_or_default()
}

/// ` (request id …)`, unless the message already names it (internal errors do).
fn request_id_note(message: &str, request_id: Option<&str>) -> String {
    match request_id {
        Some(r) if !message.contains(r) => format!(" (request id {r})"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_call_names_its_code_and_request_id_once() {
        let mut s = tonic::Status::permission_denied("not allowed");
        s.metadata_mut().insert(
            "x-request-id",
            tonic::metadata::MetadataValue::from_static("r-1"),
        );
        assert_eq!(
            CliError::from(s).to_string(),
            "PermissionDenied: not allowed (request id r-1)"
        );
        let mut s = tonic::Status::internal("internal error (request id r-2)");
        s.metadata_mut().insert(
            "x-request-id",
            tonic::metadata::MetadataValue::from_static("r-2"),
        );
        assert_eq!(
            CliError::from(s).to_string(),
            "Internal: internal error (request id r-2)"
        );
        let mut s = tonic::Status::unavailable("sealed");
        s.metadata_mut().insert(
            "x-arca-reason",
            tonic::metadata::MetadataValue::from_static("SEALED"),
        );
        assert_eq!(
            CliError::from(s).to_string(),
            "Unavailable: sealed [SEALED]"
        );
    }
}
