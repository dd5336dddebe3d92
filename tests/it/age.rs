//! `arca::quorum::age` against the real `age` tool: every armored file it writes
//! decrypts with `age -d -i KEY` to the original bytes (Debian package `age`).

use std::io::Write;
use std::process::{Command, Stdio};

use arca::quorum::age::{encrypt_armored, parse_recipient};

/// A fresh identity from `age-keygen`: (its file, the recipient it prints).
pub fn keygen(dir: &std::path::Path) -> (std::path::PathBuf, String) {
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
pub fn decrypt(key: &std::path::Path, armored: &str) -> Vec<u8> {
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

#[test]
fn age_cli_decrypts_what_arca_encrypts() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = keygen(dir.path());
    let r = parse_recipient(&recipient).unwrap();
    for len in [0usize, 1, 33, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 + 7] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let armored = encrypt_armored(&r, &plaintext).unwrap();
        assert_eq!(decrypt(&key, &armored), plaintext, "length {len}");
    }
}

#[test]
fn identities_and_junk_are_not_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path());
    let secret = std::fs::read_to_string(key).unwrap();
    let secret = secret
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    assert!(parse_recipient(secret).is_err());
    assert!(parse_recipient("age1notarecipient").is_err());
}
