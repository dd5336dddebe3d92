//! The answers tonic gives on its own, before a handler runs, in Arca's words: a request
//! message that does not decode (tonic answers `INTERNAL` with the protobuf error, field
//! names and all) becomes `INVALID_ARGUMENT "invalid request message"`, and one over the
//! size limit (tonic: `OUT_OF_RANGE` with the sizes) becomes `RESOURCE_EXHAUSTED "request
//! message too large"`; any other status of tonic's keeps its code with a fixed message.
//! Each carries a stable `x-arca-reason` (`MALFORMED_REQUEST`, `REQUEST_TOO_LARGE`, ...);
//! the words are made in [`super::status::transport_refused`].
//!
//! Provenance, not text, tells them apart: every status Arca's handlers give carries the
//! call's facts as its source ([`super::call::reply`], [`super::call::accept`]); a status
//! without a source came from the transport. The hook sits inside authentication and the
//! audit layer, so the audit record shows the code the caller saw.

use http::Request;
use tonic::body::Body;
use tonic::Status;

use super::around::{call_inner, BoxResponse, Hook, Inner};
use super::call::is_public;
use super::status::transport_refused;

/// The sanitizing hook.
#[derive(Clone, Default)]
pub struct Sanitize;

/// Arca's answer for a status tonic made itself.
fn arca_words(status: &Status) -> Status {
    transport_refused(status.code())
}

impl Hook for Sanitize {
    fn call<S: Inner>(&self, inner: S, req: Request<Body>) -> BoxResponse {
        Box::pin(async move {
            if is_public(req.uri().path()) {
                return Ok(call_inner(inner, req).await);
            }
            let resp = call_inner(inner, req).await;
            let replace = resp
                .extensions()
                .get::<Status>()
                .filter(|s| std::error::Error::source(*s).is_none())
                .map(arca_words);
            Ok(match replace {
                Some(s) => {
                    tracing::info!(code = ?s.code(), "request refused before its handler");
                    s.into_http()
                }
                None => resp,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use http::Response;
    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;
    use crate::grpc::around::HookLayer;
    use crate::grpc::call::FailedCallFacts;
    use crate::grpc::status::REASON_HEADER;
    use crate::service::Facts;
    use tonic::Code;

    /// Answers a fixed status.
    #[derive(Clone)]
    struct Answers(Arc<dyn Fn() -> Status + Send + Sync>);

    impl Service<Request<Body>> for Answers {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            let s = (self.0)();
            Box::pin(async move { Ok(s.into_http()) })
        }
    }

    async fn answer(make: impl Fn() -> Status + Send + Sync + 'static) -> Status {
        let mut svc = HookLayer(Sanitize).layer(Answers(Arc::new(make)));
        let req = Request::builder().uri("/x/y").body(Body::empty()).unwrap();
        let resp = svc.call(req).await.unwrap();
        resp.extensions().get::<Status>().cloned().unwrap()
    }

    #[tokio::test]
    async fn tonics_own_words_are_replaced_and_arcas_kept() {
        let s = answer(|| {
            Status::internal(
                "failed to decode Protobuf message: CreateKeyRequest.name: invalid string value",
            )
        })
        .await;
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "invalid request message")
        );
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("MALFORMED_REQUEST")
        );
        let s = answer(|| Status::out_of_range("Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes")).await;
        assert_eq!(
            (s.code(), s.message()),
            (Code::ResourceExhausted, "request message too large")
        );
        assert_eq!(
            s.metadata()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("REQUEST_TOO_LARGE")
        );
        // A handler's status (it carries the call's facts) is Arca's own: untouched.
        let s = answer(|| {
            let mut s = Status::internal("internal error (request id r-1)");
            s.set_source(Arc::new(FailedCallFacts(Facts::default())));
            s
        })
        .await;
        assert_eq!(
            (s.code(), s.message()),
            (Code::Internal, "internal error (request id r-1)")
        );
    }
}
