//! The `arca` command line as a client of a running server (ARCA_ADDR / ARCA_TOKEN).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::support::TestArca;

fn b64_field(v: &Value, field: &str) -> Vec<u8> {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string {field:?} in {v}"));
    B64.decode(s)
        .unwrap_or_else(|e| panic!("{field} is not base64: {e}"))
}

#[tokio::test]
async fn cli_round_trips_a_data_key() {
    let arca = TestArca::start().await;

    let created = arca
        .cli(arca.token())
        .json(&["key", "create", "cli-key"])
        .await;
    assert_eq!(created["name"], "cli-key");
    assert_eq!(created["primary_version"], 1);

    let generated = arca
        .cli(arca.token())
        .json(&["datakey", "generate", "cli-key", "--context", "tenant=t-1"])
        .await;
    let plaintext = b64_field(&generated, "plaintext");
    assert_eq!(plaintext.len(), 32);
    assert_eq!(generated["key_name"], "cli-key");
    assert_eq!(generated["key_version"], 1);
    let wrapped = generated["wrapped_key"]
        .as_str()
        .expect("wrapped_key")
        .to_string();
    assert_eq!(B64.decode(&wrapped).expect("b64").len(), 81);

    let unwrapped = arca
        .cli(arca.token())
        .json(&["unwrap", &wrapped, "--context", "tenant=t-1"])
        .await;
    assert_eq!(
        b64_field(&unwrapped, "plaintext"),
        plaintext,
        "CLI round trip"
    );
    assert_eq!(unwrapped["key_name"], "cli-key");
    assert_eq!(unwrapped["key_version"], 1);

    // The wrong context fails with a non-zero exit and the gRPC code on stderr; the
    // plaintext is not printed.
    let out = arca
        .cli(arca.token())
        .run(&[
            "unwrap",
            &wrapped,
            "--context",
            "tenant=t-2",
            "--output",
            "json",
        ])
        .await;
    assert!(!out.ok, "unwrap with the wrong context succeeded");
    assert!(out.err.contains("InvalidArgument"), "stderr: {}", out.err);
    assert!(!out.out.contains(&B64.encode(&plaintext)));

    // --without-plaintext prints no plaintext, and its wrapped key unwraps.
    let only = arca
        .cli(arca.token())
        .json(&["datakey", "generate", "cli-key", "--without-plaintext"])
        .await;
    assert!(only.get("plaintext").is_none(), "plaintext printed: {only}");
    let w = only["wrapped_key"].as_str().expect("wrapped_key");
    let u = arca.cli(arca.token()).json(&["unwrap", w]).await;
    assert_eq!(b64_field(&u, "plaintext").len(), 32);

    // A bad token is refused.
    let out = arca
        .cli("arca_wrong")
        .run(&["key", "list", "--output", "json"])
        .await;
    assert!(!out.ok);
    assert!(out.err.contains("Unauthenticated"));
}
