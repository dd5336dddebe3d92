//! Dual control: sealed start, K-of-N unseal by custodians with TOTP, and the checks on
//! every share (DESIGN §2). Servers run with `--custodians 5 --threshold 3`, which writes
//! each custodian's kit (share, token, TOTP URI) under `DATA/custodians/NAME/`.

use arca::grpc::pb;
use tonic::{Code, Status};

use crate::support::{
    age_decrypt, age_keygen, assert_absent, create_key, ctx, generate, reason, three_of_five,
    unwrap, CliOutput, Db, Kit, TestArca,
};

async fn unseal(
    arca: &TestArca,
    k: &Kit,
    share: &str,
    code: String,
) -> Result<pb::SealStatusResponse, Status> {
    arca.quorum(&k.token)
        .await
        .unseal(pb::UnsealRequest {
            share: share.to_string(),
            totp: code,
        })
        .await
        .map(|r| r.into_inner())
}

async fn status(arca: &TestArca) -> pb::SealStatusResponse {
    arca.quorum(arca.token())
        .await
        .seal_status(pb::SealStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Unseal submissions by `custodians`, each with the TOTP code `offset` steps from now
/// (a code is accepted once: a custodian submitting twice within one step uses the next).
async fn unseal_with(arca: &TestArca, custodians: &[usize], offset: i64) {
    for &n in custodians {
        let k = Kit::custodian(arca, n);
        unseal(arca, &k, &k.share, k.totp.at(offset)).await.unwrap();
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
    assert_eq!(reason(&err), Some("SEALED"), "{err:?}");
    // Token administration is closed too: only status and unseal answer.
    let err = arca
        .access(arca.token())
        .await
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(status(arca).await.sealed);
}

#[tokio::test]
async fn three_of_five_unseals_and_keys_survive_restart() {
    let mut arca = three_of_five(Db::default()).start().await;
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
    create_key(&mut c, "phi").await;
    let dk = generate(&mut c, "phi", &ctx(&[("t", "1")])).await;

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
    let back = unwrap(
        &mut arca.client().await,
        &dk.wrapped_key,
        &ctx(&[("t", "1")]),
    )
    .await
    .unwrap();
    assert_eq!(back.plaintext, dk.plaintext);

    // Seal closes the HSM at once.
    arca.quorum(&Kit::custodian(&arca, 1).token)
        .await
        .seal(pb::SealRequest {})
        .await
        .unwrap();
    assert_sealed(&arca).await;
}

#[tokio::test]
async fn bad_submissions_are_rejected_and_change_nothing() {
    let arca = three_of_five(Db::default()).start().await;
    let (k1, k2) = (Kit::custodian(&arca, 1), Kit::custodian(&arca, 2));

    // A corrupted share (one hex digit changed).
    let mut bad = k1.share.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
    let e = unseal(
        &arca,
        &k1,
        std::str::from_utf8(&bad).unwrap(),
        k1.totp.at(0),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), Some("SHARE_REJECTED"), "{e:?}");
    // Another custodian's share under custodian-1's identity.
    let e = unseal(&arca, &k1, &k2.share, k1.totp.at(1))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), Some("SHARE_REJECTED"), "{e:?}");
    // A wrong TOTP code.
    let e = unseal(&arca, &k1, &k1.share, "000000".into()).await;
    if let Err(e) = e {
        assert_eq!(reason(&e), Some("TOTP_REJECTED"), "{e:?}");
    }
    assert!(status(&arca).await.progress.is_empty());

    // A good share; then the same custodian again, and a replayed code.
    let used = k2.totp.at(0);
    unseal(&arca, &k2, &k2.share, used.clone()).await.unwrap();
    let e = unseal(&arca, &k2, &k2.share, k2.totp.at(1))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), Some("DUPLICATE_SHARE"), "{e:?}");
    let e = unseal(&arca, &k2, &k2.share, used).await.unwrap_err();
    assert_eq!(reason(&e), Some("TOTP_REJECTED"), "{e:?}");
    assert_eq!(status(&arca).await.progress, ["custodian-2"]);

    // Someone who is not a custodian cannot submit a share.
    let e = arca
        .quorum(arca.token())
        .await
        .unseal(pb::UnsealRequest {
            share: k1.share.clone(),
            totp: k1.totp.at(0),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(status(&arca).await.progress, ["custodian-2"]);
    assert!(status(&arca).await.sealed);
}

#[tokio::test]
async fn five_failures_lock_a_custodian_out() {
    let arca = three_of_five(Db::default()).start().await;
    let k = Kit::custodian(&arca, 3);
    for _ in 0..5 {
        let e = unseal(&arca, &k, &k.share, "123456".into()).await;
        // 123456 could be the current code by chance; then this loop makes no failure.
        if e.is_ok() {
            return;
        }
    }
    let e = unseal(&arca, &k, &k.share, k.totp.at(0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(reason(&e), Some("LOCKED_OUT"), "{e:?}");
    assert!(status(&arca).await.progress.is_empty());
}

#[tokio::test]
async fn no_share_token_or_totp_secret_at_rest_or_in_logs() {
    let arca = three_of_five(Db::default()).start().await;
    unseal_with(&arca, &[1, 2, 3], 0).await;
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 1..=5 {
        let k = Kit::custodian(&arca, n);
        let hexpart = k.share.rsplit(':').next().unwrap().to_string();
        needles.push((format!("share {n} (hex)"), hexpart.clone().into_bytes()));
        needles.push((format!("share {n} (y raw)"), hex::decode(&hexpart).unwrap()));
        needles.push((format!("token {n}"), k.token.clone().into_bytes()));
        needles.push((format!("totp secret {n}"), k.totp.secret().to_vec()));
    }
    assert_absent(&needles, &arca.stored_bytes_and_logs());
    // And the user PIN file is gone: after init nobody knows the PIN.
    assert!(!arca.data_dir().join("hsm-pin").exists());
}

#[tokio::test]
async fn the_ceremony_through_the_cli() {
    let arca = three_of_five(Db::default()).start().await;
    let v = arca.cli(arca.token()).json(&["operator", "status"]).await;
    assert_eq!(v["sealed"], true);
    for n in [2, 3, 4] {
        let k = Kit::custodian(&arca, n);
        let v = arca
            .cli(&k.token)
            .json(&[
                "operator",
                "unseal",
                "--share-file",
                k.share_file().to_str().unwrap(),
                "--totp",
                &k.totp.at(0),
            ])
            .await;
        assert_eq!(v["sealed"], n != 4);
    }
    let CliOutput { ok, err, .. } = arca
        .cli(arca.token())
        .run(&["key", "create", "after-unseal"])
        .await;
    assert!(ok, "{err}");
}

/// Rekey (DESIGN §2): 3-of-5 → 2-of-3 (new-1..3), approved by three old custodians. The
/// executing approval alone receives the new kits; afterwards old shares and tokens are
/// refused, two new kits unseal, earlier blobs still unwrap, and no new share is at rest
/// or in a log.
#[tokio::test]
async fn rekey_to_two_of_three_hands_new_kits_to_the_executing_approval() {
    let mut arca = three_of_five(Db::default()).start().await;
    unseal_with(&arca, &[1, 2, 3], 0).await;
    let mut c = arca.client().await;
    create_key(&mut c, "phi").await;
    let dk = generate(&mut c, "phi", &ctx(&[("t", "1")])).await;

    let new_names: Vec<String> = (1..=3).map(|i| format!("new-{i}")).collect();
    let mut admin = arca.quorum(arca.token()).await;
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
    let (identity, recipient) = age_keygen(age_dir.path());
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

    let approve = |n: usize, offset: i64| {
        let (id, digest) = (req.id.clone(), req.digest.clone());
        let arca = &arca;
        async move {
            let k = Kit::custodian(arca, n);
            arca.quorum(&k.token)
                .await
                .approve(pb::ApproveRequest {
                    id,
                    digest,
                    share: k.share.clone(),
                    totp: k.totp.at(offset),
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
    let mut new_kits: Vec<Kit> = done.new_kits.iter().map(Kit::from_pb).collect();
    // new-1's share is age-encrypted; `age -d` with its identity recovers it.
    assert!(new_kits[0]
        .share
        .starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    let plain = age_decrypt(&identity, &new_kits[0].share);
    new_kits[0].share = String::from_utf8(plain).unwrap().trim().to_string();
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
        let e = arca
            .quorum(&Kit::custodian(&arca, n).token)
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
    let old = Kit::custodian(&arca, 4);
    let e = unseal(&arca, &old, &old.share, old.totp.at(0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = unseal(&arca, &new_kits[0], &old.share, new_kits[0].totp.at(0))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), Some("SHARE_REJECTED"), "{e:?}");
    assert_sealed(&arca).await;
    // Two of the new kits unseal.
    for k in &new_kits[1..] {
        unseal(&arca, k, &k.share, k.totp.at(0)).await.unwrap();
    }
    assert!(!status(&arca).await.sealed);
    // A blob wrapped before the rekey still unwraps.
    let back = unwrap(
        &mut arca.client().await,
        &dk.wrapped_key,
        &ctx(&[("t", "1")]),
    )
    .await
    .unwrap();
    assert_eq!(back.plaintext, dk.plaintext);
    // A new custodian's token works.
    arca.quorum(&new_kits[0].token)
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
        needles.push((format!("new totp secret {i}"), k.totp.secret().to_vec()));
    }
    assert_absent(&needles, &arca.stored_bytes_and_logs());
}
