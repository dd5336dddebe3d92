//! Raw SoftHSM throughput through `arca_hsm::pkcs11::Pkcs11Hsm`: the ceiling Arca's own
//! numbers are compared against (`scripts/bench`).
//!
//! Creates a throwaway SoftHSM token in a temporary directory (no network, nothing
//! outside the tempdir is touched), then measures AES-256-GCM encrypt and decrypt of 32
//! bytes with 28 bytes of AAD:
//! (a) token key used directly, 1 thread / 1 session;
//! (b) session copies of the key, 1 thread / 1 session;
//! (c) session copies, N threads / N sessions, N in {2, 4};
//! and `C_GenerateRandom` of 44 bytes (1 thread). One line per measurement:
//! `hsm <op> sessions=<n> copies=<bool> ops_per_sec=<n>`, then
//! `hsm best_decrypt_ops_per_sec=<n>`. `ARCA_BENCH_SECS` sets the seconds per
//! measurement (default 2).
//!
//! Only one `Pkcs11Hsm` per module may be live in a process: each configuration drops
//! the previous instance before opening its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use arca_hsm::{softhsm, AuthPin, Hsm, KeyKind, ObjectId};

const LABEL: &str = "arca-bench";
const KEY: ObjectId = ObjectId(*b"arca-bench-key-1");
const AAD: &[u8; 28] = b"\x01bench-header-and-context...";
const PLAINTEXT: &[u8; 32] = b"a 32-byte data key, for example!";

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn open(module: &Path, pin: &AuthPin, sessions: usize, copies: bool) -> Arc<Pkcs11Hsm> {
    Arc::new(
        Pkcs11Hsm::open(Pkcs11Config {
            sessions,
            session_key_copies: copies,
            ..Pkcs11Config::new(module, LABEL, pin.clone())
        })
        .expect("open SoftHSM token"),
    )
}

/// Runs `op` on `threads` threads for `secs`; returns total operations per second.
fn measure(hsm: &Arc<Pkcs11Hsm>, threads: usize, secs: f64, op: fn(&Pkcs11Hsm, u64)) -> u64 {
    // Warm up (finds the key, makes the session copies).
    for i in 0..200 {
        op(hsm, i);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let hsm = Arc::clone(hsm);
            std::thread::spawn(move || {
                let mut n = 0u64;
                let base = (t as u64) << 40;
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        op(&hsm, base + n);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    (total as f64 / start.elapsed().as_secs_f64()) as u64
}

fn iv(counter: u64) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[4..].copy_from_slice(&counter.to_be_bytes());
    iv
}

fn encrypt(hsm: &Pkcs11Hsm, i: u64) {
    let ct = hsm.encrypt_aes_gcm(&KEY, &iv(i), AAD, PLAINTEXT).unwrap();
    assert_eq!(ct.len(), 48);
}

static CIPHERTEXT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

fn decrypt(hsm: &Pkcs11Hsm, _i: u64) {
    let ct = CIPHERTEXT.get().unwrap();
    let pt = hsm.decrypt_aes_gcm(&KEY, &iv(0), AAD, ct).unwrap();
    assert_eq!(pt.len(), 32);
}

fn random44(hsm: &Pkcs11Hsm, _i: u64) {
    let mut out = [0u8; 44];
    hsm.generate_random(&mut out).unwrap();
}

fn main() {
    // `cargo bench` passes "--bench"; nothing to parse.
    let secs: f64 = std::env::var("ARCA_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(2.0);
    let Some(module) = softhsm::default_module_path() else {
        eprintln!("hsm_raw: SoftHSM2 not installed (apt-get install softhsm2); skipped");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = softhsm::write_config(tmp.path()).expect("SoftHSM config");
    // Before the first C_Initialize in this process (edition 2021: safe).
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let so_pin = AuthPin::from(random_hex(16));
    let pin = AuthPin::from(random_hex(16));
    softhsm::init_token(&module, LABEL, &so_pin, &pin).expect("init SoftHSM token");

    {
        let hsm = open(&module, &pin, 1, false);
        hsm.generate_key(KeyKind::Aes256, &KEY, "arca:bench:v1")
            .expect("generate key");
        let ct = hsm.encrypt_aes_gcm(&KEY, &iv(0), AAD, PLAINTEXT).unwrap();
        CIPHERTEXT.set(ct).unwrap();
    }

    let mut best_decrypt = 0;
    for (sessions, copies) in [(1, false), (1, true), (2, true), (4, true)] {
        let hsm = open(&module, &pin, sessions, copies);
        for (name, op) in [
            ("gcm_encrypt", encrypt as fn(&Pkcs11Hsm, u64)),
            ("gcm_decrypt", decrypt),
        ] {
            let rate = measure(&hsm, sessions, secs, op);
            println!("hsm {name} sessions={sessions} copies={copies} ops_per_sec={rate}");
            if name == "gcm_decrypt" {
                best_decrypt = best_decrypt.max(rate);
            }
        }
        if sessions == 1 && copies {
            let rate = measure(&hsm, 1, secs, random44);
            println!("hsm random44 sessions=1 copies={copies} ops_per_sec={rate}");
        }
        drop(hsm);
    }
    println!("hsm best_decrypt_ops_per_sec={best_decrypt}");
}
