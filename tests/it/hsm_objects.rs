//! Key versions live in the HSM as sensitive, never-extractable AES-256 token objects
//! labelled `arca:<key-id>:v<n>`: read back through PKCS#11 with OpenSC's `pkcs11-tool`,
//! independently of Arca's own code.

use crate::support::hsm::{list_secret_keys, Object};
use crate::support::{create_key, rotate, TestArca};

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
