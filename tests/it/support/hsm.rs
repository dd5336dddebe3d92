//! SoftHSM tokens seen from outside Arca: the objects of a dev token listed through
//! OpenSC's `pkcs11-tool`, and its user PIN reset with the SO PIN, as an operator holding
//! the token would (no Arca code involved). Imports only [`super::server::TestArca`].

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::server::TestArca;

/// SoftHSM's PKCS#11 module (Debian's `softhsm2`).
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// One object as `pkcs11-tool --list-objects` prints it:
/// ```text
/// Secret Key Object; AES length 32
///   label:      arca:2193abf9-3ebc-49d9-9ce2-aedd5f852e5f:v1
///   ID:         645ee3edc372e8f1b3b00e6f4018b2bc
///   Usage:      encrypt, decrypt
///   Access:     sensitive, always sensitive, never extractable, local
/// ```
#[derive(Debug, Default)]
pub struct Object {
    pub header: String,
    fields: Vec<(String, String)>,
}

impl Object {
    /// The value of field `name` (`label`, `ID`, `Usage`, `Access`, …).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_objects(out: &str) -> Vec<Object> {
    let mut objects: Vec<Object> = Vec::new();
    for line in out.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            objects.push(Object {
                header: line.trim().to_string(),
                ..Object::default()
            });
        } else if let (Some(obj), Some((k, v))) = (objects.last_mut(), line.trim().split_once(':'))
        {
            obj.fields
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    objects
}

/// Lists the secret keys of `arca`'s dev token through `pkcs11-tool`, with the user PIN
/// of its data dir (the server may be running).
pub async fn list_secret_keys(arca: &TestArca) -> Vec<Object> {
    let dir = arca.data_dir().to_path_buf();
    let pin = std::fs::read_to_string(dir.join("hsm-pin"))
        .expect("DIR/hsm-pin")
        .trim()
        .to_string();
    secret_keys_with_pin(dir, pin).await
}

/// The `CKA_ID`s (hex) of every secret key on the dev token of data dir `dir`, listed
/// through `pkcs11-tool` with the user PIN `pin`.
pub async fn secret_key_ids(dir: PathBuf, pin: String) -> Vec<String> {
    secret_keys_with_pin(dir, pin)
        .await
        .iter()
        .filter_map(|o| o.field("ID").map(str::to_string))
        .collect()
}

/// Sets the user PIN of the dev token in data dir `dir` with its SO PIN
/// (`DIR/hsm-so-pin`), through `pkcs11-tool`: how an operator holding the SO PIN reaches
/// the objects of a token whose user PIN only the custodians can open.
pub async fn so_set_user_pin(dir: PathBuf, new_pin: String) {
    let so = std::fs::read_to_string(dir.join("hsm-so-pin"))
        .expect("DIR/hsm-so-pin")
        .trim()
        .to_string();
    pkcs11_tool(
        dir,
        vec![
            "--login".into(),
            "--login-type".into(),
            "so".into(),
            "--so-pin".into(),
            so,
            "--init-pin".into(),
            "--new-pin".into(),
            new_pin,
        ],
    )
    .await;
}

async fn secret_keys_with_pin(dir: PathBuf, pin: String) -> Vec<Object> {
    let args = [
        "--login",
        "--pin",
        &pin,
        "--list-objects",
        "--type",
        "secrkey",
    ];
    let out = pkcs11_tool(dir, args.iter().map(|a| a.to_string()).collect()).await;
    parse_objects(&out)
}

/// `pkcs11-tool --module SOFTHSM --token-label arca-dev ARGS` on the dev token of data
/// dir `dir`, off the async runtime; its stdout. Panics when it fails.
async fn pkcs11_tool(dir: PathBuf, args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM_MODULE, "--token-label", "arca-dev"])
            .args(&args)
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .stdin(Stdio::null())
            .output()
            .expect("pkcs11-tool (apt-get install opensc)")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "pkcs11-tool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
