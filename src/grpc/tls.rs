//! TLS for the gRPC listener (rustls, *ring* provider).
//!
//! Invariants:
//! - TLS 1.2 and 1.3 only, and only forward-secret AEAD suites (ECDHE with AES-GCM or
//!   ChaCha20-Poly1305; TLS 1.3's three suites). rustls has no compression and no
//!   renegotiation at all.
//! - With a client CA bundle (required outside dev mode), every client must present a
//!   certificate that chains to it, is within its validity period and, with a CRL, is not
//!   revoked: otherwise the handshake fails and no request is read.
//! - The configuration is rebuilt from the files on [`TlsReloader::reload`] (SIGHUP): a bad
//!   file is refused and the configuration in force stays; established connections keep
//!   the session they negotiated.
//! - Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so a slow or
//!   silent client cannot hold up others.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::ring as ring_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the TLS material lives (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation list(s) for client certificates.
    pub crl: Option<PathBuf>,
}

/// Why TLS material was refused. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{what} {path}: {detail}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

fn file_err(what: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// The provider with the allowed suites only (all of *ring*'s, listed explicitly so a
/// future rustls cannot widen the set silently).
fn provider() -> CryptoProvider {
    use ring_provider::cipher_suite::*;
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..ring_provider::default_provider()
    }
}

/// Builds a server configuration from the files.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err("certificate", &files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err("certificate", &files.cert, e))?;
    if certs.is_empty() {
        return Err(file_err(
            "certificate",
            &files.cert,
            "no certificate in file",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_err("private key", &files.key, e))?;
    let verifier = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err("client CA", ca, e))? {
                roots
                    .add(c.map_err(|e| file_err("client CA", ca, e))?)
                    .map_err(|e| file_err("client CA", ca, e))?;
            }
            if roots.is_empty() {
                return Err(file_err("client CA", ca, "no certificate in file"));
            }
            let mut crls = Vec::new();
            if let Some(crl) = &files.crl {
                for c in CertificateRevocationListDer::pem_file_iter(crl)
                    .map_err(|e| file_err("CRL", crl, e))?
                {
                    crls.push(c.map_err(|e| file_err("CRL", crl, e))?);
                }
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .with_crls(crls)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?
        }
        None => WebPkiClientVerifier::no_client_auth(),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The TLS configuration in force, replaceable at run time.
pub struct TlsReloader {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    /// Loads the files once; fails if they do not make a valid configuration.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let cfg = server_config(&files)?;
        Ok(TlsReloader {
            files,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    /// Re-reads the files; on failure the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = Arc::new(server_config(&self.files)?);
        if let Ok(mut cur) = self.current.write() {
            *cur = cfg;
        }
        Ok(())
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.current
            .read()
            .ok()
            .map(|c| TlsAcceptor::from(Arc::clone(&c)))
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// Accepted, handshaken TLS connections, as a stream for the gRPC server.
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsStream<TcpStream>>,
}

impl futures_core::Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// Accepts TCP connections on `listener` and hands over those whose TLS handshake
/// succeeds. Failed handshakes are logged (not fatal) and dropped.
pub fn incoming(listener: TcpListener, tls: Arc<TlsReloader>) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(accept_loop(listener, tls, tx));
    TlsIncoming { rx }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = tls.acceptor() else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }
}
