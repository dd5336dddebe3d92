//! Dual control in tests: a custodian's [`Kit`] (share, token, TOTP secret), the
//! [`Totp`] authenticator of a custodian or an MFA principal, the five [`Custodians`] of
//! a 3-of-5 server ([`three_of_five`], [`unsealed`]) who unseal, approve and seal, and
//! the `age` identities that custodian shares are encrypted to.
//!
//! TOTP codes are accepted once per principal per 30-second step, within one step of
//! now: [`Totp::next`] hands out the next step not used yet (now, then now + 1) and waits
//! for the clock when both are used; [`Totp::at`] gives a fixed step for tests that
//! choose their own. Imports only the server and client support.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use arca::grpc::pb;
use tonic::Status;

use super::clients::{create_key, QuorumClient};
use super::database::Db;
use super::server::{Builder, TestArca};

/// RFC 4648 base32 (upper case, padding ignored), as in an `otpauth://` URI.
fn base32_decode(s: &str) -> Vec<u8> {
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

fn now_ms() -> i64 {
    use arca::clock::Clock;
    arca::clock::SystemClock.now_ms()
}

/// A TOTP authenticator: the secret of an `otpauth://` URI, and the last step it used.
pub struct Totp {
    secret: Vec<u8>,
    last: Mutex<Option<i64>>,
}

impl Totp {
    /// The authenticator of an `otpauth://…?secret=BASE32&…` URI.
    pub fn from_uri(uri: &str) -> Totp {
        let secret = uri
            .split("secret=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .unwrap_or_else(|| panic!("no secret in the TOTP URI {uri:?}"));
        Totp {
            secret: base32_decode(secret),
            last: Mutex::new(None),
        }
    }

    /// The raw secret (to look for it where it must not be).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The code `offset` steps from now.
    pub fn at(&self, offset: i64) -> String {
        let step = arca::quorum::totp::step_at(now_ms()) + offset;
        arca::quorum::totp::hotp(&self.secret, step as u64)
    }

    /// The code of the next step not used yet (now or now + 1; waits for the clock when
    /// both are used).
    pub async fn next(&self) -> String {
        loop {
            let now = arca::quorum::totp::step_at(now_ms());
            let step = {
                let mut last = self.last.lock().unwrap();
                let step = last.map_or(now, |l| (l + 1).max(now));
                if step <= now + 1 {
                    *last = Some(step);
                    Some(step)
                } else {
                    None
                }
            };
            match step {
                Some(step) => return arca::quorum::totp::hotp(&self.secret, step as u64),
                None => {
                    let into_step = now_ms().rem_euclid(30_000);
                    tokio::time::sleep(Duration::from_millis((30_000 - into_step + 100) as u64))
                        .await
                }
            }
        }
    }

    /// A six-digit code that is none of the valid ones now.
    pub fn wrong(&self) -> String {
        let now = arca::quorum::totp::step_at(now_ms());
        let valid: Vec<String> = (now - 2..=now + 2)
            .map(|s| arca::quorum::totp::hotp(&self.secret, s as u64))
            .collect();
        (0..10)
            .map(|d| d.to_string().repeat(6))
            .find(|c| !valid.contains(c))
            .unwrap()
    }
}

/// What a custodian holds: a share, a bearer token and a TOTP authenticator.
pub struct Kit {
    pub share: String,
    share_file: Option<PathBuf>,
    pub token: String,
    pub totp: Totp,
}

impl Kit {
    /// The kit written in `dir` (`share`, `token`, `totp-uri`), as `operator init
    /// --out-dir` and `--custodians` write one per custodian.
    pub fn read(dir: &Path) -> Kit {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
                .trim()
                .to_string()
        };
        Kit {
            share: read("share"),
            share_file: Some(dir.join("share")),
            token: read("token"),
            totp: Totp::from_uri(&read("totp-uri")),
        }
    }

    /// The kit of `custodian-N` of a dev server run with `--custodians`
    /// (`DATA/custodians/custodian-N/`).
    pub fn custodian(arca: &TestArca, n: usize) -> Kit {
        Kit::read(
            &arca
                .data_dir()
                .join("custodians")
                .join(format!("custodian-{n}")),
        )
    }

    /// A kit handed over in an API answer (a rekey's new kits).
    pub fn from_pb(k: &pb::CustodianKit) -> Kit {
        Kit {
            share: k.share.clone(),
            share_file: None,
            token: k.token.clone(),
            totp: Totp::from_uri(&k.totp_uri),
        }
    }

    /// The file the share was read from.
    pub fn share_file(&self) -> &Path {
        self.share_file
            .as_deref()
            .expect("a kit from an API answer has no share file")
    }
}

/// Server options for 3 of 5 custodians (`custodian-1` … `custodian-5`) on `db`.
pub fn three_of_five(db: Db) -> Builder {
    TestArca::builder()
        .backend(db)
        .arg("--custodians")
        .arg("5")
        .arg("--threshold")
        .arg("3")
}

/// A 3-of-5 server, unsealed by custodians 1, 2 and 3, with a key `phi`.
pub async fn unsealed(builder: Builder) -> (TestArca, Custodians) {
    let arca = builder.start().await;
    let cs = Custodians::read(&arca);
    cs.unseal(&arca, &[1, 2, 3]).await;
    create_key(&mut arca.client().await, "phi").await;
    (arca, cs)
}

/// Asks to rotate `phi` as the dev admin; the approval request the answer must be.
pub async fn request_rotation(arca: &TestArca) -> pb::ApprovalRequest {
    let r = arca
        .client()
        .await
        .rotate_key(pb::RotateKeyRequest { name: "phi".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.key.is_none(), "RotateKey ran without approval: {r:?}");
    r.approval_request.expect("an approval request")
}

/// The five custodians of a 3-of-5 test server; each TOTP step is used once.
pub struct Custodians {
    kits: Vec<Kit>,
}

impl Custodians {
    /// The kits of custodians 1 to 5 of `arca`.
    pub fn read(arca: &TestArca) -> Custodians {
        Custodians {
            kits: (1..=5).map(|n| Kit::custodian(arca, n)).collect(),
        }
    }

    /// Custodian n's kit (from 1).
    pub fn kit(&self, n: usize) -> &Kit {
        &self.kits[n - 1]
    }

    /// Custodian n's code for the next step they have not used.
    pub async fn code(&self, n: usize) -> String {
        self.kit(n).totp.next().await
    }

    /// Custodian n's quorum client.
    pub async fn client(&self, arca: &TestArca, n: usize) -> QuorumClient {
        arca.quorum(&self.kit(n).token).await
    }

    /// Custodian n seals the server.
    pub async fn seal(&self, arca: &TestArca, n: usize) {
        self.client(arca, n)
            .await
            .seal(pb::SealRequest {})
            .await
            .unwrap_or_else(|s| panic!("seal by custodian-{n}: {s:?}"));
    }

    /// Custodians `who` submit their shares, each with a fresh code.
    pub async fn unseal(&self, arca: &TestArca, who: &[usize]) {
        for &n in who {
            let code = self.code(n).await;
            self.client(arca, n)
                .await
                .unseal(pb::UnsealRequest {
                    share: self.kit(n).share.clone(),
                    totp: code,
                })
                .await
                .unwrap_or_else(|s| panic!("unseal by custodian-{n}: {s:?}"));
        }
    }

    /// Custodian n approves `req` with its digest, their share and a fresh code.
    pub async fn approve(
        &self,
        arca: &TestArca,
        n: usize,
        req: &pb::ApprovalRequest,
    ) -> Result<pb::ApprovalRequest, Status> {
        let code = self.code(n).await;
        self.approve_with(arca, n, &req.id, &req.digest, &code)
            .await
    }

    /// Custodian n approves request `id` with the given digest and code.
    pub async fn approve_with(
        &self,
        arca: &TestArca,
        n: usize,
        id: &str,
        digest: &str,
        code: &str,
    ) -> Result<pb::ApprovalRequest, Status> {
        self.client(arca, n)
            .await
            .approve(pb::ApproveRequest {
                id: id.to_string(),
                digest: digest.to_string(),
                share: self.kit(n).share.clone(),
                totp: code.to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// A fresh `age` identity from `age-keygen`, in `dir/age.key`: (its file, the recipient
/// it prints).
pub fn age_keygen(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("age.key");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (install the `age` package)");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&key).unwrap();
    let recipient = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .unwrap()
        .trim()
        .to_string();
    (key, recipient)
}

/// `age -d -i KEY` on `armored` (stdin); the decrypted bytes.
pub fn age_decrypt(key: &Path, armored: &str) -> Vec<u8> {
    let mut child = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("age (install the `age` package)");
    let mut stdin = child.stdin.take().unwrap();
    let input = armored.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
