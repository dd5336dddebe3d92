//! `arca::quorum::age` against the real `age` tool: every armored file it writes
//! decrypts with `age -d -i KEY` to the original bytes (Debian package `age`).

use arca::quorum::age::{encrypt_armored, parse_recipient};

use crate::support::{age_decrypt, age_keygen};

#[test]
fn age_cli_decrypts_what_arca_encrypts() {
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = age_keygen(dir.path());
    let r = parse_recipient(&recipient).unwrap();
    for len in [0usize, 1, 33, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 + 7] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let armored = encrypt_armored(&r, &plaintext).unwrap();
        assert_eq!(age_decrypt(&key, &armored), plaintext, "length {len}");
    }
}

#[test]
fn identities_and_junk_are_not_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = age_keygen(dir.path());
    let secret = std::fs::read_to_string(key).unwrap();
    let secret = secret
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    assert!(parse_recipient(secret).is_err());
    assert!(parse_recipient("age1notarecipient").is_err());
}
