//! Dual control: sealed start, K-of-N unseal by custodians with TOTP, and the checks on
//! every share (DESIGN §2). Servers run with `--custodians 5 --threshold 3`, which writes
//! each custodian's kit (share, token, TOTP URI) under `DATA/custodians/NAME/`.

use arca::grpc::pb;
use arca::grpc::pb::quorum_service_client::QuorumServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::support::{ctx, TestArca};

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type QuorumClient = QuorumServiceClient<InterceptedService<Channel, Bearer>>;

pub(crate) struct Kit {
    share: String,
    token: String,
    totp_secret: Vec<u8>,
}

pub(crate) fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => continue,
        };
        buf = (buf << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

fn kit(arca: &TestArca, n: u32) -> Kit {
    let dir = arca
        .data_dir()
        .join("custodians")
        .join(format!("custodian-{n}"));
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    let uri = read("totp-uri");
    let secret = uri
        .split("secret=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .unwrap();
    Kit {
        share: read("share"),
        token: read("token"),
        totp_secret: base32_decode(secret),
    }
}

fn now_ms() -> i64 {
    use arca::clock::Clock;
    arca::clock::SystemClock.now_ms()
}

/// A TOTP code `offset` steps from now.
fn code(k: &Kit, offset: i64) -> String {
    let step = arca::quorum::totp::step_at(now_ms()) + offset;
    arca::quorum::totp::hotp(&k.totp_secret, step as u64)
}

async fn quorum_client(arca: &TestArca, token: &str) -> QuorumClient {
    let v = format!("Bearer {token}").parse().unwrap();
    QuorumServiceClient::with_interceptor(arca.channel().await, Bearer(v))
}

async fn unseal(
    arca: &TestArca,
    k: &Kit,
    share: &str,
    code: String,
) -> Result<pb::SealStatusResponse, Status> {
    quorum_client(arca, &k.token)
        .await
        .unseal(pb::UnsealRequest {
            share: share.to_string(),
            totp: code,
        })
        .await
        .map(|r| r.into_inner())
}

async fn status(arca: &TestArca) -> pb::SealStatusResponse {
    quorum_client(arca, arca.token())
        .await
        .seal_status(pb::SealStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn three_of_five() -> TestArca {
    TestArca::builder()
        .arg("--custodians")
        .arg("5")
        .arg("--threshold")
        .arg("3")
        .start()
        .await
}

/// Unseal submissions by `custodians`, each with the TOTP code `offset` steps from now
/// (a code is accepted once: a custodian submitting twice within one step uses the next).
async fn unseal_with(arca: &TestArca, custodians: &[u32], offset: i64) {
    for &n in custodians {
        let k = kit(arca, n);
        unseal(arca, &k, &k.share, code(&k, offset)).await.unwrap();
    }
}

async fn assert_sealed(arca: &TestArca) {
    let err = arca
        .client()
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "sealed");
    // Token administration is closed too: only status and unseal answer.
    let mut req = tonic::Request::new(pb::ListTokensRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", arca.token()).parse().unwrap(),
    );
    let err = arca::grpc::pb::access_service_client::AccessServiceClient::new(arca.channel().await)
        .list_tokens(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(status(arca).await.sealed);
}

#[tokio::test]
async fn three_of_five_unseals_and_keys_survive_restart() {
    let mut arca = three_of_five().await;
    assert_sealed(&arca).await;
    let mut health = arca.health().await;
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    unseal_with(&arca, &[1, 3, 5], 0).await;
    let st = status(&arca).await;
    assert!(!st.sealed && st.initialized);
    assert_eq!((st.threshold, st.shares), (3, 5));

    let mut c = arca.client().await;
    c.create_key(pb::CreateKeyRequest {
        name: "phi".into(),
        description: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dk = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "phi".into(),
            context: ctx(&[("t", "1")]),
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();

    arca.restart().await;
    assert_sealed(&arca).await;
    // Two shares do not unseal.
    unseal_with(&arca, &[2, 4], 0).await;
    let st = status(&arca).await;
    assert!(st.sealed);
    assert_eq!(st.progress, ["custodian-2", "custodian-4"]);
    assert_sealed(&arca).await;
    // The third does; a blob made before the restart unwraps.
    unseal_with(&arca, &[5], 1).await;
    assert!(!status(&arca).await.sealed);
    let back = arca
        .client()
        .await
        .unwrap_key(pb::UnwrapKeyRequest {
            wrapped_key: dk.wrapped_key,
            context: ctx(&[("t", "1")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, dk.plaintext);

    // Seal closes the HSM at once.
    quorum_client(&arca, &kit(&arca, 1).token)
        .await
        .seal(pb::SealRequest {})
        .await
        .unwrap();
    assert_sealed(&arca).await;
}

#[tokio::test]
async fn bad_submissions_are_rejected_and_change_nothing() {
    let arca = three_of_five().await;
    let (k1, k2) = (kit(&arca, 1), kit(&arca, 2));

    // A corrupted share (one hex digit changed).
    let mut bad = k1.share.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
    let e = unseal(&arca, &k1, std::str::from_utf8(&bad).unwrap(), code(&k1, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("share rejected"), "{e:?}");
    // Another custodian's share under custodian-1's identity.
    let e = unseal(&arca, &k1, &k2.share, code(&k1, 1))
        .await
        .unwrap_err();
    assert!(e.message().contains("share rejected"), "{e:?}");
    // A wrong TOTP code.
    let e = unseal(&arca, &k1, &k1.share, "000000".into()).await;
    if let Err(e) = e {
        assert!(e.message().contains("TOTP"), "{e:?}");
    }
    assert!(status(&arca).await.progress.is_empty());

    // A good share; then the same custodian again, and a replayed code.
    let used = code(&k2, 0);
    unseal(&arca, &k2, &k2.share, used.clone()).await.unwrap();
    let e = unseal(&arca, &k2, &k2.share, code(&k2, 1))
        .await
        .unwrap_err();
    assert!(e.message().contains("already submitted"), "{e:?}");
    let e = unseal(&arca, &k2, &k2.share, used).await.unwrap_err();
    assert!(e.message().contains("TOTP"), "{e:?}");
    assert_eq!(status(&arca).await.progress, ["custodian-2"]);

    // Someone who is not a custodian cannot submit a share.
    let e = quorum_client(&arca, arca.token())
        .await
        .unseal(pb::UnsealRequest {
            share: k1.share.clone(),
            totp: code(&k1, 0),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(status(&arca).await.progress, ["custodian-2"]);
    assert!(status(&arca).await.sealed);
}

#[tokio::test]
async fn five_failures_lock_a_custodian_out() {
    let arca = three_of_five().await;
    let k = kit(&arca, 3);
    for _ in 0..5 {
        let e = unseal(&arca, &k, &k.share, "123456".into()).await;
        // 123456 could be the current code by chance; then this loop makes no failure.
        if e.is_ok() {
            return;
        }
    }
    let e = unseal(&arca, &k, &k.share, code(&k, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("locked out"), "{e:?}");
    assert!(status(&arca).await.progress.is_empty());
}

#[tokio::test]
async fn no_share_token_or_totp_secret_at_rest_or_in_logs() {
    let arca = three_of_five().await;
    unseal_with(&arca, &[1, 2, 3], 0).await;
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for n in 1..=5 {
        let k = kit(&arca, n);
        let hexpart = k.share.rsplit(':').next().unwrap().to_string();
        needles.push(hexpart.clone().into_bytes());
        needles.push(hex::decode(&hexpart).unwrap());
        needles.push(k.token.clone().into_bytes());
        needles.push(k.totp_secret.clone());
    }
    let mut haystacks: Vec<(String, Vec<u8>)> = arca.stored_bytes();
    haystacks.push(("log".into(), arca.all_logs().into_bytes()));
    for (name, hay) in &haystacks {
        for needle in &needles {
            assert!(
                !hay.windows(needle.len()).any(|w| w == needle.as_slice()),
                "a secret appears in {name}"
            );
        }
    }
    // And the user PIN file is gone: after init nobody knows the PIN.
    assert!(!arca.data_dir().join("hsm-pin").exists());
}

#[tokio::test]
async fn the_ceremony_through_the_cli() {
    let arca = three_of_five().await;
    let run = |args: &[&str], token: &str| {
        let out = std::process::Command::new(crate::support::arca_bin())
            .args(args)
            .env("ARCA_ADDR", arca.url())
            .env("ARCA_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, _) = run(&["operator", "status", "--output", "json"], arca.token());
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sealed"], true);
    for n in [2, 3, 4] {
        let k = kit(&arca, n);
        let share_file = arca
            .data_dir()
            .join("custodians")
            .join(format!("custodian-{n}"))
            .join("share");
        let (ok, out, err) = run(
            &[
                "operator",
                "unseal",
                "--share-file",
                share_file.to_str().unwrap(),
                "--totp",
                &code(&k, 0),
                "--output",
                "json",
            ],
            &k.token,
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["sealed"], n != 4);
    }
    let (ok, _, err) = run(&["key", "create", "after-unseal"], arca.token());
    assert!(ok, "{err}");
}

fn kit_from_pb(k: &pb::CustodianKit) -> Kit {
    let secret = k
        .totp_uri
        .split("secret=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .unwrap();
    Kit {
        share: k.share.clone(),
        token: k.token.clone(),
        totp_secret: base32_decode(secret),
    }
}

/// Rekey (DESIGN §2): 3-of-5 → 2-of-3 (new-1..3), approved by three old custodians. The
/// executing approval alone receives the new kits; afterwards old shares and tokens are
/// refused, two new kits unseal, earlier blobs still unwrap, and no new share is at rest
/// or in a log.
#[tokio::test]
async fn rekey_to_two_of_three_hands_new_kits_to_the_executing_approval() {
    let mut arca = three_of_five().await;
    unseal_with(&arca, &[1, 2, 3], 0).await;
    let mut c = arca.client().await;
    c.create_key(pb::CreateKeyRequest {
        name: "phi".into(),
        description: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dk = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "phi".into(),
            context: ctx(&[("t", "1")]),
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();

    let new_names: Vec<String> = (1..=3).map(|i| format!("new-{i}")).collect();
    let mut admin = quorum_client(&arca, arca.token()).await;
    // Parameters are checked up front.
    for (threshold, custodians, shares) in [
        (1, new_names.clone(), 0),
        (4, new_names.clone(), 0),
        (2, vec!["new-1".to_string(), "new-1".to_string()], 0),
        (2, new_names.clone(), 5),
    ] {
        let e = admin
            .rekey(pb::RekeyRequest {
                threshold,
                custodians,
                shares,
                age_recipients: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // new-1 takes its new share encrypted to an age key; an unknown name is refused.
    let age_dir = tempfile::tempdir().unwrap();
    let identity = age_dir.path().join("new-1.key");
    let keygen = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let recipient = std::fs::read_to_string(&identity)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .unwrap();
    let e = admin
        .rekey(pb::RekeyRequest {
            threshold: 2,
            custodians: new_names.clone(),
            shares: 3,
            age_recipients: [("mallory".to_string(), recipient.clone())].into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let req = admin
        .rekey(pb::RekeyRequest {
            threshold: 2,
            custodians: new_names.clone(),
            shares: 3,
            age_recipients: [("new-1".to_string(), recipient.clone())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        req.parameters.get("age.new-1"),
        Some(&recipient),
        "covered by the digest"
    );
    assert_eq!(req.operation, "Rekey");
    assert_eq!(req.state, "PENDING");
    assert_eq!(req.threshold, 3);
    assert!(req.new_kits.is_empty());

    let approve = |n: u32, offset: i64| {
        let (id, digest) = (req.id.clone(), req.digest.clone());
        let arca = &arca;
        async move {
            let k = kit(arca, n);
            quorum_client(arca, &k.token)
                .await
                .approve(pb::ApproveRequest {
                    id,
                    digest,
                    share: k.share.clone(),
                    totp: code(&k, offset),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Each custodian used step 0 to unseal: step +1 now.
    for n in [1, 2] {
        let r = approve(n, 1).await;
        assert_eq!(r.state, "PENDING");
        assert!(r.new_kits.is_empty());
    }
    assert_eq!(status(&arca).await.threshold, 3);
    let done = approve(3, 1).await;
    assert_eq!(done.state, "EXECUTED");
    assert_eq!(done.outcome, "rekeyed to 2 of 3, generation 2");
    assert_eq!(
        done.new_kits
            .iter()
            .map(|k| k.custodian.as_str())
            .collect::<Vec<_>>(),
        ["new-1", "new-2", "new-3"]
    );
    let mut new_kits: Vec<Kit> = done.new_kits.iter().map(kit_from_pb).collect();
    // new-1's share is age-encrypted; `age -d` with its identity recovers it.
    assert!(new_kits[0]
        .share
        .starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    let mut dec = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&identity)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        dec.stdin
            .take()
            .unwrap()
            .write_all(new_kits[0].share.as_bytes())
            .unwrap();
    }
    let out = dec.wait_with_output().unwrap();
    assert!(out.status.success());
    new_kits[0].share = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let debug = format!("{done:?}");
    for k in &new_kits {
        assert!(k.share.starts_with("arca-share-v1:"));
        assert!(!debug.contains(&k.share) && !debug.contains(&k.token));
    }
    // Afterwards the request shows its outcome, and no kit.
    let shown = admin
        .get_request(pb::GetRequestRequest { id: req.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.outcome, "rekeyed to 2 of 3, generation 2");
    assert!(shown.new_kits.is_empty());
    let st = status(&arca).await;
    assert_eq!((st.threshold, st.shares, st.sealed), (2, 3, false));
    // Old custodian tokens are refused at once.
    for n in 1..=5 {
        let e = quorum_client(&arca, &kit(&arca, n).token)
            .await
            .seal_status(pb::SealStatusRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }

    arca.restart().await;
    assert_sealed(&arca).await;
    // Old shares no longer unseal: with the old tokens (refused), or under a new
    // custodian's identity (they fail the new generation's commitments).
    let old = kit(&arca, 4);
    let e = unseal(&arca, &old, &old.share, code(&old, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = unseal(&arca, &new_kits[0], &old.share, code(&new_kits[0], 0))
        .await
        .unwrap_err();
    assert!(e.message().contains("share rejected"), "{e:?}");
    assert_sealed(&arca).await;
    // Two of the new kits unseal.
    for k in &new_kits[1..] {
        unseal(&arca, k, &k.share, code(k, 0)).await.unwrap();
    }
    assert!(!status(&arca).await.sealed);
    // A blob wrapped before the rekey still unwraps.
    let back = arca
        .client()
        .await
        .unwrap_key(pb::UnwrapKeyRequest {
            wrapped_key: dk.wrapped_key,
            context: ctx(&[("t", "1")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, dk.plaintext);
    // A new custodian's token works.
    quorum_client(&arca, &new_kits[0].token)
        .await
        .seal_status(pb::SealStatusRequest {})
        .await
        .unwrap();

    // No new share (in any form), token or TOTP secret at rest or in the logs.
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, k) in new_kits.iter().enumerate() {
        let hexpart = k.share.rsplit(':').next().unwrap().to_string();
        needles.push((format!("new share {i}"), k.share.clone().into_bytes()));
        needles.push((format!("new share {i} (hex)"), hexpart.clone().into_bytes()));
        needles.push((
            format!("new share {i} (hex, upper)"),
            hexpart.to_uppercase().into_bytes(),
        ));
        needles.push((
            format!("new share {i} (y raw)"),
            hex::decode(&hexpart).unwrap(),
        ));
        needles.push((format!("new token {i}"), k.token.clone().into_bytes()));
        needles.push((format!("new totp secret {i}"), k.totp_secret.clone()));
    }
    let mut haystacks: Vec<(String, Vec<u8>)> = arca.stored_bytes();
    haystacks.push(("log".into(), arca.all_logs().into_bytes()));
    for (name, hay) in &haystacks {
        for (what, needle) in &needles {
            assert!(
                !hay.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{what} appears in {name}"
            );
        }
    }
}
