//! The gRPC transport: generated code (from `proto/`, built into `OUT_DIR`), the service
//! implementations, the one error → `Status` mapping ([`status::to_status`]), request ids,
//! authentication, health and reflection.
//!
//! Invariants:
//! - Every response carries `x-request-id`.
//! - Every RPC except `grpc.health.v1.Health` passes authentication first.
//! - Messages that carry key material have a `Debug` that prints no bytes of it.
//! - Health reports NOT_SERVING while the HSM or the database does not answer, or the
//!   audit writer fails.
//! - Every authenticated call is wrapped by [`audit::Audited`] (outside authentication):
//!   one audit record per call, durable before the response leaves.
//!
//! Must not import: sqlx, cryptoki.

pub mod access;
pub mod audit;
pub mod auth;
pub mod keys;
pub mod quorum;
pub mod request_id;
pub mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::Connected;
use tonic::transport::Server;

use crate::service::KeyService;

/// Generated protobuf and gRPC code for `arca.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod pb {
    tonic::include_proto!("arca.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("arca_descriptor");

    macro_rules! redacted_debug {
        ($t:ty, $($field:ident),*) => {
            impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.debug_struct(stringify!($t))
                        .field("plaintext", &"[REDACTED]")
                        $(.field(stringify!($field), &self.$field))*
                        .finish()
                }
            }
        };
    }
    redacted_debug!(GenerateDataKeyResponse, key_name, key_version);
    redacted_debug!(WrapKeyRequest, key_name);
    redacted_debug!(UnwrapKeyResponse, key_name, key_version);

    impl std::fmt::Debug for InitRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("InitRequest")
                .field("threshold", &self.threshold)
                .field("custodians", &self.custodians)
                .field("so_pin", &"[REDACTED]")
                .field("age_recipients", &self.age_recipients)
                .finish()
        }
    }
    impl std::fmt::Debug for CustodianKit {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CustodianKit")
                .field("custodian", &self.custodian)
                .field("share", &"[REDACTED]")
                .field("token", &"[REDACTED]")
                .field("totp_uri", &"[REDACTED]")
                .finish()
        }
    }
    impl std::fmt::Debug for CreateTokenResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CreateTokenResponse")
                .field("id", &self.id)
                .field("token", &"[REDACTED]")
                .field("expires_at", &self.expires_at)
                .finish()
        }
    }
    impl std::fmt::Debug for EnrollTotpResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EnrollTotpResponse")
                .field("totp_uri", &"[REDACTED]")
                .finish()
        }
    }
    impl std::fmt::Debug for UnsealRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UnsealRequest")
                .field("share", &"[REDACTED]")
                .field("totp", &"[REDACTED]")
                .finish()
        }
    }
    impl std::fmt::Debug for ApproveRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ApproveRequest")
                .field("id", &self.id)
                .field("digest", &self.digest)
                .field("share", &"[REDACTED]")
                .field("totp", &"[REDACTED]")
                .finish()
        }
    }
}

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 256,
            request_timeout: Duration::from_secs(30),
            health_interval: Duration::from_millis(500),
        }
    }
}

/// Serves the API on `incoming` (plain TCP in dev mode, or TLS connections from
/// [`tls::incoming`]) until `shutdown` completes.
pub async fn serve<I, IO, IE>(
    incoming: I,
    svc: Arc<KeyService>,
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
    let keys = pb::key_service_server::KeyServiceServer::new(keys::KeyApi::new(Arc::clone(&svc)))
        .max_decoding_message_size(opts.max_message_bytes);

    let quorum = pb::quorum_service_server::QuorumServiceServer::new(quorum::QuorumApi::new(
        Arc::clone(&svc),
    ))
    .max_decoding_message_size(opts.max_message_bytes);

    let access = pb::access_service_server::AccessServiceServer::new(access::AccessApi::new(
        Arc::clone(&svc),
    ))
    .max_decoding_message_size(opts.max_message_bytes);

    let audit_api =
        pb::audit_service_server::AuditServiceServer::new(audit::AuditApi::new(Arc::clone(&svc)))
            .max_decoding_message_size(opts.max_message_bytes);
    let log = svc.audit().cloned();

    // The first probe runs before the listener answers, so that health never reports a
    // service as unknown (or serving) before it was checked.
    let first = probe_health(&health, &svc, None).await;
    let probe = tokio::spawn(health_loop(
        health,
        Arc::clone(&svc),
        opts.health_interval,
        first,
    ));

    let result = Server::builder()
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_max_header_list_size(Some(16 * 1024))
        .timeout(opts.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(request_id::RequestIdLayer::new(request_id_prefix))
        .add_service(health_svc)
        .add_service(audit::Audited::new(
            auth::Authenticated::new(keys, Arc::clone(&svc)),
            log.clone(),
        ))
        .add_service(audit::Audited::new(
            auth::Authenticated::new(quorum, Arc::clone(&svc)),
            log.clone(),
        ))
        .add_service(audit::Audited::new(
            auth::Authenticated::new(access, Arc::clone(&svc)),
            log.clone(),
        ))
        .add_service(audit::Audited::new(
            auth::Authenticated::new(audit_api, Arc::clone(&svc)),
            log.clone(),
        ))
        .add_service(audit::Audited::new(
            auth::Authenticated::new(reflection, Arc::clone(&svc)),
            log,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    probe.abort();
    result.map_err(Into::into)
}

/// Keeps the health status in step with the HSM and the database.
async fn health_loop(
    health: tonic_health::server::HealthReporter,
    svc: Arc<KeyService>,
    interval: Duration,
    mut last: bool,
) {
    loop {
        tokio::time::sleep(interval).await;
        last = probe_health(&health, &svc, Some(last)).await;
    }
}

/// Checks the HSM, the database and the audit writer once and publishes the result if it changed from
/// `last`; returns it.
async fn probe_health(
    health: &tonic_health::server::HealthReporter,
    svc: &KeyService,
    last: Option<bool>,
) -> bool {
    use tonic_health::ServingStatus;
    const KEY_SERVICE: &str = "arca.v1.KeyService";
    // Sealed counts as not serving: key operations would all fail.
    let hsm_ok = match svc.engine() {
        Ok(engine) => engine.check().await.is_ok(),
        Err(_) => false,
    };
    let db_ok = svc.store().ping().await.is_ok();
    // A failing audit writer fails every call closed: not serving.
    let audit_ok = svc.audit().is_none_or(|a| a.is_healthy());
    let ok = hsm_ok && db_ok && audit_ok;
    if last != Some(ok) {
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(KEY_SERVICE, status).await;
        if ok {
            tracing::info!("serving");
        } else {
            tracing::error!(
                hsm_ok,
                db_ok,
                audit_ok,
                "not serving: a dependency is unavailable"
            );
        }
    }
    ok
}
