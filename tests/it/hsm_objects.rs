//! Key versions live in the HSM as sensitive, never-extractable AES-256 token objects
//! labelled `arca:<key-id>:v<n>`: read back through PKCS#11 with OpenSC's `pkcs11-tool`,
//! independently of Arca's own code.

use std::process::{Command, Stdio};

use crate::support::{create_key, rotate, TestArca};

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
struct Object {
    header: String,
    fields: Vec<(String, String)>,
}

impl Object {
    fn field(&self, name: &str) -> Option<&str> {
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

#[tokio::test]
async fn key_version_objects_are_sensitive_and_never_extractable() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    let key = create_key(&mut c, "hsm-resident").await;
    rotate(&mut c, "hsm-resident").await;

    let objects = list_secret_keys(&arca).await;

    for v in [1, 2] {
        let label = format!("arca:{}:v{v}", key.id);
        let found: Vec<&Object> = objects
            .iter()
            .filter(|o| o.field("label") == Some(label.as_str()))
            .collect();
        assert_eq!(found.len(), 1, "objects labelled {label} in: {objects:?}");
        let o = found[0];
        assert_eq!(o.header, "Secret Key Object; AES length 32", "{label}");
        let access: Vec<&str> = o
            .field("Access")
            .unwrap_or_else(|| panic!("no Access line for {label}: {o:?}"))
            .split(',')
            .map(str::trim)
            .collect();
        assert!(
            access.contains(&"sensitive"),
            "{label} not sensitive: {access:?}"
        );
        assert!(
            access.contains(&"always sensitive"),
            "{label} not always sensitive: {access:?}"
        );
        assert!(
            access.contains(&"never extractable"),
            "{label} not never-extractable: {access:?}"
        );
        assert!(
            !access.contains(&"extractable"),
            "{label} is extractable: {access:?}"
        );
        assert!(
            access.contains(&"local"),
            "{label} not generated in the HSM: {access:?}"
        );
        let usage = o.field("Usage").unwrap_or_default();
        assert!(
            usage.contains("encrypt") && usage.contains("decrypt"),
            "{label} usage: {usage}"
        );
        assert_eq!(
            o.field("ID").map(str::len),
            Some(32),
            "{label} CKA_ID of 16 bytes"
        );
    }
    // The key value itself was not printed.
    assert!(
        objects
            .iter()
            .all(|o| o.field("VALUE").is_none() && o.field("Value").is_none()),
        "pkcs11-tool printed a key value: {objects:?}"
    );
    // Distinct versions are distinct objects.
    let ids: std::collections::HashSet<_> = objects.iter().filter_map(|o| o.field("ID")).collect();
    assert!(ids.len() >= 2, "{objects:?}");
}

/// Lists the token's secret keys through `pkcs11-tool` (the server may be running).
async fn list_secret_keys(arca: &TestArca) -> Vec<Object> {
    let dir = arca.data_dir().to_path_buf();
    let pin = std::fs::read_to_string(dir.join("hsm-pin"))
        .expect("DIR/hsm-pin")
        .trim()
        .to_string();
    secret_keys_with_pin(dir, pin).await
}

/// The `CKA_ID`s (hex) of every secret key on the dev token of data dir `dir`, listed
/// through `pkcs11-tool` with the user PIN `pin`.
pub(crate) async fn secret_key_ids(dir: std::path::PathBuf, pin: String) -> Vec<String> {
    secret_keys_with_pin(dir, pin)
        .await
        .iter()
        .filter_map(|o| o.field("ID").map(str::to_string))
        .collect()
}

/// Sets the user PIN of the dev token in data dir `dir` with its SO PIN
/// (`DIR/hsm-so-pin`), through `pkcs11-tool`: how an operator holding the SO PIN reaches
/// the objects of a token whose user PIN only the custodians can open.
pub(crate) async fn so_set_user_pin(dir: std::path::PathBuf, new_pin: String) {
    let so = std::fs::read_to_string(dir.join("hsm-so-pin"))
        .expect("DIR/hsm-so-pin")
        .trim()
        .to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM_MODULE, "--token-label", "arca-dev"])
            .args(["--login", "--login-type", "so", "--so-pin"])
            .arg(&so)
            .args(["--init-pin", "--new-pin"])
            .arg(&new_pin)
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .stdin(Stdio::null())
            .output()
            .expect("pkcs11-tool (apt-get install opensc)")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "pkcs11-tool --init-pin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn secret_keys_with_pin(dir: std::path::PathBuf, pin: String) -> Vec<Object> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("pkcs11-tool")
            .args([
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "arca-dev",
                "--login",
                "--pin",
            ])
            .arg(&pin)
            .args(["--list-objects", "--type", "secrkey"])
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
    parse_objects(&String::from_utf8_lossy(&out.stdout))
}

#[tokio::test]
async fn failed_and_raced_creates_leave_no_orphan_hsm_objects() {
    use arca::grpc::pb;
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "solo").await;
    rotate(&mut c, "solo").await;

    // Eight concurrent creates of one name: one key, and no HSM object left by the losers.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut c = c.clone();
        set.spawn(async move {
            c.create_key(pb::CreateKeyRequest {
                name: "contended".into(),
                description: String::new(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().id)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(id) = r.expect("join") {
            winners.push(id);
        }
    }
    assert_eq!(winners.len(), 1, "racing creates");
    // Creates refused before reaching the HSM.
    for _ in 0..3 {
        let r = c
            .create_key(pb::CreateKeyRequest {
                name: "solo".into(),
                description: String::new(),
                ..Default::default()
            })
            .await;
        assert!(r.is_err());
    }

    let keys = c
        .list_keys(pb::ListKeysRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("ListKeys")
        .into_inner()
        .keys;
    let mut expected: Vec<String> = keys
        .iter()
        .flat_map(|k| {
            k.versions
                .iter()
                .map(move |v| format!("arca:{}:v{}", k.id, v.version))
        })
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 3, "solo v1, v2 and contended v1");

    let objects = list_secret_keys(&arca).await;
    let mut labels: Vec<String> = objects
        .iter()
        .filter_map(|o| o.field("label"))
        .filter(|l| {
            // Key-version objects only (not system keys such as arca:meta).
            l.strip_prefix("arca:")
                .and_then(|rest| rest.rsplit_once(":v"))
                .is_some_and(|(id, n)| {
                    uuid::Uuid::parse_str(id).is_ok() && n.parse::<u32>().is_ok()
                })
        })
        .map(str::to_string)
        .collect();
    labels.sort();
    assert_eq!(
        labels, expected,
        "key-version objects in the token vs versions in the database"
    );
}
