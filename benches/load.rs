//! Load generator for `scripts/bench` (a benchmark, not a test): drives a running Arca
//! server over loopback with GenerateDataKey and UnwrapKey at several concurrency levels
//! and prints throughput and latency percentiles, one line per measurement:
//!
//! `arca op=<Op> concurrency=<n> ops_per_sec=<n> p50_us=<n> p99_us=<n> errors=<n>`
//!
//! Arguments: `--addr URL --token-file F [--key NAME] [--secs S] [--concurrency 1,16,64]
//! [--connections N]`. Runs in its own process, so the server's resources are its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca::grpc::pb;
use arca::grpc::pb::key_service_client::KeyServiceClient;
use tonic::metadata::{Ascii, MetadataValue};

/// A bare HTTP/2 connection as a tower service: no `Channel` buffer task between the
/// caller and the connection, so the generator spends less of the shared CPU per call.
#[derive(Clone)]
struct H2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn connect(addr: &str) -> H2 {
    let hostport = addr.trim_start_matches("http://");
    let tcp = tokio::net::TcpStream::connect(hostport)
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    H2(send)
}

struct Opts {
    addr: String,
    token: String,
    key: String,
    secs: f64,
    concurrency: Vec<usize>,
    connections: usize,
    /// Operations to measure (`--ops generate,unwrap,health`; all by default).
    ops: Vec<String>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        addr: String::new(),
        token: String::new(),
        key: "bench".into(),
        secs: 5.0,
        concurrency: vec![1, 16, 64],
        connections: 4,
        ops: vec!["generate".into(), "unwrap".into(), "health".into()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => o.addr = args.next().expect("--addr URL"),
            "--token-file" => {
                let f = args.next().expect("--token-file F");
                o.token = std::fs::read_to_string(f)
                    .expect("token file")
                    .trim()
                    .to_string();
            }
            "--key" => o.key = args.next().expect("--key NAME"),
            "--secs" => o.secs = args.next().expect("--secs S").parse().expect("secs"),
            "--concurrency" => {
                o.concurrency = args
                    .next()
                    .expect("--concurrency 1,16,64")
                    .split(',')
                    .map(|c| c.parse().expect("concurrency"))
                    .collect()
            }
            "--ops" => {
                o.ops = args
                    .next()
                    .expect("--ops generate,unwrap,health")
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect()
            }
            "--connections" => {
                o.connections = args.next().expect("--connections N").parse().expect("n")
            }
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(!o.addr.is_empty(), "--addr is required");
    assert!(!o.token.is_empty(), "--token-file is required");
    o
}

#[derive(Clone)]
struct Client {
    inner: KeyServiceClient<H2>,
    inner_h2: H2,
    origin: http::Uri,
    auth: MetadataValue<Ascii>,
}

impl Client {
    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }
}

#[derive(Clone, Copy)]
enum Op {
    Generate,
    Unwrap,
    /// `grpc.health.v1.Health/Check` on the same server: no auth, HSM or database — the
    /// gRPC stack's own ceiling on this machine, for comparison.
    Health,
}

async fn measure(
    clients: &[Client],
    op: Op,
    concurrency: usize,
    secs: f64,
    key: &str,
    blobs: Arc<Vec<Vec<u8>>>,
) -> (f64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut c = clients[w % clients.len()].clone();
        let key = key.to_string();
        let blobs = Arc::clone(&blobs);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = w;
            let mut ctx = HashMap::new();
            ctx.insert("tenant".to_string(), "bench".to_string());
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match op {
                    Op::Generate => c
                        .inner
                        .generate_data_key(c.req(pb::GenerateDataKeyRequest {
                            key_name: key.clone(),
                            context: ctx.clone(),
                            without_plaintext: false,
                        }))
                        .await
                        .is_ok(),
                    Op::Health => tonic_health::pb::health_client::HealthClient::with_origin(
                        c.inner_h2.clone(),
                        c.origin.clone(),
                    )
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok(),
                    Op::Unwrap => c
                        .inner
                        .unwrap_key(c.req(pb::UnwrapKeyRequest {
                            wrapped_key: blobs[i % blobs.len()].clone(),
                            context: ctx.clone(),
                        }))
                        .await
                        .is_ok(),
                };
                i += 1;
                if ok {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() - 1) as f64 * p) as usize] as u64
        }
    };
    (all.len() as f64 / elapsed, pct(0.50), pct(0.99), errors)
}

fn main() {
    let o = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let auth: MetadataValue<Ascii> = format!("Bearer {}", o.token).parse().unwrap();
        let mut clients = Vec::new();
        for _ in 0..o.connections.max(1) {
            let ch = connect(&o.addr).await;
            let origin: http::Uri = o.addr.parse().expect("addr uri");
            clients.push(Client {
                inner: KeyServiceClient::with_origin(ch.clone(), origin.clone()),
                inner_h2: ch,
                origin,
                auth: auth.clone(),
            });
        }
        let mut c = clients[0].clone();
        let _ = c
            .inner
            .create_key(c.req(pb::CreateKeyRequest {
                name: o.key.clone(),
                description: "benchmark".into(),
                ..Default::default()
            }))
            .await;
        let mut ctx = HashMap::new();
        ctx.insert("tenant".to_string(), "bench".to_string());
        let mut blobs = Vec::new();
        for _ in 0..256 {
            let r = c
                .inner
                .generate_data_key(c.req(pb::GenerateDataKeyRequest {
                    key_name: o.key.clone(),
                    context: ctx.clone(),
                    without_plaintext: true,
                }))
                .await
                .expect("generate");
            blobs.push(r.into_inner().wrapped_key);
        }
        let blobs = Arc::new(blobs);
        // Warm-up: connections, caches, session key copies.
        measure(&clients, Op::Unwrap, 16, 0.5, &o.key, Arc::clone(&blobs)).await;
        for (op, name, short) in [
            (Op::Generate, "GenerateDataKey", "generate"),
            (Op::Unwrap, "UnwrapKey", "unwrap"),
            (Op::Health, "HealthCheck", "health"),
        ] {
            if !o.ops.iter().any(|x| x == short) {
                continue;
            }
            for &n in &o.concurrency {
                let (rate, p50, p99, errors) =
                    measure(&clients, op, n, o.secs, &o.key, Arc::clone(&blobs)).await;
                println!(
                    "arca op={name} concurrency={n} ops_per_sec={rate:.0} p50_us={p50} p99_us={p99} errors={errors}"
                );
            }
        }
    });
}
