//! Authentication in front of every non-public RPC: a [`Hook`] that turns the
//! `authorization: Bearer …` header (or, without one, the verified client certificate)
//! into a [`Caller`] in the request extensions, with the `x-arca-totp` code for roles that
//! need MFA, or answers `UNAUTHENTICATED` before the handler runs. Health is public
//! ([`is_public`]).
//!
//! Invariant: every authentication failure is the same `UNAUTHENTICATED`; the principal
//! found is returned on the response ([`Identified`]) for the audit record.

use std::sync::Arc;

use http::Request;
use tonic::body::Body;

use super::around::{call_inner, BoxResponse, Hook, Inner};
use super::call::{bearer, is_public, peer_of, request_id, totp_header, Identified};
use super::status::to_status;
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
}

impl Authn {
    /// Authenticates through `guard`.
    pub fn new(guard: Arc<Guard>) -> Self {
        Authn { guard }
    }
}

impl Hook for Authn {
    fn call<S: Inner>(&self, inner: S, mut req: Request<Body>) -> BoxResponse {
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            if is_public(req.uri().path()) {
                return Ok(call_inner(inner, req).await);
            }
            let request_id = request_id(&req);
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
