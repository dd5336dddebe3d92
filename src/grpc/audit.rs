//! The audit trail on the wire: [`Audited`], the tower wrapper that writes one record per
//! call (outside authentication, so refused calls are recorded too), [`Note`] for the
//! handlers, and `arca.v1.AuditService`.
//!
//! Fail closed: the wrapper awaits the handler, then submits the call's record and waits
//! until it is durable before it returns the response. The unary body (a data key, say)
//! has not been sent yet; if the record cannot be made durable within the timeout, the
//! response is dropped and the caller gets `UNAVAILABLE` instead.
//!
//! Never skipped: the record's place in the audit queue is taken before the handler runs
//! (a full queue refuses the call before it can change anything), and the handler and its
//! record run on a task of their own, so a caller that resets the stream or whose
//! deadline passes (tonic drops the call's future) cannot stop the record of what the
//! handler did. The record's result is the handler's code; a handler that panics is
//! recorded as `INTERNAL`.
//!
//! Operation names in records and metric labels are the API's method names only; any
//! other path is recorded as `unknown` (a caller cannot mint labels).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

use super::pb;
use super::request_id::RequestId;
use super::status::{caller, to_status};
use crate::audit::verify::Filter;
use crate::audit::{code_name, code_of_name, AuditLog, AuditSlot, Details, Kind, PendingRecord};
use crate::authz::{AuthMethod, Principal};
use crate::service::{KeyService, ServiceError};

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

/// How a principal authenticated, as recorded (a token by its public id, never the
/// token).
pub(super) fn method_label(p: &Principal) -> String {
    match &p.method {
        AuthMethod::Token { token_id } => format!("token:{token_id}"),
        AuthMethod::Certificate => "certificate".to_string(),
    }
}

/// Wraps an (authenticated) gRPC service with the audit record of every call.
#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    log: Option<Arc<AuditLog>>,
}

impl<S> Audited<S> {
    /// Wraps `inner`; with no log (benchmarks' `--no-audit`) only metrics are kept.
    pub fn new(inner: S, log: Option<Arc<AuditLog>>) -> Self {
        Audited { inner, log }
    }
}

impl<S: NamedService> NamedService for Audited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Audited<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let log = self.log.clone();
        // On a task of its own, so that dropping the call (a reset, a passed deadline)
        // cannot skip the record; the outer future only waits for it.
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let time_ms = log.as_ref().map(|l| l.now_ms()).unwrap_or_default();
            let operation = method_of(req.uri().path()).to_string();
            let request_id = req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let client = super::auth::peer_of(&req)
                .ip
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let presented = req.headers().contains_key(http::header::AUTHORIZATION);
            // Verification is how an operator learns why the log cannot be written: it runs
            // even when its record finds no place (it is then counted as lost).
            let diagnostic = operation == "VerifyAudit";
            let place = log.as_ref().map(|l| l.reserve());
            if matches!(place, Some(None)) && !diagnostic {
                let code = tonic::Code::Unavailable as u32;
                crate::metrics::global().request(&operation, code_name(code), started.elapsed());
                return to_status(ServiceError::AuditUnavailable, &request_id).into_http();
            }
            let slot = log.as_ref().map(|l| l.slot());
            if let Some(s) = &slot {
                req.extensions_mut().insert(s.clone());
            }
            let resp = match CatchPanic(Box::pin(inner.call(req))).await {
                Ok(Ok(r)) => r,
                Ok(Err(never)) => match never {},
                Err(()) => {
                    tracing::error!(operation = %operation, request_id = %request_id, "a handler panicked");
                    to_status(
                        ServiceError::Internal("handler panicked".into()),
                        &request_id,
                    )
                    .into_http()
                }
            };
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            let latency = started.elapsed();
            crate::metrics::global().request(&operation, code_name(code), latency);
            let (Some(log), Some(slot)) = (log, slot) else {
                return resp;
            };
            let mut details = Details {
                request_id: request_id.clone(),
                auth_method: if presented { "bearer" } else { "none" }.to_string(),
                client,
                latency_us: latency.as_micros().min(u128::from(u64::MAX)) as u64,
                ..Details::default()
            };
            slot.fill(&mut details);
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
                // Verification returns no key material and is how an operator learns
                // why the log cannot be written: it answers anyway (its record waits
                // in the writer for the store to recover).
                Err(_) if diagnostic => resp,
                Err(_) => {
                    // The response (and any key material in its body) is dropped unsent.
                    drop(resp);
                    to_status(ServiceError::AuditUnavailable, &request_id).into_http()
                }
            }
        });
        Box::pin(async move {
            Ok(task.await.unwrap_or_else(|_| {
                // The task panicked: nothing of the handler's answer leaves.
                to_status(ServiceError::AuditUnavailable, "").into_http()
            }))
        })
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

/// What a handler tells the audit record (a no-op when the server runs without audit).
pub(super) struct Note(Option<AuditSlot>);

impl Note {
    /// The slot of `req`.
    pub(super) fn of<T>(req: &tonic::Request<T>) -> Note {
        Note(req.extensions().get::<AuditSlot>().cloned())
    }

    /// The key (and version) the call is about.
    pub(super) fn key(&self, name: &str, version: Option<u32>) {
        if let Some(s) = &self.0 {
            s.key(name, version);
        }
    }

    /// The encryption context: only its keyed digest is recorded.
    pub(super) fn context(&self, ctx: &std::collections::HashMap<String, String>) {
        if let Some(s) = &self.0 {
            if s.can_digest() {
                let c: crate::keys::EncryptionContext =
                    ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                if let Ok(bytes) = crate::keys::canonical_context(&c) {
                    let bytes = zeroize::Zeroizing::new(bytes);
                    s.context(&bytes);
                }
            }
        }
    }
}

/// `arca.v1.AuditService`.
pub struct AuditApi {
    svc: Arc<KeyService>,
}

impl AuditApi {
    /// Wraps the service.
    pub fn new(svc: Arc<KeyService>) -> Self {
        AuditApi { svc }
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn query_audit(
        &self,
        req: tonic::Request<pb::QueryAuditRequest>,
    ) -> Result<tonic::Response<pb::QueryAuditResponse>, tonic::Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let fail = |e: ServiceError| to_status(e, &c.request_id);
        let some = |s: String| (!s.is_empty()).then_some(s);
        let result = match r.result.as_str() {
            "" => None,
            name => Some(
                code_of_name(name)
                    .ok_or_else(|| fail(ServiceError::InvalidArgument("unknown result code")))?,
            ),
        };
        let from = match r.page_token.as_str() {
            "" => 1,
            t => t
                .parse::<u64>()
                .map_err(|_| fail(ServiceError::InvalidArgument("invalid page token")))?,
        };
        let filter = Filter {
            principal: some(r.principal),
            key: some(r.key_name),
            operation: some(r.operation),
            since_ms: (r.since_ms != 0).then_some(r.since_ms),
            until_ms: (r.until_ms != 0).then_some(r.until_ms),
            result,
        };
        let size = match r.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let (records, next) = self
            .svc
            .query_audit(&c, &filter, from, size)
            .await
            .map_err(fail)?;
        Ok(tonic::Response::new(pb::QueryAuditResponse {
            records: records
                .into_iter()
                .map(|r| pb::AuditRecord {
                    seq: r.seq,
                    time: r.time,
                    kind: r.kind.as_str().to_string(),
                    operation: r.operation,
                    result: r.result,
                    node: r.details.node,
                    request_id: r.details.request_id,
                    principal: r.details.principal,
                    auth_method: r.details.auth_method,
                    key_name: r.details.key_name.unwrap_or_default(),
                    key_version: r.details.key_version.unwrap_or_default(),
                    client: r.details.client,
                    context_digest: r.details.context_digest.unwrap_or_default(),
                    latency_us: r.details.latency_us,
                    detail: r.details.detail.unwrap_or_default(),
                })
                .collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn verify_audit(
        &self,
        req: tonic::Request<pb::VerifyAuditRequest>,
    ) -> Result<tonic::Response<pb::VerifyAuditResponse>, tonic::Status> {
        let c = caller(&req)?;
        let r = self
            .svc
            .verify_audit(&c, req.get_ref().from_seq)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(tonic::Response::new(pb::VerifyAuditResponse {
            ok: r.ok,
            records: r.records,
            last_seq: r.last_seq,
            first_bad_seq: r.first_bad_seq.unwrap_or_default(),
            problem: r
                .problem
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
            detail: r.detail,
            seals_checked: r.seals_checked,
            seal_macs_checked: r.seal_macs_checked,
            unsealed_tail: r.unsealed_tail,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::audit::tests::{records_of, world};

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
        let w = world(false).await;
        let mut svc = Audited::new(Panics, Some(Arc::clone(&w.log)));
        let mut req = Request::builder()
            .uri("/arca.v1.KeyService/UnwrapKey")
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(RequestId("req-panic".into()));
        let resp = svc.call(req).await.unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(status.as_deref(), Some("13"), "answered INTERNAL");
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
