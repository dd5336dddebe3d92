//! One contract for every [`Hsm`] implementation, run on [`FakeHsm`] and on
//! [`Pkcs11Hsm`] over a fresh SoftHSM token in a temporary directory.
//!
//! `C_Initialize` is process-global, so every SoftHSM case runs inside the single test
//! `softhsm_contract`, sequentially; `SOFTHSM2_CONF` is set once, before the first call
//! into the module. The fake's test touches no PKCS#11 module and may run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::fake::FakeHsm;
use arca_hsm::pkcs11::{Pkcs11Config, Pkcs11Hsm};
use arca_hsm::softhsm;
use arca_hsm::AuthPin;
use arca_hsm::{Hsm, HsmError, KeyKind, ObjectId, GCM_IV_LEN, GCM_TAG_LEN};

const LABEL: &str = "arca-contract";

fn fresh_id(hsm: &dyn Hsm) -> ObjectId {
    let mut id = [0u8; 16];
    hsm.generate_random(&mut id).unwrap();
    ObjectId(id)
}

fn fresh_iv(hsm: &dyn Hsm) -> [u8; GCM_IV_LEN] {
    let mut iv = [0u8; GCM_IV_LEN];
    hsm.generate_random(&mut iv).unwrap();
    iv
}

fn assert_auth_failed(r: arca_hsm::Result<impl Sized>, what: &str) {
    match r {
        Err(HsmError::AuthenticationFailed) => {}
        Err(e) => panic!("{what}: expected AuthenticationFailed, got {e:?}"),
        Ok(_) => panic!("{what}: expected AuthenticationFailed, got Ok"),
    }
}

fn assert_not_found(r: arca_hsm::Result<impl Sized>, what: &str) {
    match r {
        Err(HsmError::ObjectNotFound) => {}
        Err(e) => panic!("{what}: expected ObjectNotFound, got {e:?}"),
        Ok(_) => panic!("{what}: expected ObjectNotFound, got Ok"),
    }
}

/// A failure that is neither an outage, an authentication failure nor "not found".
fn assert_refused(r: arca_hsm::Result<impl Sized>, what: &str) {
    match r {
        Err(HsmError::Pkcs11 { function, detail }) => {
            eprintln!("{what}: {function}: {detail}");
        }
        Err(e) => panic!("{what}: expected a PKCS#11 refusal, got {e:?}"),
        Ok(_) => panic!("{what}: expected a PKCS#11 refusal, got Ok"),
    }
}

/// The contract every implementation meets.
fn contract(hsm: &dyn Hsm) {
    hsm.check().unwrap();

    // Generate -> exists; duplicate id -> ObjectExists.
    let aes = fresh_id(hsm);
    let mac = fresh_id(hsm);
    assert!(!hsm.key_exists(&aes).unwrap());
    hsm.generate_key(KeyKind::Aes256, &aes, "arca:contract:v1")
        .unwrap();
    assert!(hsm.key_exists(&aes).unwrap());
    assert!(matches!(
        hsm.generate_key(KeyKind::Aes256, &aes, "dup"),
        Err(HsmError::ObjectExists)
    ));
    assert!(matches!(
        hsm.generate_key(KeyKind::HmacSha256, &aes, "dup"),
        Err(HsmError::ObjectExists)
    ));
    hsm.generate_key(KeyKind::HmacSha256, &mac, "arca:audit-mac")
        .unwrap();
    assert!(hsm.key_exists(&mac).unwrap());

    // AES-256-GCM round trips.
    let iv = fresh_iv(hsm);
    let aad = b"\x01header-of-28-bytes.........";
    assert_eq!(aad.len(), 28);
    let pt = b"0123456789abcdef0123456789abcdef";
    let ct = hsm.encrypt_aes_gcm(&aes, &iv, aad, pt).unwrap();
    assert_eq!(ct.len(), pt.len() + GCM_TAG_LEN);
    assert_ne!(&ct[..pt.len()], pt);
    assert_eq!(
        hsm.decrypt_aes_gcm(&aes, &iv, aad, &ct).unwrap().as_slice(),
        pt
    );
    let ct_empty = hsm.encrypt_aes_gcm(&aes, &iv, b"", b"").unwrap();
    assert_eq!(ct_empty.len(), GCM_TAG_LEN);
    assert!(hsm
        .decrypt_aes_gcm(&aes, &iv, b"", &ct_empty)
        .unwrap()
        .is_empty());
    let big = vec![0x5a; 4096];
    let ct_big = hsm.encrypt_aes_gcm(&aes, &iv, aad, &big).unwrap();
    assert_eq!(
        hsm.decrypt_aes_gcm(&aes, &iv, aad, &ct_big)
            .unwrap()
            .as_slice(),
        &big[..]
    );

    // Every way a ciphertext fails authentication.
    assert_auth_failed(
        hsm.decrypt_aes_gcm(&aes, &iv, b"\x01header-of-28-bytes........X", &ct),
        "wrong AAD",
    );
    assert_auth_failed(hsm.decrypt_aes_gcm(&aes, &iv, b"", &ct), "missing AAD");
    let mut other_iv = iv;
    other_iv[0] ^= 1;
    assert_auth_failed(hsm.decrypt_aes_gcm(&aes, &other_iv, aad, &ct), "wrong IV");
    let mut flipped = ct.clone();
    *flipped.last_mut().unwrap() ^= 0x80;
    assert_auth_failed(hsm.decrypt_aes_gcm(&aes, &iv, aad, &flipped), "flipped tag");
    let mut flipped = ct.clone();
    flipped[0] ^= 1;
    assert_auth_failed(
        hsm.decrypt_aes_gcm(&aes, &iv, aad, &flipped),
        "flipped ciphertext",
    );
    for len in [ct.len() - 1, GCM_TAG_LEN, GCM_TAG_LEN - 1, 1, 0] {
        assert_auth_failed(
            hsm.decrypt_aes_gcm(&aes, &iv, aad, &ct[..len]),
            &format!("truncated to {len}"),
        );
    }
    // Failures leave the HSM usable (a forged blob never looks like an outage).
    hsm.check().unwrap();
    assert_eq!(
        hsm.decrypt_aes_gcm(&aes, &iv, aad, &ct).unwrap().as_slice(),
        pt
    );

    // Keys only do their own kind's operation.
    assert_refused(hsm.hmac_sha256(&aes, b"x"), "HMAC with an AES key");
    assert_refused(
        hsm.encrypt_aes_gcm(&mac, &iv, aad, pt),
        "GCM with an HMAC key",
    );
    hsm.check().unwrap();

    // HMAC-SHA256: deterministic, keyed, data-dependent.
    let h1 = hsm.hmac_sha256(&mac, b"chain head || seq").unwrap();
    assert_eq!(h1, hsm.hmac_sha256(&mac, b"chain head || seq").unwrap());
    assert_ne!(h1, hsm.hmac_sha256(&mac, b"chain head || seq2").unwrap());
    assert_ne!(*h1, [0u8; 32]);
    hsm.hmac_sha256(&mac, b"").unwrap();

    // Attributes of a key that never left the HSM.
    for (id, label) in [(&aes, "arca:contract:v1"), (&mac, "arca:audit-mac")] {
        let a = hsm.key_attributes(id).unwrap();
        assert!(a.token, "{a:?}");
        assert!(a.sensitive, "{a:?}");
        assert!(!a.extractable, "{a:?}");
        assert!(a.always_sensitive, "{a:?}");
        assert!(a.never_extractable, "{a:?}");
        assert_eq!(a.label, label);
    }

    // Randomness.
    let mut r1 = [0u8; 44];
    let mut r2 = [0u8; 44];
    hsm.generate_random(&mut r1).unwrap();
    hsm.generate_random(&mut r2).unwrap();
    assert_ne!(r1, [0u8; 44]);
    assert_ne!(r1, r2);
    hsm.generate_random(&mut []).unwrap();
    let mut large = vec![0u8; 4096];
    hsm.generate_random(&mut large).unwrap();
    assert!(large.iter().any(|b| *b != 0));

    // Unknown ids.
    let unknown = fresh_id(hsm);
    assert!(!hsm.key_exists(&unknown).unwrap());
    assert_not_found(
        hsm.encrypt_aes_gcm(&unknown, &iv, aad, pt),
        "encrypt unknown",
    );
    assert_not_found(
        hsm.decrypt_aes_gcm(&unknown, &iv, aad, &ct),
        "decrypt unknown",
    );
    assert_not_found(hsm.hmac_sha256(&unknown, b"x"), "hmac unknown");
    assert_not_found(hsm.key_attributes(&unknown), "attributes unknown");
    hsm.forget_key(&unknown).unwrap();

    // Destruction (crypto-shredding) is final and idempotent.
    assert!(hsm.destroy_key(&aes).unwrap());
    assert!(!hsm.key_exists(&aes).unwrap());
    assert_not_found(
        hsm.decrypt_aes_gcm(&aes, &iv, aad, &ct),
        "decrypt destroyed",
    );
    assert_not_found(hsm.encrypt_aes_gcm(&aes, &iv, aad, pt), "encrypt destroyed");
    assert_not_found(hsm.key_attributes(&aes), "attributes destroyed");
    assert!(!hsm.destroy_key(&aes).unwrap());
    assert!(hsm.destroy_key(&mac).unwrap());
    assert_not_found(hsm.hmac_sha256(&mac, b"x"), "hmac destroyed");
    assert!(!hsm.destroy_key(&mac).unwrap());
    hsm.check().unwrap();
}

/// Ids and material of keys with known values, shared by the fake reference and SoftHSM.
struct Known {
    aes: ObjectId,
    mac: ObjectId,
    aes_material: [u8; 32],
    mac_material: [u8; 32],
}

impl Known {
    fn new() -> Self {
        let mut aes_material = [0u8; 32];
        let mut mac_material = [0u8; 32];
        for i in 0..32 {
            aes_material[i] = i as u8;
            mac_material[i] = 0xa0 ^ (i as u8);
        }
        Known {
            aes: ObjectId(*b"known-aes-key-01"),
            mac: ObjectId(*b"known-hmac-key01"),
            aes_material,
            mac_material,
        }
    }

    fn reference(&self) -> FakeHsm {
        let fake = FakeHsm::new();
        fake.insert_key(KeyKind::Aes256, &self.aes, "known-aes", self.aes_material)
            .unwrap();
        fake.insert_key(
            KeyKind::HmacSha256,
            &self.mac,
            "known-mac",
            self.mac_material,
        )
        .unwrap();
        fake
    }
}

/// `hsm` holds the [`Known`] keys: its results equal a software implementation's.
fn known_answers(hsm: &dyn Hsm, known: &Known) {
    let reference = known.reference();
    for data in [&b""[..], b"abc", &[0x42; 300]] {
        assert_eq!(
            hsm.hmac_sha256(&known.mac, data).unwrap(),
            reference.hmac_sha256(&known.mac, data).unwrap(),
            "HMAC of {} bytes",
            data.len()
        );
    }
    let iv = [9u8; GCM_IV_LEN];
    let aad = b"context";
    let pt = b"a 32-byte data key, for example!";
    let ct = hsm.encrypt_aes_gcm(&known.aes, &iv, aad, pt).unwrap();
    assert_eq!(
        ct,
        reference.encrypt_aes_gcm(&known.aes, &iv, aad, pt).unwrap()
    );
    let sw = reference
        .encrypt_aes_gcm(&known.aes, &iv, b"", b"xyz")
        .unwrap();
    assert_eq!(
        hsm.decrypt_aes_gcm(&known.aes, &iv, b"", &sw)
            .unwrap()
            .as_slice(),
        b"xyz"
    );
}

#[test]
fn fake_contract() {
    let fake = FakeHsm::new();
    contract(&fake);
    let known = Known::new();
    known_answers(&known.reference(), &known);

    // Simulated outage.
    let aes = fresh_id(&fake);
    fake.generate_key(KeyKind::Aes256, &aes, "k").unwrap();
    fake.set_unavailable(true);
    assert!(fake.check().unwrap_err().is_unavailable());
    assert!(fake
        .encrypt_aes_gcm(&aes, &[0; 12], b"", b"x")
        .unwrap_err()
        .is_unavailable());
    assert!(fake.key_exists(&aes).unwrap_err().is_unavailable());
    fake.set_unavailable(false);
    fake.check().unwrap();
    assert!(fake.key_exists(&aes).unwrap());
}

/// Creates the [`Known`] keys on the token with plain cryptoki (C_CreateObject), then
/// finalizes, so that a `Pkcs11Hsm` can be opened afterwards in this process.
fn import_known(module: &Path, pin: &AuthPin, known: &Known) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let ctx = Pkcs11::new(module).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == LABEL)
        .unwrap();
    {
        let session = ctx.open_rw_session(slot).unwrap();
        session.login(UserType::User, Some(pin)).unwrap();
        for (id, key_type, material, gcm) in [
            (known.aes, KeyType::AES, known.aes_material, true),
            (
                known.mac,
                KeyType::GENERIC_SECRET,
                known.mac_material,
                false,
            ),
        ] {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(key_type),
                    Attribute::Value(material.to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(gcm),
                    Attribute::Decrypt(gcm),
                    Attribute::Sign(!gcm),
                    Attribute::Verify(!gcm),
                    Attribute::Id(id.0.to_vec()),
                    Attribute::Label(b"known".to_vec()),
                ])
                .unwrap();
        }
    }
    ctx.finalize().unwrap();
}

fn config(module: &Path, pin: &AuthPin, sessions: usize, copies: bool) -> Pkcs11Config {
    Pkcs11Config {
        sessions,
        session_key_copies: copies,
        reconnect_interval: Duration::from_millis(100),
        ..Pkcs11Config::new(module, LABEL, pin.clone())
    }
}

fn random_pin(fake: &FakeHsm) -> AuthPin {
    let mut b = [0u8; 12];
    fake.generate_random(&mut b).unwrap();
    AuthPin::from(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

fn hex(id: &ObjectId) -> String {
    id.to_string()
}

/// Deletes a token object from another process, like another Arca node would.
fn delete_elsewhere(module: &Path, pin: &AuthPin, id: &ObjectId) -> bool {
    use secrecy::ExposeSecret;
    let status = Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(module)
        .args(["--token-label", LABEL, "--login", "--pin"])
        .arg(pin.expose_secret())
        .args(["--delete-object", "--type", "secrkey", "--id", &hex(id)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => panic!("pkcs11-tool --delete-object failed: {s}"),
        Err(e) => {
            eprintln!("pkcs11-tool not available ({e}); skipping the cross-process case");
            false
        }
    }
}

/// Session copies: every pooled session may hold one; destroy and forget leave none.
fn session_copies(hsm: &Arc<Pkcs11Hsm>, module: &Path, pin: &AuthPin) {
    let id = fresh_id(hsm.as_ref());
    hsm.generate_key(KeyKind::Aes256, &id, "copies").unwrap();
    let iv = [1u8; GCM_IV_LEN];
    let ct = hsm.encrypt_aes_gcm(&id, &iv, b"", b"secret").unwrap();
    assert!(hsm.session_copy_count(&id).unwrap() >= 1);

    // Use the key from several threads at once, so that several sessions copy it.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let hsm = Arc::clone(hsm);
            let ct = ct.clone();
            std::thread::spawn(move || {
                for _ in 0..300 {
                    hsm.decrypt_aes_gcm(&id, &iv, b"", &ct).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let copies = hsm.session_copy_count(&id).unwrap();
    eprintln!("session copies after concurrent use: {copies}");
    assert!((1..=3).contains(&copies), "{copies} copies for 3 sessions");
    let a = hsm.key_attributes(&id).unwrap();
    assert!(a.token && a.sensitive && !a.extractable, "{a:?}");

    // Destroy: no copy survives anywhere in this process, from any session.
    assert!(hsm.destroy_key(&id).unwrap());
    assert_eq!(hsm.session_copy_count(&id).unwrap(), 0);
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let hsm = Arc::clone(hsm);
            let ct = ct.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    assert!(matches!(
                        hsm.decrypt_aes_gcm(&id, &iv, b"", &ct),
                        Err(HsmError::ObjectNotFound)
                    ));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Another node destroys a key: our copy would keep working until forget_key.
    let id = fresh_id(hsm.as_ref());
    hsm.generate_key(KeyKind::Aes256, &id, "elsewhere").unwrap();
    let ct = hsm.encrypt_aes_gcm(&id, &iv, b"", b"secret").unwrap();
    if delete_elsewhere(module, pin, &id) {
        // The session copy outlives the token object (that is why forget_key exists).
        assert_eq!(
            hsm.decrypt_aes_gcm(&id, &iv, b"", &ct).unwrap().as_slice(),
            b"secret"
        );
        assert!(!hsm.key_exists(&id).unwrap());
        hsm.forget_key(&id).unwrap();
        assert_eq!(hsm.session_copy_count(&id).unwrap(), 0);
        assert_not_found(hsm.decrypt_aes_gcm(&id, &iv, b"", &ct), "after forget");
    }

    // The last resort when a forget cannot be completed: tearing the sessions down. Even
    // with the token object deleted by another process, no copy survives it, and the
    // pool works again after it.
    let id = fresh_id(hsm.as_ref());
    hsm.generate_key(KeyKind::Aes256, &id, "teardown").unwrap();
    let ct = hsm.encrypt_aes_gcm(&id, &iv, b"", b"secret").unwrap();
    assert!(hsm.session_copy_count(&id).unwrap() >= 1);
    let generation = hsm.generation();
    if delete_elsewhere(module, pin, &id) {
        hsm.reset_sessions().unwrap();
        assert!(
            hsm.generation() > generation,
            "reconnected with fresh sessions"
        );
        assert_eq!(hsm.session_copy_count(&id).unwrap(), 0);
        assert_not_found(hsm.decrypt_aes_gcm(&id, &iv, b"", &ct), "after teardown");
    }
    let other = fresh_id(hsm.as_ref());
    hsm.generate_key(KeyKind::Aes256, &other, "after-teardown")
        .unwrap();
    let ct = hsm.encrypt_aes_gcm(&other, &iv, b"", b"ok").unwrap();
    assert_eq!(
        hsm.decrypt_aes_gcm(&other, &iv, b"", &ct)
            .unwrap()
            .as_slice(),
        b"ok"
    );
}

/// Without copies, a handle made stale by another process is noticed on use.
fn stale_token_handle(hsm: &Pkcs11Hsm, module: &Path, pin: &AuthPin) {
    let id = fresh_id(hsm);
    hsm.generate_key(KeyKind::HmacSha256, &id, "stale").unwrap();
    hsm.hmac_sha256(&id, b"cache the handle").unwrap();
    if delete_elsewhere(module, pin, &id) {
        assert_not_found(hsm.hmac_sha256(&id, b"x"), "hmac after external delete");
        assert!(!hsm.destroy_key(&id).unwrap());
    }
}

#[test]
fn softhsm_contract() {
    let Some(module) = softhsm::default_module_path() else {
        panic!("SoftHSM2 is not installed (apt-get install softhsm2)");
    };
    let tmp = tempfile::tempdir().unwrap();
    let conf = softhsm::write_config(tmp.path()).unwrap();
    // Once, before any C_Initialize in this process (edition 2021: safe).
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let rng = FakeHsm::new();
    let so_pin = random_pin(&rng);
    let pin = random_pin(&rng);

    // Token initialisation through PKCS#11, then open in the same process.
    assert!(!softhsm::token_exists(&module, LABEL).unwrap());
    softhsm::init_token(&module, LABEL, &so_pin, &pin).unwrap();
    assert!(softhsm::token_exists(&module, LABEL).unwrap());
    assert!(matches!(
        softhsm::init_token(&module, LABEL, &so_pin, &pin),
        Err(HsmError::ObjectExists)
    ));
    let known = Known::new();
    import_known(&module, &pin, &known);

    // Start-up failures.
    match Pkcs11Hsm::open(config(&module, &AuthPin::from("wrong-pin"), 1, false)) {
        Err(HsmError::LoginRefused { detail }) => assert_eq!(detail, "CKR_PIN_INCORRECT"),
        other => panic!("wrong PIN: {other:?}"),
    }
    match Pkcs11Hsm::open(Pkcs11Config {
        token_label: "no-such-token".into(),
        ..config(&module, &pin, 1, false)
    }) {
        Err(HsmError::TokenNotFound { label }) => assert_eq!(label, "no-such-token"),
        other => panic!("unknown label: {other:?}"),
    }
    match Pkcs11Hsm::open(config(
        Path::new("/nonexistent/libnothing.so"),
        &pin,
        1,
        false,
    )) {
        Err(HsmError::Module { .. }) => {}
        other => panic!("missing module: {other:?}"),
    }
    assert!(matches!(
        Pkcs11Hsm::open(config(&module, &pin, 0, false)),
        Err(HsmError::InvalidInput(_))
    ));

    // Token keys used directly.
    {
        let hsm = Pkcs11Hsm::open(config(&module, &pin, 2, false)).unwrap();
        let dbg = format!("{hsm:?}");
        assert!(!dbg.contains(secrecy::ExposeSecret::expose_secret(&pin)));
        // C_Initialize is per process: a second instance on the module is refused.
        match Pkcs11Hsm::open(config(&module, &pin, 1, false)) {
            Err(HsmError::Module { detail, .. }) => {
                assert!(detail.contains("ALREADY_INITIALIZED"), "{detail}")
            }
            other => panic!("second instance: {other:?}"),
        }
        contract(&hsm);
        known_answers(&hsm, &known);
        stale_token_handle(&hsm, &module, &pin);
        assert_eq!(hsm.generation(), 1);
    }

    // Session copies, three sessions.
    {
        let hsm = Arc::new(Pkcs11Hsm::open(config(&module, &pin, 3, true)).unwrap());
        contract(hsm.as_ref());
        known_answers(hsm.as_ref(), &known);
        session_copies(&hsm, &module, &pin);
        assert!(!hsm.is_down());
    }

    // The known keys are still there after all that, and a reopen works.
    let hsm = Pkcs11Hsm::open(config(&module, &pin, 1, true)).unwrap();
    known_answers(&hsm, &known);
    drop(hsm);
    assert!(softhsm::token_exists(&module, LABEL).unwrap());
    let _: PathBuf = conf;
}
