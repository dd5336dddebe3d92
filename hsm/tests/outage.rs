//! A real HSM outage: a SoftHSM token served over a unix socket by `p11-kit server`,
//! used through `p11-kit-client.so`. The server (and the per-connection
//! `p11-kit-remote` children it forks) is killed and restarted under a live
//! [`Pkcs11Hsm`]; calls must fail fast with `Unavailable`, never hang or panic, and
//! recover by themselves once the server is back.
//!
//! Observed with Debian 12's p11-kit 0.24.1:
//! - killing only the server's pid does not break existing connections (each is served
//!   by a forked child), so the whole process group is killed;
//! - with the server gone, every function returns `CKR_DEVICE_ERROR` in microseconds,
//!   `C_GetSlotList` included, and keeps doing so after the server is back until the
//!   module is finalized and initialised again;
//! - p11-kit 0.24's RPC cannot carry `CK_GCM_PARAMS`: `C_EncryptInit` with
//!   `CKM_AES_GCM` returns `CKR_MECHANISM_INVALID` (newer p11-kit serializes them). The
//!   proof that objects are found again by `CKA_ID` therefore uses HMAC-SHA256 (a
//!   mechanism without parameters); GCM is checked too when the installed p11-kit
//!   supports it.
//!
//! Everything runs in one test: `C_Initialize` is per process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use arca_hsm::softhsm;
use arca_hsm::AuthPin;
use arca_hsm::{Hsm, HsmError, KeyKind, ObjectId};

const LABEL: &str = "arca-outage";
const CLIENT_MODULES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
];
/// Upper bound for one call while the HSM is down.
const FAST: Duration = Duration::from_millis(100);

/// `p11-kit server` in its own process group, so that its per-connection children can
/// be killed with it.
struct Server {
    child: Child,
}

impl Server {
    fn start(softhsm_module: &Path, conf: &Path, socket: &Path) -> Server {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("p11-kit")
            .arg("server")
            .arg("-f")
            .arg("--provider")
            .arg(softhsm_module)
            .arg("-n")
            .arg(socket)
            .arg(format!("pkcs11:token={LABEL}"))
            .env("SOFTHSM2_CONF", conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("p11-kit server (apt-get install p11-kit)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "p11-kit server did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child }
    }

    /// SIGKILL to the server's process group (the server and the children it forked).
    fn kill(&mut self) {
        let pgid = self.child.id();
        let status = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL -{pgid}: {status}");
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Runs `f` on another thread and fails the test if it takes longer than `limit`
/// (rather than hanging the test run).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let v = f();
        let _ = tx.send((v, start.elapsed()));
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {limit:?}"),
    }
}

fn assert_unavailable(r: arca_hsm::Result<impl Sized>, what: &str) {
    match r {
        Err(e @ HsmError::Unavailable { .. }) => {
            let _ = e;
        }
        Err(e) => panic!("{what}: expected Unavailable, got {e:?}"),
        Ok(_) => panic!("{what}: expected Unavailable, got Ok"),
    }
}

#[test]
fn p11_kit_server_outage_and_recovery() {
    let softhsm_module = softhsm::default_module_path().expect("SoftHSM2 installed");
    let client_module = CLIENT_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("p11-kit-client.so installed (apt-get install p11-kit-modules)");

    // A token made with the shell script (which the scripts use too).
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm/init-token");
    let out = Command::new(&script)
        .args(["--dir"])
        .arg(tmp.path())
        .args(["--label", LABEL])
        .output()
        .unwrap();
    assert!(out.status.success(), "init-token: {out:?}");
    // Idempotent.
    let out = Command::new(&script)
        .args(["--dir"])
        .arg(tmp.path())
        .args(["--label", LABEL])
        .output()
        .unwrap();
    assert!(out.status.success(), "init-token again: {out:?}");
    let conf = tmp.path().join("softhsm2.conf");
    let pin = std::fs::read_to_string(tmp.path().join("user-pin")).unwrap();
    let pin = AuthPin::from(pin.trim().to_owned());

    let socket = tmp.path().join("p11.sock");
    let mut server = Server::start(&softhsm_module, &conf, &socket);
    // Before C_Initialize of the client module (edition 2021: safe).
    std::env::set_var(
        "P11_KIT_SERVER_ADDRESS",
        format!("unix:path={}", socket.display()),
    );

    let hsm = Arc::new(
        Pkcs11Hsm::open(Pkcs11Config {
            sessions: 2,
            session_key_copies: true,
            reconnect_interval: Duration::from_millis(200),
            ..Pkcs11Config::new(&client_module, LABEL, pin)
        })
        .unwrap(),
    );
    hsm.check().unwrap();

    let mac = ObjectId(*b"outage-hmac-key1");
    let aes = ObjectId(*b"outage-aes-key-1");
    hsm.generate_key(KeyKind::HmacSha256, &mac, "arca:audit-mac")
        .unwrap();
    hsm.generate_key(KeyKind::Aes256, &aes, "arca:outage:v1")
        .unwrap();
    let mac_before = hsm.hmac_sha256(&mac, b"before the outage").unwrap();
    let iv = [3u8; 12];
    let gcm = match hsm.encrypt_aes_gcm(&aes, &iv, b"aad", b"data key") {
        Ok(ct) => Some(ct),
        Err(HsmError::Pkcs11 { function, detail }) if detail == "CKR_MECHANISM_INVALID" => {
            eprintln!("{function}: {detail}: this p11-kit cannot forward CKM_AES_GCM; using HMAC");
            None
        }
        Err(e) => panic!("encrypt through p11-kit: {e:?}"),
    };
    // The GCM refusal did not take the HSM down.
    hsm.check().unwrap();

    // Outage.
    server.kill();
    let first = {
        let hsm = Arc::clone(&hsm);
        within(
            Duration::from_secs(5),
            "first call after the kill",
            move || hsm.hmac_sha256(&mac, b"during"),
        )
    };
    eprintln!("first call after the kill: {:?} in {:?}", first.0, first.1);
    assert_unavailable(first.0, "first call after the kill");
    assert!(first.1 < FAST, "first call took {:?}", first.1);
    assert!(hsm.is_down());

    // Several threads hammer the dead HSM for a while (reconnect attempts included).
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let hsm = Arc::clone(&hsm);
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                let mut seen = std::collections::BTreeSet::new();
                let stop = Instant::now() + Duration::from_millis(700);
                let mut n = 0u32;
                while Instant::now() < stop {
                    let start = Instant::now();
                    let r: arca_hsm::Result<()> = match (n + t) % 5 {
                        0 => hsm.check(),
                        1 => hsm.hmac_sha256(&mac, b"x").map(|_| ()),
                        2 => hsm.key_exists(&mac).map(|_| ()),
                        3 => hsm.generate_random(&mut [0u8; 32]),
                        _ => hsm.encrypt_aes_gcm(&aes, &[0; 12], b"", b"x").map(|_| ()),
                    };
                    slowest = slowest.max(start.elapsed());
                    if let Err(e) = &r {
                        seen.insert(e.to_string());
                    }
                    assert!(
                        matches!(r, Err(HsmError::Unavailable { .. })),
                        "during outage: {r:?}"
                    );
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                (n, slowest, seen)
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for w in workers {
        let (n, slowest, s) = w.join().unwrap();
        seen.extend(s);
        eprintln!("outage worker: {n} calls, slowest {slowest:?}");
        assert!(
            slowest < FAST,
            "a call took {slowest:?} while the HSM was down"
        );
    }
    for e in &seen {
        eprintln!("  seen during the outage: {e}");
    }
    let gen_down = hsm.generation();
    assert!(hsm.destroy_key(&mac).unwrap_err().is_unavailable());
    assert!(
        hsm.forget_key(&mac).is_err(),
        "a forget while down is not confirmed"
    ); // and must not panic or hang

    // Recovery.
    let _server = Server::start(&softhsm_module, &conf, &socket);
    let restarted = Instant::now();
    let mut last = None;
    while restarted.elapsed() < Duration::from_secs(10) {
        let hsm2 = Arc::clone(&hsm);
        let (r, took) = within(
            Duration::from_secs(5),
            "check() during recovery",
            move || hsm2.check(),
        );
        match r {
            Ok(()) => {
                last = None;
                eprintln!(
                    "check() ok {:?} after the restart (that call: {took:?})",
                    restarted.elapsed()
                );
                break;
            }
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(last.is_none(), "no recovery within 10 s: {last:?}");
    assert!(!hsm.is_down());
    assert!(hsm.generation() > gen_down);

    // Objects are found again by CKA_ID, with fresh handles.
    assert_eq!(
        hsm.hmac_sha256(&mac, b"before the outage").unwrap(),
        mac_before
    );
    assert!(hsm.key_exists(&aes).unwrap());
    let a = hsm.key_attributes(&aes).unwrap();
    assert!(
        a.token && a.sensitive && !a.extractable && a.never_extractable,
        "{a:?}"
    );
    if let Some(ct) = gcm {
        assert_eq!(
            hsm.decrypt_aes_gcm(&aes, &iv, b"aad", &ct)
                .unwrap()
                .as_slice(),
            b"data key"
        );
    }
    let mut r = [0u8; 32];
    hsm.generate_random(&mut r).unwrap();
    assert!(hsm.destroy_key(&aes).unwrap());
    assert!(!hsm.key_exists(&aes).unwrap());

    // Close the client before the server goes (Server::drop kills it).
    drop(hsm);
}
