//! The one mapping from service errors to gRPC status (DESIGN §4). Classification is by
//! type, never by message text. A typed refusal also carries its stable reason in the
//! `x-arca-reason` metadata, so clients and tests tell outcomes apart without reading the
//! message. Internal errors answer "internal error" plus the request id; their details go
//! to the log only.

use tonic::{Code, Status};

use super::client_cert::CertRefusal;
use crate::service::ServiceError;

/// Metadata key of a typed refusal's stable reason.
pub const REASON_HEADER: &str = "x-arca-reason";

/// Maps a service error to the status the caller sees.
pub fn to_status(err: ServiceError, request_id: &str) -> Status {
    let code = match &err {
        ServiceError::Unauthenticated | ServiceError::Mfa(_) => Code::Unauthenticated,
        ServiceError::PermissionDenied
        | ServiceError::Rejected(_)
        | ServiceError::StateForged(_) => Code::PermissionDenied,
        ServiceError::InvalidArgument(_)
        | ServiceError::InvalidWrappedKey
        | ServiceError::InvalidPolicy(_) => Code::InvalidArgument,
        ServiceError::NotFound(_) => Code::NotFound,
        ServiceError::AlreadyExists(_) => Code::AlreadyExists,
        ServiceError::Conflict(_) | ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
        ServiceError::Sealed | ServiceError::Unavailable(_) | ServiceError::AuditUnavailable => {
            Code::Unavailable
        }
        ServiceError::Aborted(_) => Code::Aborted,
        ServiceError::RateLimited(_) => Code::ResourceExhausted,
        ServiceError::Internal(_) => Code::Internal,
    };
    let reason = err.reason();
    let mut status = match err {
        ServiceError::RateLimited(wait) => {
            let mut s = Status::new(code, "rate limit exceeded");
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(v) = secs.max(1).to_string().parse() {
                s.metadata_mut().insert("retry-after", v);
            }
            s
        }
        ServiceError::Internal(source) => {
            tracing::error!(request_id, error = %source, source = ?source.source(), "internal error");
            Status::new(code, format!("internal error (request id {request_id})"))
        }
        other => {
            if code == Code::Unavailable {
                tracing::warn!(request_id, reason = %other, "request failed: unavailable");
            }
            Status::new(code, other.to_string())
        }
    };
    if let Some(v) = reason.and_then(|r| r.parse().ok()) {
        status.metadata_mut().insert(REASON_HEADER, v);
    }
    status
}

/// A request the transport refused before any handler ran (`grpc::sanitize`), by the
/// code tonic gave it, in Arca's fixed words with a stable reason: undecodable
/// (`INVALID_ARGUMENT`, `MALFORMED_REQUEST`), over the size limit (`RESOURCE_EXHAUSTED`,
/// `REQUEST_TOO_LARGE`), an unknown method (`UNIMPLEMENTED`), anything else (its code,
/// `TRANSPORT_REFUSED`). None of tonic's words (field names, sizes) reach the caller.
pub fn transport_refused(tonic_code: Code) -> Status {
    let (code, message, reason) = match tonic_code {
        Code::Internal | Code::InvalidArgument => (
            Code::InvalidArgument,
            "invalid request message",
            "MALFORMED_REQUEST",
        ),
        Code::OutOfRange | Code::ResourceExhausted => (
            Code::ResourceExhausted,
            "request message too large",
            "REQUEST_TOO_LARGE",
        ),
        Code::Unimplemented => (Code::Unimplemented, "unknown method", "UNKNOWN_METHOD"),
        code => (
            code,
            "request refused by the transport",
            "TRANSPORT_REFUSED",
        ),
    };
    let mut status = Status::new(code, message);
    if let Ok(v) = reason.parse() {
        status.metadata_mut().insert(REASON_HEADER, v);
    }
    status
}

/// A client certificate refused on a request (`grpc::authn`): `UNAUTHENTICATED` with its
/// reason (`CERT_REVOKED`, `CERT_EXPIRED`, `CRL_EXPIRED`, ...).
pub fn cert_refused(refusal: CertRefusal) -> Status {
    let mut status = Status::new(Code::Unauthenticated, refusal.to_string());
    if let Ok(v) = refusal.reason().parse() {
        status.metadata_mut().insert(REASON_HEADER, v);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Conflict, MfaRefusal};

    #[test]
    fn internal_hides_details() {
        let s = to_status(ServiceError::Internal("secret detail".into()), "rid-1");
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error (request id rid-1)");
    }

    #[test]
    fn invalid_wrapped_key_is_one_message() {
        let s = to_status(ServiceError::InvalidWrappedKey, "r");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "invalid wrapped key or encryption context");
        assert!(s.metadata().get(REASON_HEADER).is_none());
    }

    #[test]
    fn a_refused_certificate_is_unauthenticated_with_its_reason() {
        for (r, reason) in [
            (CertRefusal::Revoked, "CERT_REVOKED"),
            (CertRefusal::Expired, "CERT_EXPIRED"),
            (CertRefusal::CrlExpired, "CRL_EXPIRED"),
            (CertRefusal::CrlUnusable, "CRL_UNUSABLE"),
        ] {
            let s = cert_refused(r);
            assert_eq!(s.code(), Code::Unauthenticated);
            assert_eq!(
                s.metadata()
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok()),
                Some(reason)
            );
        }
    }

    #[test]
    fn typed_refusals_carry_their_reason() {
        let s = to_status(ServiceError::Mfa(MfaRefusal::LockedOut), "r");
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("MFA_LOCKED_OUT")
        );
        let s = to_status(ServiceError::Conflict(Conflict::DestructionStarted), "r");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("DESTRUCTION_STARTED")
        );
        let s = to_status(
            ServiceError::StateForged(crate::keys::state::Unverified::Forged),
            "r",
        );
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("STATE_FORGED")
        );
    }
}
