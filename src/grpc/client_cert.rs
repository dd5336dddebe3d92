//! The client-certificate check in force, shared by the TLS handshake and every request
//! (ADR 0013): a certificate is not trusted for the life of its connection, but checked
//! again at each call against the CRL loaded *now* and the time *now*.
//!
//! [`ClientCheck`] holds rustls' `WebPkiClientVerifier` built from the client CA and the
//! current CRL, with the CRL's expiry enforced (a CRL past its nextUpdate refuses every
//! certificate it covers). The handshake reaches it through [`LiveVerifier`] (the
//! verifier in the rustls `ServerConfig`); the authentication layer through
//! [`ClientCheck::check`] with the chain the connection presented. A refusal is a
//! [`CertRefusal`], whose stable reason goes out as `x-arca-reason` (`grpc::status`).
//!
//! Invariants:
//! - Fail closed: a CRL that cannot be read, parsed or checked (or a file with none in it)
//!   puts the check in the unusable state: every client certificate is refused, at the
//!   handshake and per request, until a good CRL is loaded ([`CertRefusal::CrlUnusable`]).
//!   It never falls back to an older CRL or to no revocation check.
//! - A positive verdict is reused (no signature checked again) only for the same chain,
//!   under the same CRL and CA (a generation number), and only until the earliest notAfter
//!   in the chain or the CRL's nextUpdate, whichever comes first. Refusals are not cached.
//! - Time is the [`Clock`]'s, read per request.
//!
//! The service layer knows nothing of X.509: this is the edge's part of authentication.
//!
//! Must not import: sqlx, cryptoki, arca_hsm.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertRevocationListError, CertificateError, DigitallySignedStruct, DistinguishedName,
    RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};
use x509_cert::der::Decode;

use crate::clock::Clock;

/// Most chains whose positive verdict is remembered (the map is emptied when full).
const CACHE_LIMIT: usize = 4096;

/// Why a client certificate is refused. Each has a stable reason (`x-arca-reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    /// The certificate (or a CA certificate in its chain) is in the CRL in force.
    #[error("client certificate revoked")]
    Revoked,
    /// The certificate (or one in its chain) is past its notAfter.
    #[error("client certificate expired")]
    Expired,
    /// The certificate (or one in its chain) is before its notBefore.
    #[error("client certificate not yet valid")]
    NotYetValid,
    /// The CRL in force is past its nextUpdate: revocation cannot be known.
    #[error("certificate revocation list expired")]
    CrlExpired,
    /// The CRL file could not be read or parsed: no certificate is accepted until it can.
    #[error("no usable certificate revocation list")]
    CrlUnusable,
    /// Any other failure (unknown issuer, bad signature, revocation status unknown).
    #[error("client certificate refused")]
    Invalid,
}

impl CertRefusal {
    /// The stable reason (`x-arca-reason`).
    pub fn reason(self) -> &'static str {
        match self {
            CertRefusal::Revoked => "CERT_REVOKED",
            CertRefusal::Expired => "CERT_EXPIRED",
            CertRefusal::NotYetValid => "CERT_NOT_YET_VALID",
            CertRefusal::CrlExpired => "CRL_EXPIRED",
            CertRefusal::CrlUnusable => "CRL_UNUSABLE",
            CertRefusal::Invalid => "CERT_INVALID",
        }
    }

    fn of(e: &rustls::Error) -> Self {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Revoked => CertRefusal::Revoked,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    CertRefusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    CertRefusal::NotYetValid
                }
                CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. } => CertRefusal::CrlExpired,
                _ => CertRefusal::Invalid,
            },
            _ => CertRefusal::Invalid,
        }
    }
}

/// Why a CRL was not put in force (the check is then unusable, see the module docs).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CrlRejected(pub String);

/// What is in force: the verifier of the client CA and current CRL, or nothing usable.
struct InForce {
    generation: u64,
    roots: Arc<RootCertStore>,
    /// `None`: the CRL is unusable and every certificate is refused.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Earliest nextUpdate of the CRLs in force, Unix seconds.
    crl_next_update: Option<u64>,
}

/// The client-certificate check in force (see the module docs).
pub struct ClientCheck {
    provider: Arc<CryptoProvider>,
    clock: Arc<dyn Clock>,
    generation: AtomicU64,
    in_force: RwLock<Arc<InForce>>,
    /// SHA-256 of a chain → (generation, Unix ms until which the verdict holds).
    verified: RwLock<HashMap<[u8; 32], (u64, i64)>>,
}

impl std::fmt::Debug for ClientCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCheck")
            .field("generation", &self.generation.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl ClientCheck {
    /// A check of certificates chaining to `roots`, against `crls` (none: no revocation
    /// check). Fails if the CRLs do not make a verifier.
    pub fn new(
        provider: Arc<CryptoProvider>,
        clock: Arc<dyn Clock>,
        roots: Arc<RootCertStore>,
        crls: Option<Vec<CertificateRevocationListDer<'static>>>,
    ) -> Result<Self, CrlRejected> {
        let check = ClientCheck {
            provider,
            clock,
            generation: AtomicU64::new(0),
            in_force: RwLock::new(Arc::new(InForce {
                generation: 0,
                roots: Arc::clone(&roots),
                verifier: None,
                crl_next_update: None,
            })),
            verified: RwLock::new(HashMap::new()),
        };
        check.put_in_force(roots, Ok(crls))?;
        Ok(check)
    }

    /// Puts `roots` and `crls` in force. A CRL error (`Err`, or CRLs that do not make a
    /// verifier) makes the check unusable (fail closed) and is returned.
    pub fn put_in_force(
        &self,
        roots: Arc<RootCertStore>,
        crls: Result<Option<Vec<CertificateRevocationListDer<'static>>>, CrlRejected>,
    ) -> Result<(), CrlRejected> {
        let (verifier, next_update, result) = match crls.and_then(|c| self.build(&roots, c)) {
            Ok((v, next)) => (Some(v), next, Ok(())),
            Err(e) => (None, None, Err(e)),
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let new = Arc::new(InForce {
            generation,
            roots,
            verifier,
            crl_next_update: next_update,
        });
        if let Ok(mut cur) = self.in_force.write() {
            *cur = new;
        }
        if let Ok(mut v) = self.verified.write() {
            v.clear();
        }
        result
    }

    /// Puts new `crls` in force with the client CA in force (see [`Self::put_in_force`]).
    pub fn put_crls_in_force(
        &self,
        crls: Result<Option<Vec<CertificateRevocationListDer<'static>>>, CrlRejected>,
    ) -> Result<(), CrlRejected> {
        let roots = Arc::clone(&self.current().roots);
        self.put_in_force(roots, crls)
    }

    fn build(
        &self,
        roots: &Arc<RootCertStore>,
        crls: Option<Vec<CertificateRevocationListDer<'static>>>,
    ) -> Result<(Arc<dyn ClientCertVerifier>, Option<u64>), CrlRejected> {
        let mut next_update = None;
        if let Some(crls) = &crls {
            if crls.is_empty() {
                return Err(CrlRejected("no CRL in file".into()));
            }
            for c in crls {
                let list = <x509_cert::crl::CertificateList>::from_der(c.as_ref())
                    .map_err(|e| CrlRejected(format!("CRL does not parse: {e}")))?;
                // rustls refuses a CRL without nextUpdate too (RFC 5280 requires it).
                let next = list
                    .tbs_cert_list
                    .next_update
                    .ok_or_else(|| CrlRejected("CRL without nextUpdate".into()))?
                    .to_unix_duration()
                    .as_secs();
                next_update = Some(next_update.map_or(next, |n: u64| n.min(next)));
            }
        }
        let builder = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(roots),
            Arc::clone(&self.provider),
        );
        let builder = match crls {
            Some(crls) => builder.with_crls(crls).enforce_revocation_expiration(),
            None => builder,
        };
        let verifier = builder
            .build()
            .map_err(|e| CrlRejected(format!("CRL refused: {e}")))?;
        Ok((verifier, next_update))
    }

    fn current(&self) -> Arc<InForce> {
        match self.in_force.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Whether a CRL is in force and usable.
    pub fn crl_usable(&self) -> bool {
        self.current().verifier.is_some()
    }

    /// The earliest nextUpdate (Unix seconds) of the CRLs in force, if any.
    pub fn crl_next_update(&self) -> Option<u64> {
        self.current().crl_next_update
    }

    /// Whether the CRL in force is past its nextUpdate at the clock's time.
    pub fn crl_expired(&self) -> bool {
        let now = u64::try_from(self.clock.now_ms() / 1000).unwrap_or(0);
        self.crl_next_update().is_some_and(|next| now >= next)
    }

    /// The verdict on a chain (end entity first) at `now`, without the cache.
    fn verdict(
        &self,
        in_force: &InForce,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), CertRefusal> {
        let verifier = in_force.verifier.as_ref().ok_or(CertRefusal::CrlUnusable)?;
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ())
            .map_err(|e| CertRefusal::of(&e))
    }

    /// Checks the chain a connection presented (end entity first) against the CRL in
    /// force and the clock's time.
    pub fn check(&self, chain: &[CertificateDer<'_>]) -> Result<(), CertRefusal> {
        let (end_entity, intermediates) = chain.split_first().ok_or(CertRefusal::Invalid)?;
        let in_force = self.current();
        let now_ms = self.clock.now_ms();
        let key = chain_digest(chain);
        let cached = self.verified.read().ok().and_then(|v| v.get(&key).copied());
        if let Some((generation, until)) = cached {
            if generation == in_force.generation && now_ms < until && in_force.verifier.is_some() {
                return Ok(());
            }
        }
        let now =
            UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(now_ms).unwrap_or(0)));
        self.verdict(&in_force, end_entity, intermediates, now)?;
        // Until the first notAfter of the chain or the CRL's nextUpdate (whole seconds;
        // the verdict is made again from that second on).
        let mut until = chain
            .iter()
            .map(|c| not_after(c.as_ref()))
            .try_fold(i64::MAX, |m, n| n.map(|n| m.min(n)));
        if let (Some(u), Some(next)) = (until.as_mut(), in_force.crl_next_update) {
            *u = (*u).min(i64::try_from(next).unwrap_or(i64::MAX).saturating_mul(1000));
        }
        if let (Some(until), Ok(mut v)) = (until, self.verified.write()) {
            if v.len() >= CACHE_LIMIT {
                v.clear();
            }
            v.insert(key, (in_force.generation, until));
        }
        Ok(())
    }
}

/// SHA-256 over the chain, each certificate length-prefixed.
fn chain_digest(chain: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for c in chain {
        h.update((c.as_ref().len() as u64).to_be_bytes());
        h.update(c.as_ref());
    }
    h.finalize().into()
}

/// A certificate's notAfter, Unix ms (`None` if it does not parse).
fn not_after(der: &[u8]) -> Option<i64> {
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let secs = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration()
        .as_secs();
    i64::try_from(secs).ok()?.checked_mul(1000)
}

/// The verifier in the rustls configuration: hints and handshake signatures from the
/// client CA's verifier, the certificate's verdict from the [`ClientCheck`] in force.
#[derive(Debug)]
pub struct LiveVerifier {
    base: Arc<dyn ClientCertVerifier>,
    check: Arc<ClientCheck>,
}

impl LiveVerifier {
    /// `base`: a verifier of the client CA (for the CA names hinted to clients and the
    /// handshake signatures); `check`: the check in force.
    pub fn new(base: Arc<dyn ClientCertVerifier>, check: Arc<ClientCheck>) -> Self {
        LiveVerifier { base, check }
    }
}

impl ClientCertVerifier for LiveVerifier {
    fn offer_client_auth(&self) -> bool {
        self.base.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.base.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.base.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let in_force = self.check.current();
        match in_force.verifier.as_ref() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertRevocationList(
                CertRevocationListError::ParseError,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.base.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_map_to_their_refusals() {
        let of = |e: CertificateError| CertRefusal::of(&rustls::Error::InvalidCertificate(e));
        assert_eq!(of(CertificateError::Revoked), CertRefusal::Revoked);
        assert_eq!(of(CertificateError::Expired), CertRefusal::Expired);
        assert_eq!(of(CertificateError::NotValidYet), CertRefusal::NotYetValid);
        assert_eq!(
            of(CertificateError::ExpiredRevocationList),
            CertRefusal::CrlExpired
        );
        assert_eq!(of(CertificateError::UnknownIssuer), CertRefusal::Invalid);
        assert_eq!(
            of(CertificateError::UnknownRevocationStatus),
            CertRefusal::Invalid
        );
        assert_eq!(
            CertRefusal::of(&rustls::Error::InvalidCertRevocationList(
                CertRevocationListError::BadSignature
            )),
            CertRefusal::Invalid
        );
    }

    #[test]
    fn the_chain_digest_separates_certificates() {
        let a = CertificateDer::from(vec![1u8, 2, 3]);
        let b = CertificateDer::from(vec![4u8]);
        let ab = CertificateDer::from(vec![1u8, 2, 3, 4]);
        assert_ne!(
            chain_digest(&[a.clone(), b.clone()]),
            chain_digest(std::slice::from_ref(&ab))
        );
        assert_ne!(chain_digest(&[a.clone(), b.clone()]), chain_digest(&[b, a]));
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
