//! The tower plumbing every cross-cutting layer of the API shares, written once: a
//! [`Hook`] says what happens around one call; [`HookLayer`] applies it to a service and
//! [`Hooked`] is the result, so each layer states only its own logic.
//!
//! Invariant: the inner service instance that was polled ready is the one that takes the
//! call (the clone/swap below), as tower requires.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tonic::server::NamedService;
use tower_layer::Layer;
use tower_service::Service;

/// A boxed response future (never an error: failures are gRPC statuses in the response).
pub type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// The inner service a hook wraps.
pub trait Inner:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Send + 'static
{
}

impl<S> Inner for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
        + Send
        + 'static
{
}

/// What a layer does around one call: it owns the call from request to response.
pub trait Hook: Clone + Send + 'static {
    /// Handles `req`, calling `inner` (or not).
    fn call<S: Inner>(&self, inner: S, req: Request<Body>) -> BoxResponse;
}

/// Applies a [`Hook`] to a service.
#[derive(Clone, Debug)]
pub struct HookLayer<H>(pub H);

impl<H: Clone, S> Layer<S> for HookLayer<H> {
    type Service = Hooked<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Hooked {
            inner,
            hook: self.0.clone(),
        }
    }
}

/// A service with a [`Hook`] around it.
#[derive(Clone, Debug)]
pub struct Hooked<S, H> {
    inner: S,
    hook: H,
}

impl<S: NamedService, H> NamedService for Hooked<S, H> {
    const NAME: &'static str = S::NAME;
}

impl<S, H> Service<Request<Body>> for Hooked<S, H>
where
    S: Inner + Clone,
    H: Hook,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone/swap keeps the instance that was polled ready for this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        self.hook.call(inner, req)
    }
}

/// Calls `inner` with `req` (an `Infallible` service always answers).
pub async fn call_inner<S: Inner>(mut inner: S, req: Request<Body>) -> Response<Body> {
    match inner.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
