//! The cost of checking a client certificate on every request (`grpc::client_cert`):
//! (a) the full verification a handshake makes (chain signature, CRL signature and
//! entries, validity) and a request makes when its chain has no verdict in force;
//! (b) the per-request check with the verdict reused (SHA-256 of the chain, one map
//! lookup, the clock read).
//!
//! Makes a throwaway PKI with `scripts/make-test-ca` in a temporary directory. One line
//! per measurement: `cert_check <what> ns_per_check=<n>`. `ARCA_BENCH_SECS` sets the
//! seconds per measurement (default 2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arca::clock::SystemClock;
use arca::grpc::client_cert::{ClientCheck, LiveVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

fn measure(what: &str, secs: f64, mut f: impl FnMut()) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < until {
        for _ in 0..64 {
            f();
        }
        n += 64;
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("cert_check {what} ns_per_check={ns:.0}");
}

fn main() {
    let secs: f64 = std::env::var("ARCA_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/make-test-ca");
    let out = std::process::Command::new(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.path().join("ca.pem")).unwrap())
        .unwrap();
    let roots = Arc::new(roots);
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_file_iter(dir.path().join("crl.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let check = Arc::new(
        ClientCheck::new(
            Arc::clone(&provider),
            Arc::new(SystemClock),
            Arc::clone(&roots),
            Some(crls),
        )
        .unwrap(),
    );
    let base = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    let live = LiveVerifier::new(base, Arc::clone(&check));
    let chain = vec![CertificateDer::from_pem_file(dir.path().join("client.pem")).unwrap()];
    let now = UnixTime::now();
    measure("full_verification", secs, || {
        live.verify_client_cert(&chain[0], &[], now).unwrap();
    });
    check.check(&chain).unwrap();
    measure("per_request_reused_verdict", secs, || {
        check.check(&chain).unwrap();
    });
}
