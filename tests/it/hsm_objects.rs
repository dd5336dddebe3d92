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
        } else if let (Some(obj), Some((k, v))) = (objects.last_mut(), line.trim().split_once(':')) {
            obj.fields.push((k.trim().to_string(), v.trim().to_string()));
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

    let dir = arca.data_dir().to_path_buf();
    let pin = std::fs::read_to_string(dir.join("hsm-pin"))
        .expect("DIR/hsm-pin")
        .trim()
        .to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM_MODULE, "--token-label", "arca-dev", "--login", "--pin"])
            .arg(&pin)
            .args(["--list-objects", "--type", "secrkey"])
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .stdin(Stdio::null())
            .output()
            .expect("pkcs11-tool (apt-get install opensc)")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pkcs11-tool failed: {stderr}");
    let objects = parse_objects(&stdout);

    for v in [1, 2] {
        let label = format!("arca:{}:v{v}", key.id);
        let found: Vec<&Object> = objects
            .iter()
            .filter(|o| o.field("label") == Some(label.as_str()))
            .collect();
        assert_eq!(found.len(), 1, "objects labelled {label} in:\n{stdout}");
        let o = found[0];
        assert_eq!(o.header, "Secret Key Object; AES length 32", "{label}");
        let access: Vec<&str> = o
            .field("Access")
            .unwrap_or_else(|| panic!("no Access line for {label}:\n{stdout}"))
            .split(',')
            .map(str::trim)
            .collect();
        assert!(access.contains(&"sensitive"), "{label} not sensitive: {access:?}");
        assert!(access.contains(&"always sensitive"), "{label} not always sensitive: {access:?}");
        assert!(access.contains(&"never extractable"), "{label} not never-extractable: {access:?}");
        assert!(!access.contains(&"extractable"), "{label} is extractable: {access:?}");
        assert!(access.contains(&"local"), "{label} not generated in the HSM: {access:?}");
        let usage = o.field("Usage").unwrap_or_default();
        assert!(usage.contains("encrypt") && usage.contains("decrypt"), "{label} usage: {usage}");
        assert_eq!(o.field("ID").map(str::len), Some(32), "{label} CKA_ID of 16 bytes");
    }
    // The key value itself cannot be read.
    assert!(
        !stdout.contains("VALUE") && !stdout.to_lowercase().contains("value:"),
        "pkcs11-tool printed a key value:\n{stdout}"
    );
    // Distinct versions are distinct objects.
    let ids: std::collections::HashSet<_> = objects.iter().filter_map(|o| o.field("ID")).collect();
    assert!(ids.len() >= 2, "{stdout}");
}
