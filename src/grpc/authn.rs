//! Authentication in front of every non-public RPC: a [`Hook`] that turns the
//! `authorization: Bearer …` header (or, without one, the verified client certificate)
//! into a [`Caller`] in the request extensions, with the `x-arca-totp` code for roles that
//! need MFA, or answers `UNAUTHENTICATED` before the handler runs. Health is public
//! ([`is_public`]).
//!
//! Under mutual TLS the connection's client certificate is checked first, on every
//! request, against the CRL in force and the time now ([`ClientCheck`]): a certificate
//! revoked or expired since the handshake, or a CRL past its nextUpdate, refuses the call
//! whatever token it carries.
//!
//! Invariants: every credential failure is the same `UNAUTHENTICATED`; a refused client
//! certificate says why (`x-arca-reason`: `CERT_REVOKED`, `CERT_EXPIRED`, `CRL_EXPIRED`,
//! ...), since its holder can act on it and learns nothing it could not read in the
//! certificate or the CRL. The principal found is returned on the response
//! ([`Identified`], or [`RefusedCertificate`]) for the audit record.

use std::sync::Arc;

use http::Request;
use tonic::body::Body;

use super::around::{call_inner, BoxResponse, Hook, Inner};
use super::call::{
    bearer, is_public, peer_chain, peer_of, request_id, totp_header, Identified, RefusedCertificate,
};
use super::client_cert::{CertRefusal, ClientCheck};
use super::status::{cert_refused, to_status};
use crate::authz::cert::principal_from_der;
use crate::authz::{AuthMethod, Principal};
use crate::service::{Caller, Guard};

/// How a principal authenticated, as recorded (a token by its public id, never the
/// token).
pub fn method_label(p: &Principal) -> String {
    match &p.method {
        AuthMethod::Token { token_id } => format!("token:{token_id}"),
        AuthMethod::Certificate => "certificate".to_string(),
    }
}

/// The authentication hook.
#[derive(Clone)]
pub struct Authn {
    guard: Arc<Guard>,
    certs: Option<Arc<ClientCheck>>,
}

impl Authn {
    /// Authenticates through `guard`, after `certs` (mutual TLS) passes the connection's
    /// client certificate.
    pub fn new(guard: Arc<Guard>, certs: Option<Arc<ClientCheck>>) -> Self {
        Authn { guard, certs }
    }
}

impl Hook for Authn {
    fn call<S: Inner>(&self, inner: S, mut req: Request<Body>) -> BoxResponse {
        let guard = Arc::clone(&self.guard);
        let certs = self.certs.clone();
        Box::pin(async move {
            if is_public(req.uri().path()) {
                return Ok(call_inner(inner, req).await);
            }
            let request_id = request_id(&req);
            if let Some(check) = &certs {
                // Mutual TLS: every connection has a chain; none is refused, not skipped.
                let chain = peer_chain(&req);
                let verdict = match &chain {
                    Some(chain) => check.check(chain),
                    None => Err(CertRefusal::Invalid),
                };
                if let Err(refusal) = verdict {
                    let principal = chain
                        .as_ref()
                        .and_then(|c| c.first())
                        .and_then(|c| principal_from_der(c.as_ref()))
                        .unwrap_or_default();
                    tracing::info!(
                        request_id,
                        path = req.uri().path(),
                        principal,
                        reason = refusal.reason(),
                        "client certificate refused"
                    );
                    let mut resp = cert_refused(refusal).into_http();
                    resp.extensions_mut().insert(RefusedCertificate {
                        principal,
                        reason: refusal.reason(),
                    });
                    return Ok(resp);
                }
            }
            let peer = peer_of(&req);
            match guard.authenticate(bearer(&req), &peer).await {
                Ok(principal) => {
                    let who = Identified {
                        principal: principal.name.clone(),
                        method: method_label(&principal),
                    };
                    let mfa = totp_header(&req);
                    req.extensions_mut().insert(Caller {
                        principal,
                        request_id,
                        peer,
                        mfa,
                    });
                    let mut resp = call_inner(inner, req).await;
                    resp.extensions_mut().insert(who);
                    Ok(resp)
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
