//! The one mapping from service errors to gRPC status (DESIGN §4). Classification is by
//! type, never by message text. Internal errors answer "internal error" plus the request
//! id; their details go to the log only.

use tonic::{Code, Status};

use crate::service::ServiceError;

/// The authenticated caller the auth wrapper put in the request (a request that reached
/// a handler without one is refused like any unauthenticated call).
pub(super) fn caller<T>(req: &tonic::Request<T>) -> Result<crate::service::Caller, Status> {
    req.extensions()
        .get::<crate::service::Caller>()
        .cloned()
        .ok_or_else(|| {
            let id = req
                .extensions()
                .get::<super::request_id::RequestId>()
                .map(|r| r.0.as_str())
                .unwrap_or_default();
            to_status(ServiceError::Unauthenticated, id)
        })
}

/// Maps a service error to the status the caller sees.
pub fn to_status(err: ServiceError, request_id: &str) -> Status {
    let code = match &err {
        ServiceError::Unauthenticated | ServiceError::MfaRequired(_) => Code::Unauthenticated,
        ServiceError::PermissionDenied | ServiceError::Rejected(_) => Code::PermissionDenied,
        ServiceError::InvalidArgument(_)
        | ServiceError::InvalidWrappedKey
        | ServiceError::InvalidPolicy(_) => Code::InvalidArgument,
        ServiceError::NotFound(_) => Code::NotFound,
        ServiceError::AlreadyExists(_) => Code::AlreadyExists,
        ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
        ServiceError::Unavailable(_) | ServiceError::AuditUnavailable => Code::Unavailable,
        ServiceError::Aborted(_) => Code::Aborted,
        ServiceError::RateLimited(_) => Code::ResourceExhausted,
        ServiceError::Internal(_) => Code::Internal,
    };
    match err {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
