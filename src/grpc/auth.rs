//! Authentication in front of every authenticated gRPC service: one tower wrapper that
//! turns the `authorization: Bearer …` header into a [`Caller`] in the request
//! extensions (with the `x-arca-totp` code, if any, for roles that need MFA), or answers
//! `UNAUTHENTICATED` before the handler runs. Health is not
//! wrapped (load balancers probe it without credentials).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower_service::Service;

use super::request_id::RequestId;
use super::status::to_status;
use crate::authz::{Peer, TotpCode};
use crate::secret::BearerToken;
use crate::service::{Caller, KeyService};

/// Wraps an inner gRPC service with authentication.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    svc: Arc<KeyService>,
}

impl<S> Authenticated<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, svc: Arc<KeyService>) -> Self {
        Authenticated { inner, svc }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

/// The source address and (under mutual TLS) the verified client certificate.
pub(super) fn peer_of<B>(req: &Request<B>) -> Peer {
    if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        Peer {
            ip: tls.get_ref().remote_addr().map(|a| a.ip()),
            cert: tls
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| Arc::<[u8]>::from(c.as_ref()))),
        }
    } else {
        Peer {
            ip: req
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(|t| t.remote_addr())
                .map(|a| a.ip()),
            cert: None,
        }
    }
}

/// The bearer token of a request, if it carries one in the `authorization` header.
fn bearer<B>(req: &Request<B>) -> Option<BearerToken> {
    let v = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| BearerToken::new(token.trim().to_string()))
}

/// Header carrying a TOTP code for roles that require MFA.
pub const TOTP_HEADER: &str = "x-arca-totp";

/// The TOTP code of a request (`x-arca-totp`), if it carries one.
fn totp_header<B>(req: &Request<B>) -> Option<TotpCode> {
    let v = req.headers().get(TOTP_HEADER)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| TotpCode::new(v.to_string()))
}

impl<S> Service<Request<Body>> for Authenticated<S>
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
        // The clone/swap keeps the instance that was polled ready for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let svc = Arc::clone(&self.svc);
        Box::pin(async move {
            let request_id = req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let token = bearer(&req);
            let peer = peer_of(&req);
            match svc.authenticate(token, &peer).await {
                Ok(principal) => {
                    if let Some(slot) = req.extensions().get::<crate::audit::AuditSlot>() {
                        slot.principal(&principal.name, &super::audit::method_label(&principal));
                    }
                    let mfa = totp_header(&req);
                    req.extensions_mut().insert(Caller {
                        principal,
                        request_id,
                        peer,
                        mfa,
                    });
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::info!(
                        request_id,
                        path = req.uri().path(),
                        "unauthenticated request refused"
                    );
                    Ok(to_status(e, &request_id).into_http())
                }
            }
        })
    }
}
