//! The `arca` command line as a client of a running server (ARCA_ADDR / ARCA_TOKEN).

use std::process::{Command, Output, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::support::{arca_bin, TestArca};

async fn arca_cli(arca: &TestArca, args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let (addr, token) = (arca.url(), arca.token().to_string());
    tokio::task::spawn_blocking(move || {
        Command::new(arca_bin())
            .args(&args)
            .env("ARCA_ADDR", addr)
            .env("ARCA_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .expect("run arca")
    })
    .await
    .expect("join")
}

fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

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

    let created = json_of(
        &arca_cli(&arca, &["key", "create", "cli-key", "--output", "json"]).await,
        "key create",
    );
    assert_eq!(created["name"], "cli-key");
    assert_eq!(created["primary_version"], 1);

    let generated = json_of(
        &arca_cli(
            &arca,
            &[
                "datakey",
                "generate",
                "cli-key",
                "--context",
                "tenant=t-1",
                "--output",
                "json",
            ],
        )
        .await,
        "datakey generate",
    );
    let plaintext = b64_field(&generated, "plaintext");
    assert_eq!(plaintext.len(), 32);
    assert_eq!(generated["key_name"], "cli-key");
    assert_eq!(generated["key_version"], 1);
    let wrapped = generated["wrapped_key"]
        .as_str()
        .expect("wrapped_key")
        .to_string();
    assert_eq!(B64.decode(&wrapped).expect("b64").len(), 81);

    let unwrapped = json_of(
        &arca_cli(
            &arca,
            &[
                "unwrap",
                &wrapped,
                "--context",
                "tenant=t-1",
                "--output",
                "json",
            ],
        )
        .await,
        "unwrap",
    );
    assert_eq!(
        b64_field(&unwrapped, "plaintext"),
        plaintext,
        "CLI round trip"
    );
    assert_eq!(unwrapped["key_name"], "cli-key");
    assert_eq!(unwrapped["key_version"], 1);

    // The wrong context fails with a non-zero exit and the gRPC code on stderr; the
    // plaintext is not printed.
    let out = arca_cli(
        &arca,
        &[
            "unwrap",
            &wrapped,
            "--context",
            "tenant=t-2",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(
        !out.status.success(),
        "unwrap with the wrong context succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument"), "stderr: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&B64.encode(&plaintext)));

    // --without-plaintext prints no plaintext, and its wrapped key unwraps.
    let only = json_of(
        &arca_cli(
            &arca,
            &[
                "datakey",
                "generate",
                "cli-key",
                "--without-plaintext",
                "--output",
                "json",
            ],
        )
        .await,
        "datakey generate --without-plaintext",
    );
    assert!(only.get("plaintext").is_none(), "plaintext printed: {only}");
    let w = only["wrapped_key"].as_str().expect("wrapped_key");
    let u = json_of(
        &arca_cli(&arca, &["unwrap", w, "--output", "json"]).await,
        "unwrap 2",
    );
    assert_eq!(b64_field(&u, "plaintext").len(), 32);

    // A bad token is refused.
    let out = tokio::task::spawn_blocking({
        let addr = arca.url();
        move || {
            Command::new(arca_bin())
                .args(["key", "list", "--output", "json"])
                .env("ARCA_ADDR", addr)
                .env("ARCA_TOKEN", "arca_wrong")
                .stdin(Stdio::null())
                .output()
                .expect("run arca")
        }
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
}
