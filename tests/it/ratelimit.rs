//! Per-principal rate limits: a burst over the bucket gets RESOURCE_EXHAUSTED with a
//! `retry-after` header; another principal is unaffected.

use arca::grpc::pb;
use tonic::Code;

use crate::support::{mint_token, TestArca};

#[tokio::test]
async fn a_burst_over_the_bucket_is_refused_and_others_are_unaffected() {
    let arca = TestArca::builder()
        .arg("--rate-limit")
        .arg("5")
        .arg("--rate-burst")
        .arg("20")
        .start()
        .await;
    // A second principal, minted while the admin's bucket is still full.
    let other = mint_token(&arca, "svc:other", &[]).await;

    let mut admin = arca.client().await;
    let mut refused = None;
    for _ in 0..60 {
        if let Err(e) = admin.list_keys(pb::ListKeysRequest::default()).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("60 quick calls against a burst of 20 at 5/s must hit the limit");
    assert_eq!(e.code(), Code::ResourceExhausted);
    let retry: u64 = e
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after header");
    assert!((1..=2).contains(&retry), "retry-after {retry}");

    let mut o = arca.keys(&other).await;
    for _ in 0..10 {
        o.list_keys(pb::ListKeysRequest::default()).await.unwrap();
    }
}
