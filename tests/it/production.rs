//! The full production ceremony through the real CLI, over mutual TLS: a token made with
//! `hsm/softhsm/init-token`, `arca server` outside dev mode (sealed, bootstrap token),
//! `arca operator init`, a restart (sealed again), three `arca operator unseal`, a key,
//! `arca key rotate` answering an approval request, and three `arca approve`; and an
//! init whose share for one custodian comes back encrypted to that custodian's `age` key.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::cli::Cli;
use crate::support::hsm::SOFTHSM_MODULE;
use crate::support::pki::make_test_ca;
use crate::support::{age_decrypt, age_keygen, arca_command, CliOutput, Kit, ServerProcess};

/// A production server (no `--dev`) over mutual TLS on its own SoftHSM token, in a
/// temporary directory; restartable.
struct Prod {
    root: tempfile::TempDir,
    server: Option<ServerProcess>,
}

impl Prod {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    async fn start(&mut self) {
        let mut cmd = arca_command();
        cmd.args([
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
        .env("SOFTHSM2_CONF", self.p("hsm/softhsm2.conf"));
        self.server = Some(ServerProcess::spawn(cmd, &self.p("server.log")).await);
    }

    /// SIGTERM; the server must exit 0.
    async fn stop(&mut self) {
        let status = self.server.take().unwrap().stop().await;
        assert!(status.success(), "arca server exit on SIGTERM: {status}");
    }

    /// The CLI over mutual TLS (the `client` certificate) as `token`.
    fn cli(&self, token: &str) -> Cli {
        let addr = self.server.as_ref().unwrap().addr();
        Cli::new(&format!("https://{addr}"), token)
            .env("ARCA_CACERT", self.p("pki/ca.pem"))
            .env("ARCA_CLIENT_CERT", self.p("pki/client.pem"))
            .env("ARCA_CLIENT_KEY", self.p("pki/client.key"))
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

/// A fresh PKI and token (`arca-prod`); the server is not started yet.
fn fresh_prod() -> Prod {
    let root = tempfile::tempdir().unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    make_test_ca(&root.path().join("pki"));
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
    Prod { root, server: None }
}

#[tokio::test]
async fn the_production_ceremony_through_the_cli() {
    let mut prod = fresh_prod();
    prod.start().await;
    let boot = read(&prod.p("data/bootstrap-token"));

    // Not initialised: sealed, and key calls refused.
    let st = prod.cli(&boot).json(&["operator", "status"]).await;
    assert_eq!(
        (st["initialized"].as_bool(), st["sealed"].as_bool()),
        (Some(false), Some(true))
    );
    let CliOutput { ok, err, .. } = prod.cli(&boot).run(&["key", "list"]).await;
    assert!(!ok && err.contains("[SEALED]"), "{err}");

    // The ceremony: 3 of 4, kits written per custodian.
    let so = prod.p("hsm/so-pin");
    let kits = prod.p("kits");
    let CliOutput { ok, out, err } = prod
        .cli(&boot)
        .run(&[
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
        ])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("3 of 4"), "{out}");
    // The old user PIN no longer opens the token: nobody knows the new one.
    let user_pin = read(&prod.p("hsm/user-pin"));
    let login = Command::new("pkcs11-tool")
        .args([
            "--module",
            SOFTHSM_MODULE,
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
    prod.stop().await;
    prod.start().await;
    let CliOutput { ok, err, .. } = prod.cli(&boot).run(&["key", "list"]).await;
    assert!(!ok && err.contains("[SEALED]"), "{err}");
    for (i, who) in ["alice", "carol", "dan"].iter().enumerate() {
        let kit = Kit::read(&kits.join(who));
        let st = prod
            .cli(&kit.token)
            .json(&[
                "operator",
                "unseal",
                "--share-file",
                kit.share_file().to_str().unwrap(),
                "--totp",
                &kit.totp.at(0),
            ])
            .await;
        assert_eq!(st["sealed"].as_bool(), Some(i < 2), "{st}");
    }

    // A key, then a rotation that waits for three approvals.
    let CliOutput { ok, err, .. } = prod.cli(&boot).run(&["key", "create", "phi/records"]).await;
    assert!(ok, "{err}");
    let r = prod
        .cli(&boot)
        .json(&["key", "rotate", "phi/records"])
        .await;
    let id = r["approval_request"]["id"].as_str().unwrap().to_string();
    let digest = r["approval_request"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let k = prod.cli(&boot).json(&["key", "get", "phi/records"]).await;
    assert_eq!(k["primary_version"], 1);
    for who in ["bob", "alice", "dan"] {
        let kit = Kit::read(&kits.join(who));
        // alice and dan used this step's code to unseal: take the next one.
        let offset = if who == "bob" { 0 } else { 1 };
        let CliOutput { ok, err, .. } = prod
            .cli(&kit.token)
            .run(&[
                "approve",
                &id,
                "--digest",
                &digest,
                "--share-file",
                kit.share_file().to_str().unwrap(),
                "--totp",
                &kit.totp.at(offset),
            ])
            .await;
        assert!(ok, "approve as {who}: {err}");
    }
    let k = prod.cli(&boot).json(&["key", "get", "phi/records"]).await;
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
    let (age_key, recipient) = age_keygen(prod.root.path());
    let so = prod.p("hsm/so-pin");
    let kits = prod.p("kits");
    let init = |extra: &[&str]| {
        let args: Vec<String> = [
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
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        let cli = prod.cli(&boot);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli.run(&args).await
        }
    };

    let unknown = format!("mallory={recipient}");
    // One character changed: the Bech32 checksum no longer matches.
    let last = if recipient.ends_with('q') { 'p' } else { 'q' };
    let corrupt = format!("alice={}{last}", &recipient[..recipient.len() - 1]);
    for bad in [unknown.as_str(), corrupt.as_str()] {
        let CliOutput { ok, err, .. } = init(&["--age-recipient", bad]).await;
        assert!(!ok && err.contains("age recipient"), "{bad}: {err}");
    }
    let st = prod.cli(&boot).json(&["operator", "status"]).await;
    assert_eq!(st["initialized"].as_bool(), Some(false), "{st}");

    let good = format!("alice={recipient}");
    let CliOutput { ok, out, err } = init(&["--age-recipient", &good]).await;
    assert!(ok, "{err}");
    assert!(out.contains("2 of 2"), "{out}");
    let armored = std::fs::read_to_string(kits.join("alice/share")).unwrap();
    assert!(
        armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"),
        "{armored}"
    );
    let share = age_decrypt(&age_key, &armored);
    std::fs::write(kits.join("alice/share.txt"), &share).unwrap();
    // Tokens, TOTP URIs and bob's share stay plain.
    assert!(read(&kits.join("alice/totp-uri")).starts_with("otpauth://"));
    assert!(!read(&kits.join("bob/share")).contains("AGE"));

    prod.stop().await;
    prod.start().await;
    for (i, (who, file)) in [("alice", "share.txt"), ("bob", "share")]
        .iter()
        .enumerate()
    {
        let dir = kits.join(who);
        let kit = Kit::read(&dir);
        let st = prod
            .cli(&kit.token)
            .json(&[
                "operator",
                "unseal",
                "--share-file",
                dir.join(file).to_str().unwrap(),
                "--totp",
                &kit.totp.at(0),
            ])
            .await;
        assert_eq!(st["sealed"].as_bool(), Some(i < 1), "{st}");
    }
}

/// The bootstrap admin token exists once in the life of a database and expires: deleting
/// its file and restarting mints no new one, and a token of one's choosing written into
/// the file is not registered (whoever can write the data dir gets no admin token).
#[tokio::test]
async fn the_bootstrap_token_is_minted_once_expires_and_cannot_be_planted() {
    let mut prod = fresh_prod();
    prod.start().await;
    let boot = read(&prod.p("data/bootstrap-token"));
    // (Listing tokens needs an unsealed server; the database says it as well.)
    let expiry = crate::support::sqlite_query(
        &prod.p("data/arca.db"),
        "SELECT expires_at - created_at FROM tokens WHERE description LIKE 'bootstrap%'",
    )
    .unwrap();
    assert_eq!(
        expiry, "86400000",
        "the bootstrap token does not expire in 24 h"
    );
    prod.stop().await;

    // The file deleted: no new token is minted.
    std::fs::remove_file(prod.p("data/bootstrap-token")).unwrap();
    prod.start().await;
    assert!(
        !prod.p("data/bootstrap-token").exists(),
        "a second bootstrap token was minted"
    );
    assert!(
        read(&prod.p("server.log"))
            .contains("no bootstrap token: the bootstrap token was issued once already"),
        "the refusal is not said"
    );
    prod.stop().await;

    // A token of the attacker's choosing planted in the file is not registered.
    let planted = format!("arca_{}", "7".repeat(43));
    std::fs::write(prod.p("data/bootstrap-token"), &planted).unwrap();
    prod.start().await;
    let CliOutput { ok, err, .. } = prod.cli(&planted).run(&["operator", "status"]).await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    // The real one still works.
    let CliOutput { ok, err, .. } = prod.cli(&boot).run(&["operator", "status"]).await;
    assert!(ok, "{err}");
    prod.stop().await;
}
