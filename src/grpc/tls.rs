//! TLS for the gRPC listener (rustls, *ring* provider).
//!
//! Invariants:
//! - TLS 1.2 and 1.3 only, and only forward-secret AEAD suites (ECDHE with AES-GCM or
//!   ChaCha20-Poly1305; TLS 1.3's three suites). rustls has no compression and no
//!   renegotiation at all.
//! - With a client CA bundle (required outside dev mode), every client must present a
//!   certificate that chains to it, is within its validity period and, with a CRL, is not
//!   revoked by a CRL that is itself not past its nextUpdate: otherwise the handshake
//!   fails and no request is read. The same check ([`ClientCheck`]) runs again on every
//!   request (`grpc::authn`), so a certificate revoked or expired while its connection is
//!   open is refused on that connection.
//! - The configuration is rebuilt from the files on [`TlsReloader::reload`] (SIGHUP): a bad
//!   certificate, key or CA file is refused and the configuration in force stays. The CRL
//!   file is also re-read every `crl_refresh` ([`TlsReloader::refresh_crl`]) and put in
//!   force when its bytes change. A CRL that cannot be used fails closed: every client
//!   certificate is refused until a usable one is read (never the old one kept, never
//!   none).
//! - No session resumption (no session cache, no tickets): every handshake verifies the
//!   client certificate afresh.
//! - Handshakes run concurrently, each bounded by [`HANDSHAKE_TIMEOUT`], so a slow or
//!   silent client cannot hold up others.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::ring as ring_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::client_cert::{ClientCheck, CrlRejected, LiveVerifier};
use crate::clock::Clock;

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
    /// How often the CRL file is re-read (a changed file is put in force).
    pub crl_refresh: Duration,
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
    /// The CRL is unusable: every client certificate is refused until a good one is read.
    #[error("{0}; every client certificate is refused until a usable CRL is read")]
    Crl(String),
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

fn read_certs(files: &TlsFiles) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
    Ok(certs)
}

fn read_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err("client CA", ca, e))? {
        roots
            .add(c.map_err(|e| file_err("client CA", ca, e))?)
            .map_err(|e| file_err("client CA", ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_err("client CA", ca, "no certificate in file"));
    }
    Ok(Arc::new(roots))
}

/// The CRLs in a file's bytes (PEM); a file with none is refused, so that an emptied or
/// truncated file never turns revocation checking off.
fn parse_crls(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CrlRejected> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CrlRejected(format!("CRL {}: {e}", path.display())))?;
    if crls.is_empty() {
        return Err(CrlRejected(format!(
            "CRL {}: no CRL in file",
            path.display()
        )));
    }
    Ok(crls)
}

/// Reads the CRL file: its digest (to notice a change) and its CRLs.
fn read_crls(
    path: &Path,
) -> (
    [u8; 32],
    Result<Vec<CertificateRevocationListDer<'static>>, CrlRejected>,
) {
    match std::fs::read(path) {
        Ok(bytes) => (Sha256::digest(&bytes).into(), parse_crls(path, &bytes)),
        // An unreadable file has a digest of its own (all zeros), so that it is
        // reported once, and its return noticed.
        Err(e) => (
            [0; 32],
            Err(CrlRejected(format!("CRL {}: {e}", path.display()))),
        ),
    }
}

/// The rustls configuration of a certificate, key and client-certificate verifier.
fn server_config(
    provider: Arc<CryptoProvider>,
    files: &TlsFiles,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(files)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_err("private key", &files.key, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session skips the client certificate's
    // verification (it carries the first handshake's verdict), so a certificate revoked
    // or expired since could reconnect. Clients reconnect rarely (each
    // `--max-connection-age`): every handshake is a full one.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A verifier of the client CA alone (hints and handshake signatures of [`LiveVerifier`]).
fn base_verifier(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// What a re-read of the CRL file found.
#[derive(Debug)]
pub enum CrlRefresh {
    /// No CRL file, or the same bytes as last time.
    Unchanged,
    /// A new CRL is in force.
    Loaded,
    /// The file changed but its CRL is unusable: every client certificate is refused
    /// until a good one is written.
    Unusable(CrlRejected),
}

/// The TLS configuration in force, replaceable at run time, and the client-certificate
/// check shared with the authentication layer.
pub struct TlsReloader {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<ServerConfig>>,
    check: Option<Arc<ClientCheck>>,
    /// Digest of the CRL file's bytes last put in force (or refused).
    crl_seen: Mutex<[u8; 32]>,
}

impl TlsReloader {
    /// Loads the files once; fails if they do not make a valid configuration (a bad CRL
    /// included: a server does not start without a usable one).
    pub fn load(files: TlsFiles, clock: Arc<dyn Clock>) -> Result<Self, TlsError> {
        let provider = Arc::new(provider());
        let mut seen = [0; 32];
        let (verifier, check) = match &files.client_ca {
            Some(ca) => {
                let roots = read_roots(ca)?;
                let crls = match &files.crl {
                    Some(path) => {
                        let (digest, crls) = read_crls(path);
                        seen = digest;
                        Some(crls.map_err(|e| TlsError::Crl(e.0))?)
                    }
                    None => None,
                };
                let check = Arc::new(
                    ClientCheck::new(Arc::clone(&provider), clock, Arc::clone(&roots), crls)
                        .map_err(|e| TlsError::Crl(e.0))?,
                );
                let live = LiveVerifier::new(base_verifier(&provider, &roots)?, Arc::clone(&check));
                (Arc::new(live) as Arc<dyn ClientCertVerifier>, Some(check))
            }
            None => (WebPkiClientVerifier::no_client_auth(), None),
        };
        let cfg = server_config(Arc::clone(&provider), &files, verifier)?;
        Ok(TlsReloader {
            files,
            provider,
            current: RwLock::new(Arc::new(cfg)),
            check,
            crl_seen: Mutex::new(seen),
        })
    }

    /// Re-reads the files. A bad certificate, key or client CA is refused and the
    /// configuration in force stays. A bad CRL is different: it fails closed (every
    /// client certificate is refused until a good CRL is read) and is returned as
    /// [`TlsError::Crl`] after the rest is put in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (verifier, roots) = match (&self.files.client_ca, &self.check) {
            (Some(ca), Some(check)) => {
                let roots = read_roots(ca)?;
                let live =
                    LiveVerifier::new(base_verifier(&self.provider, &roots)?, Arc::clone(check));
                (Arc::new(live) as Arc<dyn ClientCertVerifier>, Some(roots))
            }
            _ => (WebPkiClientVerifier::no_client_auth(), None),
        };
        let cfg = Arc::new(server_config(
            Arc::clone(&self.provider),
            &self.files,
            verifier,
        )?);
        let crl = match (roots, &self.check) {
            (Some(roots), Some(check)) => {
                let crls = match &self.files.crl {
                    Some(path) => {
                        let (digest, crls) = read_crls(path);
                        if let Ok(mut seen) = self.crl_seen.lock() {
                            *seen = digest;
                        }
                        crls.map(Some)
                    }
                    None => Ok(None),
                };
                check.put_in_force(roots, crls)
            }
            _ => Ok(()),
        };
        if let Ok(mut cur) = self.current.write() {
            *cur = cfg;
        }
        crl.map_err(|e| TlsError::Crl(e.0))
    }

    /// Re-reads the CRL file and puts it in force if its bytes changed since last read
    /// (see [`CrlRefresh`]).
    pub fn refresh_crl(&self) -> CrlRefresh {
        let (Some(path), Some(check)) = (&self.files.crl, &self.check) else {
            return CrlRefresh::Unchanged;
        };
        let (digest, crls) = read_crls(path);
        match self.crl_seen.lock() {
            Ok(mut seen) if *seen != digest => *seen = digest,
            _ => return CrlRefresh::Unchanged,
        }
        match check.put_crls_in_force(crls.map(Some)) {
            Ok(()) => CrlRefresh::Loaded,
            Err(e) => CrlRefresh::Unusable(e),
        }
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

    /// The client-certificate check (mutual TLS only), for the authentication layer.
    pub fn client_check(&self) -> Option<Arc<ClientCheck>> {
        self.check.clone()
    }

    /// How often the CRL file is re-read (none without a CRL).
    pub fn crl_refresh(&self) -> Option<Duration> {
        self.files.crl.as_ref().map(|_| self.files.crl_refresh)
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
