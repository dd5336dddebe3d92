//! The full production ceremony through the real CLI, over mutual TLS: a token made with
//! `hsm/softhsm/init-token`, `arca server` outside dev mode (sealed, bootstrap token),
//! `arca operator init`, a restart (sealed again), three `arca operator unseal`, a key,
//! `arca key rotate` answering an approval request, and three `arca approve`; and an
//! init whose share for one custodian comes back encrypted to that custodian's `age` key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::quorum::base32_decode;

struct Prod {
    root: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl Drop for Prod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Prod {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    async fn start(&mut self) {
        let out_path = self.p(&format!(
            "server-{}.out",
            Instant::now().elapsed().as_nanos()
        ));
        let out = std::fs::File::create(&out_path).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("server.log"))
            .unwrap();
        let child = Command::new(crate::support::arca_bin())
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--hsm-token-label",
                "arca-prod",
            ])
            .arg("--data-dir")
            .arg(self.p("data"))
            .arg("--tls-cert")
            .arg(self.p("pki/server.pem"))
            .arg("--tls-key")
            .arg(self.p("pki/server.key"))
            .arg("--tls-client-ca")
            .arg(self.p("pki/ca.pem"))
            .env("SOFTHSM2_CONF", self.p("hsm/softhsm2.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        self.port = loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some(rest) = text
                .split("arca server listening on https://127.0.0.1:")
                .nth(1)
            {
                break rest.lines().next().unwrap().trim().parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                std::fs::read_to_string(self.p("server.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
    }

    fn stop(&mut self) {
        let mut c = self.child.take().unwrap();
        crate::support::signal(c.id(), "TERM");
        assert!(c.wait().unwrap().success());
    }

    /// Runs the CLI over mTLS as `token`; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str], token: &str) -> (bool, String, String) {
        let out = Command::new(crate::support::arca_bin())
            .args(args)
            .env("ARCA_ADDR", format!("https://127.0.0.1:{}", self.port))
            .env("ARCA_TOKEN", token)
            .env("ARCA_CACERT", self.p("pki/ca.pem"))
            .env("ARCA_CLIENT_CERT", self.p("pki/client.pem"))
            .env("ARCA_CLIENT_KEY", self.p("pki/client.key"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    fn json(&self, args: &[&str], token: &str) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let (ok, out, err) = self.cli(&all, token);
        assert!(ok, "arca {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

fn totp(kit: &Path, offset: i64) -> String {
    use arca::clock::Clock;
    let uri = read(&kit.join("totp-uri"));
    let secret = base32_decode(
        uri.split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap(),
    );
    let step = arca::quorum::totp::step_at(arca::clock::SystemClock.now_ms()) + offset;
    arca::quorum::totp::hotp(&secret, step as u64)
}

/// A fresh PKI and token (`arca-prod`); the server is not started yet.
fn fresh_prod() -> Prod {
    let root = tempfile::tempdir().unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(manifest.join("scripts/make-test-ca"))
        .arg(root.path().join("pki"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    let ok = Command::new(manifest.join("hsm/softhsm/init-token"))
        .args(["--dir"])
        .arg(root.path().join("hsm"))
        .args(["--label", "arca-prod"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    Prod {
        root,
        child: None,
        port: 0,
    }
}

#[tokio::test]
async fn the_production_ceremony_through_the_cli() {
    let mut prod = fresh_prod();
    prod.start().await;
    let boot = read(&prod.p("data/bootstrap-token"));

    // Not initialised: sealed, and key calls refused.
    let st = prod.json(&["operator", "status"], &boot);
    assert_eq!(
        (st["initialized"].as_bool(), st["sealed"].as_bool()),
        (Some(false), Some(true))
    );
    let (ok, _, err) = prod.cli(&["key", "list"], &boot);
    assert!(!ok && err.contains("sealed"), "{err}");

    // The ceremony: 3 of 4, kits written per custodian.
    let so = prod.p("hsm/so-pin");
    let kits = prod.p("kits");
    let (ok, out, err) = prod.cli(
        &[
            "operator",
            "init",
            "--threshold",
            "3",
            "--custodian",
            "alice",
            "--custodian",
            "bob",
            "--custodian",
            "carol",
            "--custodian",
            "dan",
            "--so-pin-file",
            so.to_str().unwrap(),
            "--out-dir",
            kits.to_str().unwrap(),
        ],
        &boot,
    );
    assert!(ok, "{err}");
    assert!(out.contains("3 of 4"), "{out}");
    // The old user PIN no longer opens the token: nobody knows the new one.
    let user_pin = read(&prod.p("hsm/user-pin"));
    let login = Command::new("pkcs11-tool")
        .args([
            "--module",
            "/usr/lib/softhsm/libsofthsm2.so",
            "--token-label",
            "arca-prod",
            "--login",
            "--pin",
        ])
        .arg(&user_pin)
        .arg("--list-objects")
        .env("SOFTHSM2_CONF", prod.p("hsm/softhsm2.conf"))
        .output()
        .unwrap();
    assert!(!login.status.success(), "the pre-ceremony PIN still works");

    // Restart: sealed; three custodians unseal.
    prod.stop();
    prod.start().await;
    let (ok, _, err) = prod.cli(&["key", "list"], &boot);
    assert!(!ok && err.contains("sealed"), "{err}");
    for (i, who) in ["alice", "carol", "dan"].iter().enumerate() {
        let kit = kits.join(who);
        let st = prod.json(
            &[
                "operator",
                "unseal",
                "--share-file",
                kit.join("share").to_str().unwrap(),
                "--totp",
                &totp(&kit, 0),
            ],
            &read(&kit.join("token")),
        );
        assert_eq!(st["sealed"].as_bool(), Some(i < 2), "{st}");
    }

    // A key, then a rotation that waits for three approvals.
    let (ok, _, err) = prod.cli(&["key", "create", "phi/records"], &boot);
    assert!(ok, "{err}");
    let r = prod.json(&["key", "rotate", "phi/records"], &boot);
    let id = r["approval_request"]["id"].as_str().unwrap().to_string();
    let digest = r["approval_request"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let k = prod.json(&["key", "get", "phi/records"], &boot);
    assert_eq!(k["primary_version"], 1);
    for who in ["bob", "alice", "dan"] {
        let kit = kits.join(who);
        // alice and dan used this step's code to unseal: take the next one.
        let offset = if who == "bob" { 0 } else { 1 };
        let (ok, _, err) = prod.cli(
            &[
                "approve",
                &id,
                "--digest",
                &digest,
                "--share-file",
                kit.join("share").to_str().unwrap(),
                "--totp",
                &totp(&kit, offset),
            ],
            &read(&kit.join("token")),
        );
        assert!(ok, "approve as {who}: {err}");
    }
    let k = prod.json(&["key", "get", "phi/records"], &boot);
    assert_eq!(k["primary_version"], 2, "{k}");
    assert_eq!(k["versions"].as_array().unwrap().len(), 2);
}

/// `operator init --age-recipient`: bad recipients and unknown custodians are refused
/// before anything is initialised; alice's share comes back age-encrypted, `age -d`
/// recovers it, and it unseals together with bob's plain share.
#[tokio::test]
async fn init_encrypts_a_share_to_the_custodians_age_key() {
    let mut prod = fresh_prod();
    prod.start().await;
    let boot = read(&prod.p("data/bootstrap-token"));
    let (age_key, recipient) = crate::age::keygen(prod.root.path());
    let so = prod.p("hsm/so-pin");
    let kits = prod.p("kits");
    let init = |extra: &[&str]| {
        let mut args = vec![
            "operator",
            "init",
            "--threshold",
            "2",
            "--custodian",
            "alice",
            "--custodian",
            "bob",
            "--so-pin-file",
            so.to_str().unwrap(),
            "--out-dir",
            kits.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        prod.cli(&args, &boot)
    };

    let unknown = format!("mallory={recipient}");
    // One character changed: the Bech32 checksum no longer matches.
    let last = if recipient.ends_with('q') { 'p' } else { 'q' };
    let corrupt = format!("alice={}{last}", &recipient[..recipient.len() - 1]);
    for bad in [unknown.as_str(), corrupt.as_str()] {
        let (ok, _, err) = init(&["--age-recipient", bad]);
        assert!(!ok && err.contains("age recipient"), "{bad}: {err}");
    }
    let st = prod.json(&["operator", "status"], &boot);
    assert_eq!(st["initialized"].as_bool(), Some(false), "{st}");

    let good = format!("alice={recipient}");
    let (ok, out, err) = init(&["--age-recipient", &good]);
    assert!(ok, "{err}");
    assert!(out.contains("2 of 2"), "{out}");
    let armored = std::fs::read_to_string(kits.join("alice/share")).unwrap();
    assert!(
        armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
        "{armored}"
    );
    let share = crate::age::decrypt(&age_key, &armored);
    std::fs::write(kits.join("alice/share.txt"), &share).unwrap();
    // Tokens, TOTP URIs and bob's share stay plain.
    assert!(read(&kits.join("alice/totp-uri")).starts_with("otpauth://"));
    assert!(!read(&kits.join("bob/share")).contains("AGE"));

    prod.stop();
    prod.start().await;
    for (i, (who, file)) in [("alice", "share.txt"), ("bob", "share")]
        .iter()
        .enumerate()
    {
        let kit = kits.join(who);
        let st = prod.json(
            &[
                "operator",
                "unseal",
                "--share-file",
                kit.join(file).to_str().unwrap(),
                "--totp",
                &totp(&kit, 0),
            ],
            &read(&kit.join("token")),
        );
        assert_eq!(st["sealed"].as_bool(), Some(i < 1), "{st}");
    }
}
