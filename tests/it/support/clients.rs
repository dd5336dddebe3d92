//! gRPC clients of a test server: the one [`Auth`] interceptor (`authorization` and, for
//! MFA, `x-arca-totp` on every request), a client type per service carrying it, the
//! [`TestArca`] methods that connect them, and the plain calls tests make on the way to
//! what they check (each panics on failure, with the status, unless it returns it).
//!
//! A token given where an [`Auth`] is expected is sent as `Bearer TOKEN`. Imports only
//! [`super::server::TestArca`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::grpc::pb::access_service_client::AccessServiceClient;
use arca::grpc::pb::audit_service_client::AuditServiceClient;
use arca::grpc::pb::key_service_client::KeyServiceClient;
use arca::grpc::pb::quorum_service_client::QuorumServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::server::TestArca;

/// Headers added to every request of a client: `authorization` (or none) and,
/// optionally, `x-arca-totp`.
#[derive(Clone, Default)]
pub struct Auth(Vec<(&'static str, MetadataValue<Ascii>)>);

impl Auth {
    /// No headers at all.
    pub fn none() -> Auth {
        Auth::default()
    }

    /// `authorization: Bearer TOKEN`.
    pub fn bearer(token: &str) -> Auth {
        Auth::header(Some(&format!("Bearer {token}")))
    }

    /// `authorization: VALUE` exactly as given (any scheme, or malformed), or no such
    /// header for `None`.
    pub fn header(value: Option<&str>) -> Auth {
        let mut auth = Auth::none();
        if let Some(v) = value {
            auth.0
                .push(("authorization", v.parse().expect("header value")));
        }
        auth
    }

    /// Adds `x-arca-totp: CODE` (a TOTP code, for roles that need MFA).
    pub fn totp(mut self, code: &str) -> Auth {
        self.0
            .push(("x-arca-totp", code.parse().expect("header value")));
        self
    }
}

impl From<&str> for Auth {
    /// A bearer token.
    fn from(token: &str) -> Auth {
        Auth::bearer(token)
    }
}

impl From<&String> for Auth {
    /// A bearer token.
    fn from(token: &String) -> Auth {
        Auth::bearer(token)
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        for (k, v) in &self.0 {
            req.metadata_mut().insert(*k, v.clone());
        }
        Ok(req)
    }
}

/// A `KeyService` client with [`Auth`].
pub type KeyClient = KeyServiceClient<InterceptedService<Channel, Auth>>;
/// A `QuorumService` client with [`Auth`].
pub type QuorumClient = QuorumServiceClient<InterceptedService<Channel, Auth>>;
/// An `AccessService` client with [`Auth`].
pub type AccessClient = AccessServiceClient<InterceptedService<Channel, Auth>>;
/// An `AuditService` client with [`Auth`].
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, Auth>>;

impl TestArca {
    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .expect("connect to arca")
    }

    /// A `KeyService` client carrying the dev token.
    pub async fn client(&self) -> KeyClient {
        self.keys(self.token()).await
    }

    /// A `KeyService` client sending `authorization: <header>`, or no such header for
    /// `None`.
    pub async fn client_with_header(&self, header: Option<&str>) -> KeyClient {
        self.keys(Auth::header(header)).await
    }

    /// A `KeyService` client on a new connection with `auth` (or a bearer token).
    pub async fn keys(&self, auth: impl Into<Auth>) -> KeyClient {
        KeyServiceClient::with_interceptor(self.channel().await, auth.into())
    }

    /// A `QuorumService` client on a new connection with `auth` (or a bearer token).
    pub async fn quorum(&self, auth: impl Into<Auth>) -> QuorumClient {
        QuorumServiceClient::with_interceptor(self.channel().await, auth.into())
    }

    /// An `AccessService` client on a new connection with `auth` (or a bearer token).
    pub async fn access(&self, auth: impl Into<Auth>) -> AccessClient {
        AccessServiceClient::with_interceptor(self.channel().await, auth.into())
    }

    /// An `AuditService` client on a new connection with `auth` (or a bearer token).
    pub async fn audit(&self, auth: impl Into<Auth>) -> AuditClient {
        AuditServiceClient::with_interceptor(self.channel().await, auth.into())
    }

    /// Key `name` as the dev admin sees it; panics on failure.
    pub async fn key(&self, name: &str) -> pb::Key {
        get_key(&mut self.client().await, name).await
    }

    /// A health client (no credentials).
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }
}

/// Asserts the status code, with the status in the failure message.
#[track_caller]
pub fn assert_code<T>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(_) => panic!("{what}: expected {code:?}, got OK"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

/// The stable reason of a typed refusal (`x-arca-reason`), if the status carries one.
pub fn reason(s: &Status) -> Option<&str> {
    s.metadata()
        .get("x-arca-reason")
        .and_then(|v| v.to_str().ok())
}

/// A token for `principal` (narrowed to `roles` when any), minted by the dev admin.
pub async fn mint_token(arca: &TestArca, principal: &str, roles: &[&str]) -> String {
    arca.access(arca.token())
        .await
        .create_token(pb::CreateTokenRequest {
            principal: principal.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateToken {principal}: {s:?}"))
        .into_inner()
        .token
}

/// Creates a key; panics on failure.
pub async fn create_key(c: &mut KeyClient, name: &str) -> pb::Key {
    c.create_key(pb::CreateKeyRequest {
        name: name.to_string(),
        description: String::new(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|s| panic!("CreateKey {name}: {s:?}"))
    .into_inner()
}

/// A key as `c` sees it; panics on failure.
pub async fn get_key(c: &mut KeyClient, name: &str) -> pb::Key {
    c.get_key(pb::GetKeyRequest {
        name: name.to_string(),
    })
    .await
    .unwrap_or_else(|s| panic!("GetKey {name}: {s:?}"))
    .into_inner()
}

/// The state of version `version` of `key`; panics when the key has no such version.
pub fn version_state(key: &pb::Key, version: u32) -> pb::KeyVersionState {
    key.versions
        .iter()
        .find(|v| v.version == version)
        .unwrap_or_else(|| panic!("no version {version} in {key:?}"))
        .state()
}

/// Generates a data key with its plaintext; panics on failure.
pub async fn generate(
    c: &mut KeyClient,
    name: &str,
    context: &HashMap<String, String>,
) -> pb::GenerateDataKeyResponse {
    c.generate_data_key(pb::GenerateDataKeyRequest {
        key_name: name.to_string(),
        context: context.clone(),
        without_plaintext: false,
    })
    .await
    .unwrap_or_else(|s| panic!("GenerateDataKey {name}: {s:?}"))
    .into_inner()
}

/// Generates a data key without its plaintext; its wrapped key. Panics on failure.
pub async fn generate_wrapped(
    c: &mut KeyClient,
    name: &str,
    context: &HashMap<String, String>,
) -> Vec<u8> {
    c.generate_data_key(pb::GenerateDataKeyRequest {
        key_name: name.to_string(),
        context: context.clone(),
        without_plaintext: true,
    })
    .await
    .unwrap_or_else(|s| panic!("GenerateDataKey {name} (without plaintext): {s:?}"))
    .into_inner()
    .wrapped_key
}

/// Unwraps a wrapped key.
pub async fn unwrap(
    c: &mut KeyClient,
    wrapped: &[u8],
    context: &HashMap<String, String>,
) -> Result<pb::UnwrapKeyResponse, Status> {
    c.unwrap_key(pb::UnwrapKeyRequest {
        wrapped_key: wrapped.to_vec(),
        context: context.clone(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Rotates a key; panics on failure; returns the key as it is after rotation.
pub async fn rotate(c: &mut KeyClient, name: &str) -> pb::Key {
    c.rotate_key(pb::RotateKeyRequest {
        name: name.to_string(),
    })
    .await
    .unwrap_or_else(|s| panic!("RotateKey {name}: {s:?}"))
    .into_inner()
    .key
    .expect("RotateKey answered an approval request instead of the key")
}

/// The health status of `service` ("" for the server as a whole).
pub async fn health_status(
    h: &mut HealthClient<Channel>,
    service: &str,
) -> Result<ServingStatus, Status> {
    h.check(HealthCheckRequest {
        service: service.to_string(),
    })
    .await
    .map(|r| r.into_inner().status())
}

/// Polls health until it reports `want`; returns how long that took, or `None` after
/// `within`.
pub async fn wait_health(
    h: &mut HealthClient<Channel>,
    want: ServingStatus,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(s) = tokio::time::timeout(Duration::from_secs(1), health_status(h, "")).await {
            if s.ok() == Some(want) {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}
