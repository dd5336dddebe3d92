//! A tower layer that gives every request an id: taken from a well-formed incoming
//! `x-request-id` or made fresh, put in the request extensions for the handlers, and
//! returned as the `x-request-id` response header on every response (errors included).

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// Header name.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request, in the request extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Makes ids: a per-process random prefix and a counter (unique, cheap, not guessable
/// across restarts).
#[derive(Clone, Debug)]
pub struct RequestIdLayer {
    prefix: std::sync::Arc<str>,
    counter: std::sync::Arc<AtomicU64>,
}

impl RequestIdLayer {
    /// A layer whose ids start with `prefix` (e.g. hex of 6 random bytes).
    pub fn new(prefix: String) -> Self {
        RequestIdLayer {
            prefix: prefix.into(),
            counter: std::sync::Arc::new(AtomicU64::new(1)),
        }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`RequestIdLayer`].
#[derive(Clone, Debug)]
pub struct RequestIdService<S> {
    inner: S,
    layer: RequestIdLayer,
}

fn acceptable(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| s.to_string())
}

impl<S, B, RB> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(acceptable)
            .unwrap_or_else(|| {
                let n = self.layer.counter.fetch_add(1, Ordering::Relaxed);
                format!("{}-{n:x}", self.layer.prefix)
            });
        req.extensions_mut().insert(RequestId(id.clone()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if let Ok(v) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(REQUEST_ID_HEADER, v);
            }
            Ok(resp)
        })
    }
}
