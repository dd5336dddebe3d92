//! The test PKI: `scripts/make-test-ca DIR` writes a CA, a server certificate for
//! `localhost`/127.0.0.1, client certificates (`client`, `client2`, `expired`, `other`
//! from another CA, `revoked`) and a CRL. Imports nothing of the other support files.

use std::path::Path;
use std::process::{Command, Stdio};

/// Makes a fresh test PKI in `dir`.
pub fn make_test_ca(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-test-ca");
    let out = Command::new(script)
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("scripts/make-test-ca");
    assert!(
        out.status.success(),
        "make-test-ca: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
