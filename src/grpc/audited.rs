//! The audit record of every call: a [`Hook`] outside authentication (so refused calls
//! are recorded too), applied once to the whole API.
//!
//! Fail closed: the hook awaits the handler, then submits the call's record and waits
//! until it is durable before it returns the response. The unary body (a data key, say)
//! has not been sent yet; if the record cannot be made durable within the timeout, the
//! response is dropped and the caller gets `UNAVAILABLE` instead.
//!
//! Never skipped: the record's place in the audit queue is taken before the handler runs
//! (a full queue refuses the call before it can change anything), and the handler and its
//! record run on a task of their own, so a caller that resets the stream or whose
//! deadline passes (tonic drops the call's future) cannot stop the record of what the
//! handler did. The record's result is the code of the handler's `Status` (none: OK); a
//! handler that panics is recorded as `INTERNAL`.
//!
//! What the record says comes back with the response: the principal from the
//! authentication layer ([`Identified`]; for a refused client certificate, its reason and
//! principal as the record's detail, [`RefusedCertificate`]), the key, version and context digest from the use
//! case ([`Facts`], or [`FailedCallFacts`] in a `Status`). Operation names in records and
//! metric labels are the API's method names only; any other path is recorded as
//! `unknown` (a caller cannot mint labels).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;

use super::around::{call_inner, BoxResponse, Hook, Inner};
use super::call::{
    is_public, peer_of, request_id, FailedCallFacts, Identified, RefusedCertificate,
};
use super::status::to_status;
use crate::audit::{code_name, AuditLog, Details, Kind, PendingRecord};
use crate::service::{Facts, ServiceError};

/// Every method of the API (the test `every_rpc_writes_exactly_one_record` checks this
/// list against the protos).
const METHODS: &[&str] = &[
    "CreateKey",
    "GetKey",
    "ListKeys",
    "GenerateDataKey",
    "WrapKey",
    "UnwrapKey",
    "RewrapKey",
    "RotateKey",
    "DisableKeyVersion",
    "EnableKeyVersion",
    "RetireKeyVersion",
    "RetireKey",
    "CancelRetirement",
    "SetRetention",
    "Init",
    "Unseal",
    "Seal",
    "SealStatus",
    "ListRequests",
    "GetRequest",
    "Approve",
    "Reject",
    "Rekey",
    "CreateToken",
    "RevokeToken",
    "ListTokens",
    "Elevate",
    "BreakGlass",
    "EnrollTotp",
    "ListReviews",
    "CloseReview",
    "UpdatePolicy",
    "QueryAudit",
    "VerifyAudit",
    "ServerReflectionInfo",
];

/// The method a request path names, if it is one of the API's.
fn method_of(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("unknown")
}

/// The gRPC code of a response: its `Status`'s (errors), else OK.
fn code_of(resp: &Response<Body>) -> u32 {
    resp.extensions()
        .get::<tonic::Status>()
        .map_or(0, |s| s.code() as u32)
}

/// The facts a response carries (a success's, or a failure's in its `Status`).
fn facts_of(resp: &mut Response<Body>) -> Facts {
    if let Some(f) = resp.extensions_mut().remove::<Facts>() {
        return f;
    }
    resp.extensions()
        .get::<tonic::Status>()
        .and_then(|s| std::error::Error::source(s))
        .and_then(|e| e.downcast_ref::<FailedCallFacts>())
        .map(|f| f.0.clone())
        .unwrap_or_default()
}

/// The audit hook; with no log (benchmarks' `--no-audit`) only metrics are kept.
#[derive(Clone)]
pub struct Audited {
    log: Option<Arc<AuditLog>>,
}

impl Audited {
    /// Records into `log`.
    pub fn new(log: Option<Arc<AuditLog>>) -> Self {
        Audited { log }
    }
}

impl Hook for Audited {
    fn call<S: Inner>(&self, inner: S, req: Request<Body>) -> BoxResponse {
        if is_public(req.uri().path()) {
            return Box::pin(async move { Ok(call_inner(inner, req).await) });
        }
        let log = self.log.clone();
        // On a task of its own, so that dropping the call (a reset, a passed deadline)
        // cannot skip the record; the outer future only waits for it.
        let task = tokio::spawn(record(log, inner, req));
        Box::pin(async move {
            Ok(task.await.unwrap_or_else(|_| {
                // The task panicked: nothing of the handler's answer leaves.
                to_status(ServiceError::AuditUnavailable, "").into_http()
            }))
        })
    }
}

/// Runs the call and makes its record durable (see the module docs).
async fn record<S: Inner>(
    log: Option<Arc<AuditLog>>,
    inner: S,
    req: Request<Body>,
) -> Response<Body> {
    let started = Instant::now();
    let time_ms = log.as_ref().map(|l| l.now_ms()).unwrap_or_default();
    let operation = method_of(req.uri().path()).to_string();
    let request_id = request_id(&req);
    let client = peer_of(&req)
        .ip
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let presented = req.headers().contains_key(http::header::AUTHORIZATION);
    // Verification is how an operator learns why the log cannot be written: it runs even
    // when its record finds no place (it is then counted as lost).
    let diagnostic = operation == "VerifyAudit";
    let place = log.as_ref().map(|l| l.reserve());
    if matches!(place, Some(None)) && !diagnostic {
        let code = tonic::Code::Unavailable as u32;
        crate::metrics::global().request(&operation, code_name(code), started.elapsed());
        return to_status(ServiceError::AuditUnavailable, &request_id).into_http();
    }
    let mut resp = match CatchPanic(Box::pin(call_inner(inner, req))).await {
        Ok(r) => r,
        Err(()) => {
            tracing::error!(operation = %operation, request_id = %request_id, "a handler panicked");
            to_status(ServiceError::internal("handler panicked"), &request_id).into_http()
        }
    };
    let code = code_of(&resp);
    let latency = started.elapsed();
    crate::metrics::global().request(&operation, code_name(code), latency);
    let Some(log) = log else {
        return resp;
    };
    let facts = facts_of(&mut resp);
    let who = resp.extensions_mut().remove::<Identified>();
    let refused = resp.extensions_mut().remove::<RefusedCertificate>();
    let details = Details {
        request_id: request_id.clone(),
        principal: who
            .as_ref()
            .map(|w| w.principal.clone())
            .unwrap_or_default(),
        auth_method: match who {
            Some(w) => w.method,
            None => if presented { "bearer" } else { "none" }.to_string(),
        },
        client,
        latency_us: latency.as_micros().min(u128::from(u64::MAX)) as u64,
        key_name: facts.key,
        key_version: facts.version,
        context_digest: facts.context_digest,
        // A refused client certificate: why, and the principal it names; or what the
        // answer stands for (a wrapped key refused by the policy).
        detail: refused
            .map(|r| format!("{} {}", r.reason, r.principal).trim().to_string())
            .or(facts.detail.map(str::to_string)),
        ..Details::default()
    };
    let rec = PendingRecord {
        time_ms,
        kind: Kind::Rpc,
        operation,
        result: code,
        details,
    };
    let recorded = match place.flatten() {
        Some(p) => log.submit(p, rec).await,
        None => Err(crate::audit::AuditError::Unavailable),
    };
    match recorded {
        Ok(_) => resp,
        // Verification returns no key material and is how an operator learns why the
        // log cannot be written: it answers anyway (its record waits in the writer for
        // the store to recover).
        Err(_) if diagnostic => resp,
        Err(_) => {
            // The response (and any key material in its body) is dropped unsent.
            drop(resp);
            to_status(ServiceError::AuditUnavailable, &request_id).into_http()
        }
    }
}

/// Polls a handler's future, turning a panic into `Err` so that the call is still
/// recorded (and answered `INTERNAL`) instead of ending with its task.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::convert::Infallible;

    use tower_service::Service;

    use super::*;
    use crate::audit::tests::{records_of, world};
    use crate::grpc::around::HookLayer;
    use crate::grpc::request_id::RequestId;

    /// A handler that panics (no handler of the API can be made to from outside).
    #[derive(Clone)]
    struct Panics;

    impl Service<Request<Body>> for Panics {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            Box::pin(async { panic!("handler bug") })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_that_panics_is_answered_internal_and_recorded() {
        use tower_layer::Layer;
        let w = world(false).await;
        let mut svc = HookLayer(Audited::new(Some(Arc::clone(&w.log)))).layer(Panics);
        let mut req = Request::builder()
            .uri("/arca.v1.KeyService/UnwrapKey")
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(RequestId("req-panic".into()));
        let resp = svc.call(req).await.unwrap();
        let status = resp.extensions().get::<tonic::Status>().map(|s| s.code());
        assert_eq!(status, Some(tonic::Code::Internal), "answered INTERNAL");
        let recs = records_of(w.store.as_ref(), w.keys.as_ref(), "UnwrapKey").await;
        assert_eq!(recs.len(), 1, "one record of the call");
        assert_eq!(recs[0].result, "INTERNAL");
        assert_eq!(recs[0].details.request_id, "req-panic");
    }

    #[test]
    fn only_the_apis_methods_name_operations() {
        assert_eq!(method_of("/arca.v1.KeyService/UnwrapKey"), "UnwrapKey");
        assert_eq!(
            method_of("/arca.v1.AuditService/VerifyAudit"),
            "VerifyAudit"
        );
        // A caller cannot mint operation names or metric labels.
        assert_eq!(method_of("/arca.v1.KeyService/Anything"), "unknown");
        assert_eq!(method_of("/x/UnwrapKey\u{0}"), "unknown");
        assert_eq!(method_of(""), "unknown");
    }
}
