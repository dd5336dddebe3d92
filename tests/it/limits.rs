//! Request limits: an oversized message, thousands of streams on one connection and
//! slow-loris connections are refused or held back, and the server keeps serving others.

use std::time::{Duration, Instant};

use arca::grpc::pb;
use tokio::io::AsyncWriteExt;
use tonic::Code;

use crate::support::{create_key, ctx, generate_wrapped, TestArca};

async fn quick_call_works(arca: &TestArca) {
    let t = Instant::now();
    arca.client()
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a normal call took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_10_mib_message_is_refused() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let e = c
        .wrap_key(pb::WrapKeyRequest {
            key_name: "k".into(),
            plaintext: vec![7u8; 10 * 1024 * 1024],
            context: ctx(&[]),
        })
        .await
        .unwrap_err();
    // Arca's words, not tonic's (OUT_OF_RANGE with the sizes).
    assert_eq!(
        (e.code(), e.message()),
        (Code::ResourceExhausted, "request message too large"),
        "{e:?}"
    );
    assert_eq!(
        crate::support::reason(&e),
        Some("REQUEST_TOO_LARGE"),
        "{e:?}"
    );
    for word in ["decode", "Protobuf", "message length", "limit is", "bytes"] {
        assert!(!e.message().contains(word), "tonic's words: {e:?}");
    }
    quick_call_works(&arca).await;
}

#[tokio::test]
async fn ten_thousand_streams_on_one_connection_do_not_starve_others() {
    let arca = TestArca::start().await;
    let mut c = arca.client().await;
    create_key(&mut c, "k").await;
    let blob = generate_wrapped(&mut c, "k", &ctx(&[])).await;
    // One connection, 10,000 calls in flight at once (the server allows a bounded number
    // of concurrent streams per connection; the rest wait on the client side).
    let one = arca.client().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let mut c = one.clone();
        let blob = blob.clone();
        set.spawn(async move {
            c.unwrap_key(pb::UnwrapKeyRequest {
                wrapped_key: blob,
                context: ctx(&[]),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
        });
    }
    // Meanwhile another connection is served promptly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    quick_call_works(&arca).await;
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(()) => ok += 1,
            Err(code) => assert!(
                matches!(
                    code,
                    Code::ResourceExhausted | Code::Unavailable | Code::Cancelled
                ),
                "unexpected {code:?}"
            ),
        }
    }
    assert!(ok > 0);
    quick_call_works(&arca).await;
}

#[tokio::test]
async fn slow_loris_connections_do_not_block_others() {
    let arca = TestArca::start().await;
    let mut loris = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(arca.addr()).await.unwrap();
        // The first bytes of the HTTP/2 preface, then nothing.
        s.write_all(b"PRI * HT").await.unwrap();
        loris.push(s);
    }
    for _ in 0..3 {
        quick_call_works(&arca).await;
        for s in &mut loris {
            let _ = s.write_all(b"T").await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
