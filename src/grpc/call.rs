//! What the edge knows of one call, and the one way a handler answers.
//!
//! - [`accept`]: the authenticated [`Caller`] (put in the request by the authentication
//!   layer) and the decoded message.
//! - [`reply`]: a use case's [`Outcome`] → the gRPC answer: the message on success, the
//!   one [`to_status`] mapping on failure; the call's audit [`Facts`] ride along in both
//!   cases (response extensions, or the `Status`'s source), for the audit layer.
//! - [`Identified`]: who the authentication layer found, on the response, for the audit
//!   layer.
//! - [`RefusedCertificate`]: a client certificate the authentication layer refused, on the
//!   response, for the audit layer.
//! - Request parsing shared by the layers: [`peer_of`], [`peer_chain`], [`bearer`],
//!   [`totp_header`], [`is_public`].
//!
//! Invariant: no fact travels beside a call but in its request or response values.

use std::sync::Arc;

use http::Request;
use rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Response, Status};

use super::request_id::RequestId;
use super::status::to_status;
use crate::authz::{Peer, TotpCode};
use crate::secret::BearerToken;
use crate::service::{Caller, Facts, Outcome, ServiceError};

/// Header carrying a TOTP code for roles that require MFA.
pub const TOTP_HEADER: &str = "x-arca-totp";

/// Paths answered without authentication or audit: health (load balancers probe it
/// without credentials, often).
pub fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Who the authentication layer found, as the response carries it to the audit layer.
#[derive(Clone, Debug)]
pub struct Identified {
    /// The principal's name.
    pub principal: String,
    /// How it authenticated (a token by its public id, never the token).
    pub method: String,
}

/// A client certificate the authentication layer refused, on the response, for the audit
/// layer: the principal it names and why it was refused.
#[derive(Clone, Debug)]
pub struct RefusedCertificate {
    /// The principal the certificate names (empty if none).
    pub principal: String,
    /// The stable reason (`CERT_REVOKED`, ...).
    pub reason: &'static str,
}

/// The facts of a failed call, as the `Status`'s source.
#[derive(Debug)]
pub struct FailedCallFacts(pub Facts);

impl std::fmt::Display for FailedCallFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("audit facts of a failed call")
    }
}

impl std::error::Error for FailedCallFacts {}

/// The request id of a request (empty if the request-id layer did not run).
pub fn request_id<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

/// The caller and the message of an authenticated request. A request that reached a
/// handler without a caller is refused like any unauthenticated call.
pub fn accept<T>(req: tonic::Request<T>) -> Result<(Caller, T), Status> {
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        let id = req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let mut s = to_status(ServiceError::Unauthenticated, &id);
        s.set_source(Arc::new(FailedCallFacts(Facts::default())));
        return Err(s);
    };
    Ok((caller, req.into_inner()))
}

/// The gRPC answer of a use case: `to_pb` of its value, or its error's status; its facts
/// travel with either.
pub fn reply<T, P>(
    caller: &Caller,
    outcome: impl Into<Outcome<T>>,
    to_pb: impl FnOnce(T) -> P,
) -> Result<Response<P>, Status> {
    let Outcome { result, facts } = outcome.into();
    match result {
        Ok(v) => {
            let mut r = Response::new(to_pb(v));
            r.extensions_mut().insert(facts);
            Ok(r)
        }
        Err(e) => {
            let mut s = to_status(e, &caller.request_id);
            s.set_source(Arc::new(FailedCallFacts(facts)));
            Err(s)
        }
    }
}

/// The source address and (under mutual TLS) the verified client certificate.
pub fn peer_of<B>(req: &Request<B>) -> Peer {
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

/// The certificate chain the client presented on the connection (mutual TLS), end entity
/// first.
pub fn peer_chain<B>(req: &Request<B>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|tls| tls.peer_certs())
}

/// The bearer token of a request, if it carries one in the `authorization` header.
pub fn bearer<B>(req: &Request<B>) -> Option<BearerToken> {
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

/// The TOTP code of a request (`x-arca-totp`), if it carries one.
pub fn totp_header<B>(req: &Request<B>) -> Option<TotpCode> {
    let v = req.headers().get(TOTP_HEADER)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| TotpCode::new(v.to_string()))
}
