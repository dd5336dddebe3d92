//! The one path of every client command: connect with the shared options (address,
//! CA, client certificate and key, bearer token, TOTP code), send one request carrying
//! the credentials as metadata, turn a refusal into a [`CliError`], and render the
//! answer as text or JSON. A command states only its request and how its answer prints:
//!
//! ```text
//! call(&opts, pb::GetKeyRequest { name }, async |c, r| c.keys.get_key(r).await,
//!      |out, key| print_key(out, &key)).await
//! ```
//!
//! Commands that read input only after connecting (`wrap` reads stdin), or that page
//! through answers (`audit query`), hold a [`Session`] and use [`Session::send`].
//!
//! Invariant: credentials are read once per command and sent on every call of it.
//! Must not import the store, the HSM or the service: a client knows only the wire.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::args::{ClientOpts, Output};
use super::error::CliError;
use super::input::read_secret;
use crate::grpc::pb::access_service_client::AccessServiceClient;
use crate::grpc::pb::audit_service_client::AuditServiceClient;
use crate::grpc::pb::key_service_client::KeyServiceClient;
use crate::grpc::pb::quorum_service_client::QuorumServiceClient;

/// The four services of one connection; an RPC closure picks one and calls it.
pub(super) struct Clients {
    pub(super) keys: KeyServiceClient<Channel>,
    pub(super) quorum: QuorumServiceClient<Channel>,
    pub(super) access: AccessServiceClient<Channel>,
    pub(super) audit: AuditServiceClient<Channel>,
}

/// A connection with the caller's credentials and chosen output format.
pub(super) struct Session {
    clients: Clients,
    auth: Option<MetadataValue<Ascii>>,
    totp: Option<MetadataValue<Ascii>>,
    output: Output,
}

/// What a rendering returns: nothing, or a failure to report after printing (a bad
/// audit chain, a kit that could not be written).
pub(super) trait Outcome {
    fn into_result(self) -> Result<(), CliError>;
}

impl Outcome for () {
    fn into_result(self) -> Result<(), CliError> {
        Ok(())
    }
}

impl Outcome for Result<(), CliError> {
    fn into_result(self) -> Result<(), CliError> {
        self
    }
}

/// Connects, sends `msg` through `rpc`, and renders the answer with `render`.
pub(super) async fn call<Req, Resp, O: Outcome>(
    opts: &ClientOpts,
    msg: Req,
    rpc: impl AsyncFnOnce(&mut Clients, Request<Req>) -> Result<Response<Resp>, Status>,
    render: impl FnOnce(Output, Resp) -> O,
) -> Result<(), CliError> {
    Session::connect(opts).await?.call(msg, rpc, render).await
}

impl Session {
    /// Opens the connection (TLS for https:// addresses) and reads the credentials: the
    /// bearer token, and a TOTP code from ARCA_TOTP or, with `--mfa`, a prompt.
    pub(super) async fn connect(opts: &ClientOpts) -> Result<Self, CliError> {
        let addr = if opts.addr.contains("://") {
            opts.addr.clone()
        } else {
            format!("http://{}", opts.addr)
        };
        let mut endpoint =
            Endpoint::from_shared(addr.clone())?.connect_timeout(std::time::Duration::from_secs(5));
        if addr.starts_with("https://") {
            endpoint = endpoint.tls_config(tls_config(opts)?)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| CliError::Connect {
                addr: opts.addr.clone(),
                source,
            })?;
        let auth = match &opts.token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| CliError::NotAHeader("token"))?,
            ),
            None => None,
        };
        let code = match std::env::var("ARCA_TOTP") {
            Ok(v) if !v.trim().is_empty() => Some(Zeroizing::new(v.trim().to_string())),
            _ if opts.mfa => Some(read_secret(None, "TOTP code")?),
            _ => None,
        };
        let totp = match code {
            Some(c) => Some(c.parse().map_err(|_| CliError::NotAHeader("TOTP code"))?),
            None => None,
        };
        Ok(Session {
            clients: Clients {
                keys: KeyServiceClient::new(channel.clone()),
                quorum: QuorumServiceClient::new(channel.clone()),
                audit: AuditServiceClient::new(channel.clone()),
                access: AccessServiceClient::new(channel),
            },
            auth,
            totp,
            output: opts.output,
        })
    }

    /// The output format the command asked for.
    pub(super) fn output(&self) -> Output {
        self.output
    }

    /// Sends `msg` with the credentials through `rpc`; a refusal becomes a [`CliError`].
    pub(super) async fn send<Req, Resp>(
        &mut self,
        msg: Req,
        rpc: impl AsyncFnOnce(&mut Clients, Request<Req>) -> Result<Response<Resp>, Status>,
    ) -> Result<Resp, CliError> {
        let mut request = Request::new(msg);
        if let Some(a) = &self.auth {
            request.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(t) = &self.totp {
            request.metadata_mut().insert("x-arca-totp", t.clone());
        }
        Ok(rpc(&mut self.clients, request).await?.into_inner())
    }

    /// [`Session::send`], then `render` of the answer.
    pub(super) async fn call<Req, Resp, O: Outcome>(
        mut self,
        msg: Req,
        rpc: impl AsyncFnOnce(&mut Clients, Request<Req>) -> Result<Response<Resp>, Status>,
        render: impl FnOnce(Output, Resp) -> O,
    ) -> Result<(), CliError> {
        let answer = self.send(msg, rpc).await?;
        render(self.output, answer).into_result()
    }
}

/// The CA to trust and the client identity for mutual TLS, as the options name them.
fn tls_config(opts: &ClientOpts) -> Result<ClientTlsConfig, CliError> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|source| CliError::Read {
            what: format!("{what} {}", path.display()),
            source,
        })
    };
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &opts.cacert {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "the CA certificate")?));
    }
    if let (Some(cert), Some(key)) = (&opts.client_cert, &opts.client_key) {
        let cert_pem = read(cert, "the client certificate")?;
        let key_pem = Zeroizing::new(read(key, "the client key")?);
        tls = tls.identity(Identity::from_pem(cert_pem, key_pem.as_slice()));
    }
    Ok(tls)
}
