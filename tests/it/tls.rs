//! TLS and mutual TLS on a real listener: protocol and suite policy (driven with
//! `openssl s_client`), client-certificate verification (none, expired, another CA,
//! revoked by CRL) at the handshake and again on every request on an open channel (a
//! certificate revoked or expired since, an expired or unparsable CRL), the maximum
//! connection age, and SIGHUP reload. The PKI comes from `scripts/make-test-ca`; the
//! server runs on the back end of [`Db::default`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::grpc::pb::access_service_client::AccessServiceClient;
use arca::grpc::pb::audit_service_client::AuditServiceClient;
use arca::grpc::pb::key_service_client::KeyServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::support::database::PgDatabase;
use crate::support::pki::make_test_ca;
use crate::support::{arca_command, reason, signal, Auth, Db, ServerProcess};

/// A dev server over mutual TLS, with the PKI it trusts.
struct TlsArca {
    server: ServerProcess,
    pki: PathBuf,
    token: String,
    log: PathBuf,
    _pg: Option<PgDatabase>,
    _dir: tempfile::TempDir,
}

async fn start() -> TlsArca {
    start_with(&[]).await
}

/// A dev server over mutual TLS with extra server arguments.
async fn start_with(extra: &[std::ffi::OsString]) -> TlsArca {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_test_ca(&pki);
    let data = dir.path().join("data");
    let p = |f: &str| pki.join(f);
    let mut cmd = arca_command();
    cmd.args(["server", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--tls-cert")
        .arg(p("server.pem"))
        .arg("--tls-key")
        .arg(p("server.key"))
        .arg("--tls-client-ca")
        .arg(p("ca.pem"))
        .arg("--tls-crl")
        .arg(p("crl.pem"))
        .args(extra);
    let pg = (Db::default() == Db::Postgres).then(PgDatabase::create);
    if let Some(pg) = &pg {
        cmd.env("ARCA_DATABASE_URL", pg.url());
    }
    let log = dir.path().join("server.log");
    let server = ServerProcess::spawn(cmd, &log).await;
    let token = std::fs::read_to_string(data.join("dev-token"))
        .unwrap()
        .trim()
        .to_string();
    let arca = TlsArca {
        server,
        pki,
        token,
        log,
        _pg: pg,
        _dir: dir,
    };
    let backend = match Db::default() {
        Db::Postgres => "backend=Postgres",
        Db::Sqlite => "backend=Sqlite",
    };
    arca.wait_log("database open", backend).await;
    arca
}

impl TlsArca {
    /// A KeyService call over TLS presenting `client` (a name in the PKI dir), or none.
    async fn list_keys(&self, client: Option<&str>) -> Result<(), String> {
        self.list_keys_as(client, &self.token).await
    }

    /// The same with another bearer token.
    async fn list_keys_as(&self, client: Option<&str>, token: &str) -> Result<(), String> {
        let ch = self.channel(client).await?;
        let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(token));
        c.list_keys(pb::ListKeysRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    async fn channel(&self, client: Option<&str>) -> Result<tonic::transport::Channel, String> {
        self.endpoint(client)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))
    }

    /// A channel that counts the TCP connections (each one a TLS handshake) it makes.
    async fn counted_channel(&self, client: &str) -> (tonic::transport::Channel, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let (addr, n) = (self.server.addr(), Arc::clone(&count));
        let connector = tower::service_fn(move |_: http::Uri| {
            n.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        });
        let ch = self
            .endpoint(Some(client))
            .connect_with_connector(connector)
            .await
            .unwrap();
        (ch, count)
    }

    fn endpoint(&self, client: Option<&str>) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(self.pki.join("ca.pem")).unwrap(),
            ))
            .domain_name("localhost");
        if let Some(name) = client {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(self.pki.join(format!("{name}.pem"))).unwrap(),
                std::fs::read(self.pki.join(format!("{name}.key"))).unwrap(),
            ));
        }
        Endpoint::from_shared(format!("https://{}", self.server.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
    }

    /// Waits (5 s at most) for a line of the server's log with both `a` and `b`.
    async fn wait_log(&self, a: &str, b: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .any(|l| l.contains(a) && l.contains(b))
        {
            assert!(
                Instant::now() < deadline,
                "no log line with {a:?} and {b:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `openssl s_client` with `args` and a valid client certificate; returns the
    /// negotiated cipher, or None when the handshake failed.
    fn s_client(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(self.server.addr().to_string())
            .args(args)
            .arg("-cert")
            .arg(self.pki.join("client.pem"))
            .arg("-key")
            .arg(self.pki.join("client.key"))
            .arg("-CAfile")
            .arg(self.pki.join("ca.pem"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let cipher = text
            .lines()
            .find_map(|l| l.split("Cipher is ").nth(1))
            .map(|c| c.trim().to_string())?;
        (cipher != "(NONE)").then_some(cipher)
    }
}

#[tokio::test]
async fn protocol_and_suite_policy() {
    let arca = start().await;
    for refused in [
        &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        &["-tls1_2", "-cipher", "AES128-SHA"], // RSA key exchange, CBC
        &["-tls1_2", "-cipher", "AES256-GCM-SHA384"], // RSA key exchange: no forward secrecy
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"], // forward secret, but CBC
    ] {
        assert_eq!(arca.s_client(refused), None, "{refused:?} must be refused");
    }
    assert_eq!(
        arca.s_client(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"])
            .as_deref(),
        Some("ECDHE-ECDSA-AES128-GCM-SHA256")
    );
    assert!(arca
        .s_client(&["-tls1_3"])
        .is_some_and(|c| c.starts_with("TLS_")));
}

#[tokio::test]
async fn client_certificates_are_verified() {
    let arca = start().await;
    arca.list_keys(Some("client")).await.unwrap();
    arca.list_keys(Some("client2")).await.unwrap();
    for bad in [None, Some("expired"), Some("other"), Some("revoked")] {
        assert!(
            arca.list_keys(bad).await.is_err(),
            "{bad:?} must be refused"
        );
    }
}

/// Runs `openssl ca` in the test PKI dir with `args`.
fn openssl_ca(pki: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .arg("ca")
        .args([
            "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
        ])
        .args(args)
        .current_dir(pki)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_certificate_revoked_while_its_connection_is_open_stops_within_the_connection_age() {
    let arca = start_with(&["--max-connection-age".into(), "2s".into()]).await;
    // One channel, kept open and used throughout.
    let ch = arca.channel(Some("client")).await.unwrap();
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    openssl_ca(&arca.pki, &["-revoke", "client.pem"]);
    openssl_ca(&arca.pki, &["-gencrl", "-out", "crl.pem"]);
    signal(arca.server.pid(), "HUP");
    // The same channel is refused: per request as soon as the reloaded CRL is in force,
    // and once its connection ages out, the new handshake fails on the CRL.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.list_keys(pb::ListKeysRequest::default()).await {
            Err(_) => break,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "a revoked certificate kept working on its open connection"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another client is unaffected.
    arca.list_keys(Some("client2")).await.unwrap();
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let mut arca = start().await;
    arca.list_keys(Some("client")).await.unwrap();
    // Revoke `client` in a new CRL, then reload: new handshakes refuse it.
    let pki = arca.pki.clone();
    openssl_ca(&pki, &["-revoke", "client.pem"]);
    openssl_ca(&pki, &["-gencrl", "-out", "crl.pem"]);
    signal(arca.server.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while arca.list_keys(Some("client")).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the reloaded CRL was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    arca.list_keys(Some("client2")).await.unwrap();
    // A broken certificate file is refused on reload; the server keeps serving.
    std::fs::write(pki.join("server.pem"), b"not a certificate").unwrap();
    signal(arca.server.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    arca.list_keys(Some("client2")).await.unwrap();
    assert!(arca.server.is_running(), "server died on a bad reload");
}

#[test]
fn outside_dev_mode_mutual_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_test_ca(&pki);
    let run = |extra: &[&str]| {
        arca_command()
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS is required"));
    let cert = pki.join("server.pem");
    let key = pki.join("server.key");
    let out = run(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mutual TLS is required"));
}

#[test]
fn certificate_principals() {
    use rustls::pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    make_test_ca(dir.path());
    let principal = |name: &str| {
        let der = rustls::pki_types::CertificateDer::from_pem_file(dir.path().join(name)).unwrap();
        arca::authz::cert::principal_from_der(der.as_ref())
    };
    // URI SAN first, else DNS SAN, else the subject CN.
    assert_eq!(
        principal("client.pem").as_deref(),
        Some("spiffe://arca.test/svc/billing")
    );
    assert_eq!(principal("client2.pem").as_deref(), Some("ops.arca.test"));
    assert_eq!(principal("other.pem").as_deref(), Some("intruder"));
    assert_eq!(
        arca::authz::cert::principal_from_der(b"not a certificate"),
        None
    );
}

#[tokio::test]
async fn a_bound_token_works_only_with_its_certificate() {
    let arca = start().await;
    let ch = arca.channel(Some("client")).await.unwrap();
    let mut access = AccessServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    let bound = access
        .create_token(pb::CreateTokenRequest {
            principal: "svc:billing".into(),
            bound_principal: "spiffe://arca.test/svc/billing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    arca.list_keys_as(Some("client"), &bound).await.unwrap();
    let e = arca
        .list_keys_as(Some("client2"), &bound)
        .await
        .unwrap_err();
    assert!(e.contains("Unauthenticated"), "{e}");
}

#[tokio::test]
async fn a_client_certificate_alone_authenticates_its_principal() {
    // The shipped policy, plus a binding of the billing service's SPIFFE name.
    let pol = tempfile::tempdir().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/");
    std::fs::copy(format!("{root}roles.toml"), pol.path().join("roles.toml")).unwrap();
    let mut bindings = std::fs::read_to_string(format!("{root}bindings.toml")).unwrap();
    bindings.push_str(
        "\n[[bindings]]\nprincipals = [\"spiffe://arca.test/svc/*\"]\nroles = [\"service\"]\n",
    );
    std::fs::write(pol.path().join("bindings.toml"), bindings).unwrap();
    let arca = start_with(&["--policy-dir".into(), pol.path().as_os_str().to_owned()]).await;

    let call = |client: &'static str| {
        let arca = &arca;
        async move {
            let mut c = KeyServiceClient::new(arca.channel(Some(client)).await.unwrap());
            c.list_keys(pb::ListKeysRequest::default()).await
        }
    };
    // No token: the certificate's URI SAN is the principal, bound to `service`.
    call("client")
        .await
        .expect("certificate principal with a role");
    // client2 (DNS:ops.arca.test) is authenticated, but bound to no role: default deny.
    let e = call("client2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A service may not administer keys.
    let mut c = KeyServiceClient::new(arca.channel(Some("client")).await.unwrap());
    let e = c
        .create_key(pb::CreateKeyRequest {
            name: "by-cert".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
}

/// Revokes `name` in a new CRL, written the way an operator must (a new file renamed over
/// the old one); no SIGHUP.
fn revoke(pki: &Path, name: &str) {
    openssl_ca(pki, &["-revoke", &format!("{name}.pem")]);
    write_crl(pki, &[]);
}

/// Writes a new CRL (with `extra` `openssl ca` arguments) over `crl.pem`, atomically.
fn write_crl(pki: &Path, extra: &[&str]) {
    let mut args = vec!["-gencrl", "-out", "crl.new"];
    args.extend_from_slice(extra);
    openssl_ca(pki, &args);
    std::fs::rename(pki.join("crl.new"), pki.join("crl.pem")).unwrap();
}

/// Calls ListKeys on `c` until it fails (within `within`); the failure.
async fn first_refusal(
    c: &mut KeyServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
    >,
    within: Duration,
    what: &str,
) -> Status {
    let deadline = Instant::now() + within;
    loop {
        match c.list_keys(pb::ListKeysRequest::default()).await {
            Err(s) => return s,
            Ok(_) => assert!(Instant::now() < deadline, "{what}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The audit records of ListKeys calls refused UNAUTHENTICATED, read by an auditor over
/// `client2`.
async fn refused_list_keys(arca: &TlsArca) -> Vec<pb::AuditRecord> {
    let ch = arca.channel(Some("client2")).await.unwrap();
    let auditor = AccessServiceClient::with_interceptor(ch.clone(), Auth::bearer(&arca.token))
        .create_token(pb::CreateTokenRequest {
            principal: "auditor:it".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    AuditServiceClient::with_interceptor(ch, Auth::bearer(&auditor))
        .query_audit(pb::QueryAuditRequest {
            operation: "ListKeys".into(),
            result: "UNAUTHENTICATED".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

#[tokio::test]
async fn a_client_certificate_revoked_while_its_channel_is_open_is_refused_on_that_channel() {
    // Connections live the default 10 minutes: only the per-request check can refuse.
    let arca = start_with(&["--tls-crl-refresh".into(), "200ms".into()]).await;
    let (ch, connects) = arca.counted_channel("client").await;
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    revoke(&arca.pki, "client");
    let refused = first_refusal(
        &mut c,
        Duration::from_secs(10),
        "a certificate revoked while its channel is open kept working on it",
    )
    .await;
    // Answered by the server on the open connection (a new handshake would fail before
    // any status), with the reason; and again on the next call.
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(reason(&refused), Some("CERT_REVOKED"), "{refused:?}");
    let again = c
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reason(&again), Some("CERT_REVOKED"), "{again:?}");
    assert_eq!(
        connects.load(Ordering::SeqCst),
        1,
        "the client did not reconnect"
    );
    // A new connection with it fails the handshake; another client is unaffected.
    assert!(arca.list_keys(Some("client")).await.is_err());
    arca.list_keys(Some("client2")).await.unwrap();
    // The refusals are in the audit trail with their reason and the certificate's name.
    let recs = refused_list_keys(&arca).await;
    assert!(
        recs.iter()
            .filter(|r| r.detail == "CERT_REVOKED spiffe://arca.test/svc/billing")
            .count()
            >= 2,
        "{recs:?}"
    );
}

#[tokio::test]
async fn a_connection_past_the_max_connection_age_is_closed_and_the_client_handshakes_again() {
    let arca = start_with(&[
        "--max-connection-age".into(),
        "1s".into(),
        "--tls-crl-refresh".into(),
        "200ms".into(),
    ])
    .await;
    let (ch, connects) = arca.counted_channel("client").await;
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    // Calls keep working across the closes: the connection is closed gracefully and the
    // channel makes a new one, through a new handshake.
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = connects.load(Ordering::SeqCst);
    assert!(before >= 3, "{before} connections in 3.5 s with a 1 s age");
    // Revoked (a new CRL file, no SIGHUP): once the connection ages out, the new
    // handshake refuses the certificate, so the channel cannot reconnect.
    revoke(&arca.pki, "client");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.list_keys(pb::ListKeysRequest::default()).await {
            // Until the connection ages out, the per-request check refuses it, with its
            // reason; then the new handshake fails (a transport error, no reason).
            Err(s) if reason(&s).is_none() => {
                assert_ne!(s.code(), Code::Ok);
                break;
            }
            Err(s) => assert_eq!(reason(&s), Some("CERT_REVOKED"), "{s:?}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the revoked certificate kept reconnecting ({} connections)",
            connects.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(connects.load(Ordering::SeqCst) > before);
    arca.list_keys(Some("client2")).await.unwrap();
}

#[tokio::test]
async fn an_expired_crl_refuses_mutual_tls_callers_until_a_fresh_one_is_written() {
    let arca = start_with(&["--tls-crl-refresh".into(), "200ms".into()]).await;
    let ch = arca.channel(Some("client")).await.unwrap();
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    // A CRL whose nextUpdate is 3 seconds away.
    write_crl(&arca.pki, &["-crlsec", "3"]);
    let refused = first_refusal(
        &mut c,
        Duration::from_secs(15),
        "calls kept working under an expired CRL",
    )
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(reason(&refused), Some("CRL_EXPIRED"), "{refused:?}");
    // New connections are refused at the handshake, whatever the certificate.
    assert!(arca.list_keys(Some("client2")).await.is_err());
    // The operator is told: an ERROR line, and the alert (from its audit record).
    arca.wait_log("ERROR", "past its nextUpdate").await;
    arca.wait_log("ALERT", "rule=crl_unusable").await;
    // A fresh CRL: service resumes, on the same channel and on new ones.
    write_crl(&arca.pki, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.list_keys(pb::ListKeysRequest::default()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "a fresh CRL did not restore service"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    arca.list_keys(Some("client2")).await.unwrap();
}

#[tokio::test]
async fn a_crl_file_that_does_not_parse_refuses_every_certificate_until_a_good_one_is_written() {
    let arca = start_with(&["--tls-crl-refresh".into(), "200ms".into()]).await;
    let ch = arca.channel(Some("client")).await.unwrap();
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    // Not a CRL (an emptied or corrupted file): fail closed, never "no revocation".
    std::fs::write(arca.pki.join("crl.pem"), b"not a CRL").unwrap();
    let refused = first_refusal(
        &mut c,
        Duration::from_secs(10),
        "calls kept working with an unparsable CRL",
    )
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(reason(&refused), Some("CRL_UNUSABLE"), "{refused:?}");
    assert!(arca.list_keys(Some("client2")).await.is_err());
    arca.wait_log("ERROR", "the CRL is unusable").await;
    arca.wait_log("ALERT", "rule=crl_unusable").await;
    // SIGHUP does not bring the old CRL back either.
    signal(arca.server.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = c
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reason(&still), Some("CRL_UNUSABLE"), "{still:?}");
    write_crl(&arca.pki, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.list_keys(pb::ListKeysRequest::default()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "a good CRL did not restore service"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    arca.list_keys(Some("client2")).await.unwrap();
}

/// `date -u` `offset` from now (e.g. "+5 seconds"), as `openssl ca` takes it.
fn utc_in(offset: &str) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", offset, "+%Y%m%d%H%M%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn a_certificate_that_expires_while_its_channel_is_open_is_refused_per_request() {
    let arca = start().await;
    // A client certificate of the test CA valid for the next 5 seconds.
    let pki = &arca.pki;
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(pki)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "brief.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "brief.key",
        "-subj",
        "/CN=brief",
        "-out",
        "brief.csr",
    ]);
    let (start, end) = (utc_in("-1 minute"), utc_in("+5 seconds"));
    openssl_ca(
        pki,
        &[
            "-in",
            "brief.csr",
            "-out",
            "brief.pem",
            "-extensions",
            "client_ext",
            "-notext",
            "-startdate",
            &start,
            "-enddate",
            &end,
        ],
    );
    let ch = arca.channel(Some("brief")).await.unwrap();
    let mut c = KeyServiceClient::with_interceptor(ch, Auth::bearer(&arca.token));
    c.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    let refused = first_refusal(
        &mut c,
        Duration::from_secs(15),
        "an expired certificate kept working on its open channel",
    )
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(reason(&refused), Some("CERT_EXPIRED"), "{refused:?}");
    arca.list_keys(Some("client")).await.unwrap();
}
