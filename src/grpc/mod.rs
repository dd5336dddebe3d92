//! The gRPC edge: generated code ([`pb`]), proto ↔ domain conversion ([`convert`]), the
//! service implementations ([`keys`], [`quorum`], [`access`], [`audit`]), the one error →
//! `Status` mapping ([`status::to_status`]), and the layers applied once to the whole API:
//! request ids ([`request_id`]), the audit record ([`audited`]) and authentication
//! ([`authn`]), and the transport's own refusals in Arca's words ([`sanitize`]), written on
//! one piece of tower plumbing ([`around`]). Health, reflection
//! and the TLS listener ([`tls`]) complete it; [`client_cert`] is the client-certificate
//! check both the TLS handshake and authentication run.
//!
//! Invariants:
//! - Every response carries `x-request-id`.
//! - Every RPC except `grpc.health.v1.Health` passes authentication first, and writes one
//!   audit record, durable before the response leaves (the audit layer is outside
//!   authentication, so refused calls are recorded too).
//! - A handler converts, calls one use case, and answers through [`call::reply`]: no
//!   decision is made here, and the audit facts come back in the use case's answer.
//! - Messages that carry key material have a `Debug` that prints no bytes of it.
//!
//! Files import downwards only: `client_cert` ← `tls`, `status`; `pb`, `request_id`,
//! `around`, `status` ← `call` ←
//! `convert`, `authn`, `audited`, `sanitize`, `health` ← `keys`, `quorum`, `access`, `audit` ← this.
//!
//! Must not import: sqlx, cryptoki, arca_hsm.

pub mod access;
pub mod around;
pub mod audit;
pub mod audited;
pub mod authn;
pub mod call;
pub mod client_cert;
pub mod convert;
pub mod health;
pub mod keys;
pub mod pb;
pub mod quorum;
pub mod request_id;
pub mod sanitize;
pub mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::Connected;
use tonic::transport::Server;

use crate::service::Services;
use around::HookLayer;

/// Limits applied to every connection.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Largest accepted request message.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// How often the HSM and database are probed for health.
    pub health_interval: Duration,
    /// How long a connection lives before the server closes it (gracefully), after which
    /// the client makes a new handshake. (Client certificates are also checked on every
    /// request: see [`client_cert`].)
    pub max_connection_age: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 256,
            request_timeout: Duration::from_secs(30),
            health_interval: Duration::from_millis(500),
            max_connection_age: Duration::from_secs(600),
        }
    }
}

/// Serves the API on `incoming` (plain TCP in dev mode, or TLS connections from
/// [`tls::incoming`]) until `shutdown` completes. Under mutual TLS, `certs` is the
/// client-certificate check run again on every request.
pub async fn serve<I, IO, IE>(
    incoming: I,
    svc: &Services,
    certs: Option<Arc<client_cert::ClientCheck>>,
    opts: ServeOptions,
    request_id_prefix: String,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: futures_core::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (health, health_svc) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let max = opts.max_message_bytes;
    let keys = pb::key_service_server::KeyServiceServer::new(keys::KeyApi::new(
        Arc::clone(&svc.keys),
        Arc::clone(&svc.rotation),
        Arc::clone(&svc.lifecycle),
    ))
    .max_decoding_message_size(max);
    let quorum = pb::quorum_service_server::QuorumServiceServer::new(quorum::QuorumApi::new(
        Arc::clone(&svc.sealing),
        Arc::clone(&svc.ceremony),
        Arc::clone(&svc.approvals),
    ))
    .max_decoding_message_size(max);
    let access = pb::access_service_server::AccessServiceServer::new(access::AccessApi::new(
        Arc::clone(&svc.tokens),
        Arc::clone(&svc.grants),
        Arc::clone(&svc.policies),
        Arc::clone(&svc.totp),
    ))
    .max_decoding_message_size(max);
    let audit_api = pb::audit_service_server::AuditServiceServer::new(audit::AuditApi::new(
        Arc::clone(&svc.audit),
    ))
    .max_decoding_message_size(max);

    // The first probe runs before the listener answers, so that health never reports a
    // service as unknown (or serving) before it was checked.
    let first = health::probe(&health, &svc.ctx, None).await;
    let probe = tokio::spawn(health::run(
        health,
        Arc::clone(&svc.ctx),
        opts.health_interval,
        first,
    ));

    let result = Server::builder()
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_max_header_list_size(Some(16 * 1024))
        .timeout(opts.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // No `max_connection_age_grace`: tonic 0.14 then waits age + grace and closes
        // forcefully, skipping the graceful close at `age`. Without it the connection is
        // told to go away at `age` and ends when its calls (bounded by the request
        // timeout) finish.
        .max_connection_age(opts.max_connection_age)
        // Outermost first: every response gets its request id; every call but health is
        // recorded (refusals included), then authenticated.
        .layer(request_id::RequestIdLayer::new(request_id_prefix))
        .layer(HookLayer(audited::Audited::new(svc.ctx.audit().cloned())))
        .layer(HookLayer(authn::Authn::new(Arc::clone(&svc.guard), certs)))
        // Innermost: the transport's own refusals (undecodable or oversized messages) in
        // Arca's words.
        .layer(HookLayer(sanitize::Sanitize))
        .add_service(health_svc)
        .add_service(keys)
        .add_service(quorum)
        .add_service(access)
        .add_service(audit_api)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    probe.abort();
    result.map_err(Into::into)
}
