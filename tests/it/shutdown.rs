//! SIGTERM under load: the server stops accepting, lets the HSM workers finish, releases
//! the PKCS#11 module after them, and exits 0. (A SIGTERM under load once crashed the
//! process: the module was torn down at exit while a worker was inside `C_Decrypt`.)

use std::time::Duration;

use arca::grpc::pb;

use crate::support::{create_key, ctx, generate_wrapped, TestArca};

#[tokio::test]
async fn sigterm_under_load_exits_cleanly() {
    for round in 0..3 {
        let mut arca = TestArca::start().await;
        let mut c = arca.client().await;
        create_key(&mut c, "k").await;
        let blob = generate_wrapped(&mut c, "k", &ctx(&[])).await;
        let mut load = Vec::new();
        for _ in 0..16 {
            let mut c = arca.client().await;
            let blob = blob.clone();
            load.push(tokio::spawn(async move {
                // Runs until the server goes away; errors then are expected.
                for _ in 0..100_000 {
                    if c.unwrap_key(pb::UnwrapKeyRequest {
                        wrapped_key: blob.clone(),
                        context: ctx(&[]),
                    })
                    .await
                    .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300 + 200 * round)).await;
        let status = arca.stop().await;
        assert!(
            status.success(),
            "round {round}: exit status under load: {status}"
        );
        for l in load {
            let _ = l.await;
        }
    }
}
