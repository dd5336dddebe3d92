//! Authorization as a value: one decision per call, refusals that reveal nothing, and the
//! facts a call returns for its audit record.

use super::{admin, caller, ok, open_world};
use crate::keys::EncryptionContext;
use crate::service::{Conflict, Facts, ServiceConfig, ServiceError};

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn a_caller_without_the_right_learns_nothing_about_keys() {
    let w = open_world(ServiceConfig::default()).await;
    let keys = &w.svc.keys;
    ok(keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    let dk = ok(keys
        .generate_data_key(&admin(), "phi", ctx(&[("t", "1")]), false)
        .await);
    let nobody = caller("nobody", &[]);
    // The same refusal for a key that exists and one that does not.
    for name in ["phi", "nope"] {
        assert!(matches!(
            keys.get_key(&nobody, name).await.result,
            Err(ServiceError::PermissionDenied)
        ));
    }
    // A valid blob, garbage and a blob of an unknown key: the same refusal.
    let mut unknown = dk.wrapped.clone();
    unknown[1] ^= 0xff;
    for blob in [dk.wrapped.clone(), b"garbage".to_vec(), unknown.clone()] {
        assert!(matches!(
            keys.unwrap_key(&nobody, &blob, ctx(&[("t", "1")]))
                .await
                .result,
            Err(ServiceError::PermissionDenied)
        ));
    }
    // A caller who may unwrap gets the one INVALID_ARGUMENT for the unknown key.
    assert!(matches!(
        keys.unwrap_key(&admin(), &unknown, ctx(&[("t", "1")]))
            .await
            .result,
        Err(ServiceError::InvalidWrappedKey)
    ));
}

#[tokio::test]
async fn a_call_returns_the_facts_of_its_audit_record() {
    let w = open_world(ServiceConfig::default()).await;
    let keys = &w.svc.keys;
    ok(keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    let out = keys
        .generate_data_key(&admin(), "phi", ctx(&[("t", "1")]), true)
        .await;
    assert_eq!(out.facts.key.as_deref(), Some("phi"));
    assert_eq!(out.facts.version, Some(1));
    let dk = ok(out);
    let out = keys
        .unwrap_key(&admin(), &dk.wrapped, ctx(&[("t", "1")]))
        .await;
    assert_eq!(out.facts.key.as_deref(), Some("phi"));
    assert_eq!(out.facts.version, Some(1));
    assert!(out.result.is_ok());
    // A failure keeps what was known: the key and version the blob named, for a caller
    // allowed to use that key.
    let out = keys
        .unwrap_key(&admin(), &dk.wrapped, ctx(&[("t", "2")]))
        .await;
    assert!(matches!(out.result, Err(ServiceError::InvalidWrappedKey)));
    assert_eq!(out.facts.key.as_deref(), Some("phi"));
    assert_eq!(out.facts.version, Some(1));
    // A refusal of a disabled version names it too.
    ok(w.svc.lifecycle.disable_version(&admin(), "phi", 1).await);
    let out = keys
        .unwrap_key(&admin(), &dk.wrapped, ctx(&[("t", "1")]))
        .await;
    assert!(matches!(out.result, Err(ServiceError::Conflict(_))));
    assert_eq!(
        out.facts,
        Facts {
            context_digest: out.facts.context_digest.clone(),
            ..Facts::key("phi", Some(1))
        }
    );
    // A caller who may not use the key learns nothing and its record names nothing.
    let out = keys
        .unwrap_key(&caller("nobody", &[]), &dk.wrapped, ctx(&[("t", "1")]))
        .await;
    assert!(matches!(out.result, Err(ServiceError::PermissionDenied)));
    assert_eq!((out.facts.key, out.facts.version), (None, None));
    // A refusal before any lookup names only what the caller asked for.
    let out = keys.get_key(&caller("nobody", &[]), "phi").await;
    assert_eq!(out.facts, Facts::key("phi", None));
}

/// Roles for the refusals below: an MFA role and a context-bound role that may unwrap.
const REFUSALS: &str = r#"
version = 1
[roles.admin]
[[roles.admin.allow]]
operations = ["CreateKey", "GenerateDataKey", "WrapKey", "UnwrapKey", "RewrapKey",
              "DisableKeyVersion", "RotateKey"]
keys = ["*"]
[roles.careful]
mfa = true
[[roles.careful.allow]]
operations = ["UnwrapKey"]
keys = ["*"]
[roles.tenant]
[[roles.tenant.allow]]
operations = ["UnwrapKey"]
keys = ["*"]
context = { t = ["2"] }
[[bindings]]
principals = ["dev-admin"]
roles = ["admin"]
[[bindings]]
principals = ["m"]
roles = ["careful"]
[[bindings]]
principals = ["c"]
roles = ["tenant"]
"#;

#[tokio::test]
async fn every_refusal_on_a_key_the_caller_may_use_names_the_key_and_version() {
    let w = open_world(ServiceConfig {
        access_policy: crate::authz::policy::Policy::parse(REFUSALS).unwrap(),
        ..ServiceConfig::default()
    })
    .await;
    let keys = &w.svc.keys;
    let t1 = || ctx(&[("t", "1")]);
    ok(keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    let dk = ok(keys.generate_data_key(&admin(), "phi", t1(), true).await);
    let named = |facts: &Facts, version: u32| {
        assert_eq!(
            (facts.key.as_deref(), facts.version),
            (Some("phi"), Some(version)),
            "{facts:?}"
        );
    };

    // A rotation names the version it made.
    let out = w.svc.rotation.rotate_key(&admin(), "phi").await;
    named(&out.facts, 2);
    ok(out);
    // The primary (v2) disabled: a wrap is refused, and its record names v2.
    ok(w.svc.lifecycle.disable_version(&admin(), "phi", 2).await);
    let out = keys.generate_data_key(&admin(), "phi", t1(), true).await;
    assert!(matches!(
        out.result,
        Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled))
    ));
    named(&out.facts, 2);
    let plaintext = || crate::secret::Plaintext::new(zeroize::Zeroizing::new(vec![7; 32]));
    let out = keys.wrap_key(&admin(), "phi", plaintext(), t1()).await;
    assert!(matches!(
        out.result,
        Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled))
    ));
    named(&out.facts, 2);
    // A rewrap refused for the primary names the version the blob was wrapped under.
    let out = keys.rewrap_key(&admin(), &dk.wrapped, t1()).await;
    assert!(matches!(
        out.result,
        Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled))
    ));
    named(&out.facts, 1);
    // A wrap refused by the policy names only the key the caller named.
    let out = keys
        .wrap_key(&caller("nobody", &[]), "phi", plaintext(), t1())
        .await;
    assert!(matches!(out.result, Err(ServiceError::PermissionDenied)));
    assert_eq!(
        (out.facts.key.as_deref(), out.facts.version),
        (Some("phi"), None)
    );

    // A caller the policy allows on the key, refused for want of its TOTP code: the
    // record names the key and version (the caller learnt as much from the refusal).
    let out = keys.unwrap_key(&caller("m", &[]), &dk.wrapped, t1()).await;
    assert!(
        matches!(out.result, Err(ServiceError::Mfa(_))),
        "{:?}",
        out.result.err()
    );
    named(&out.facts, 1);
    // A caller the policy refuses for this context: answered as a blob naming no key (a
    // blob is no existence oracle); the record names the key, no version, and says why.
    let out = keys.unwrap_key(&caller("c", &[]), &dk.wrapped, t1()).await;
    assert!(matches!(out.result, Err(ServiceError::InvalidWrappedKey)));
    assert_eq!(
        (
            out.facts.key.as_deref(),
            out.facts.version,
            out.facts.detail
        ),
        (
            Some("phi"),
            None,
            Some(crate::service::POLICY_REFUSED_AS_INVALID)
        )
    );
}

/// An admin, and a service that may unwrap and rewrap only `other/*` keys.
const SCOPED: &str = r#"
version = 1
[roles.admin]
[[roles.admin.allow]]
operations = ["CreateKey", "GenerateDataKey", "UnwrapKey", "RewrapKey"]
keys = ["*"]
[roles.other]
[[roles.other.allow]]
operations = ["UnwrapKey", "RewrapKey"]
keys = ["other/*"]
[[bindings]]
principals = ["dev-admin"]
roles = ["admin"]
[[bindings]]
principals = ["o"]
roles = ["other"]
"#;

#[tokio::test]
async fn a_blob_of_a_key_the_caller_may_not_use_answers_as_a_blob_of_no_key() {
    let w = open_world(ServiceConfig {
        access_policy: crate::authz::policy::Policy::parse(SCOPED).unwrap(),
        ..ServiceConfig::default()
    })
    .await;
    let keys = &w.svc.keys;
    ok(keys
        .create_key(&admin(), "phi", "", Default::default())
        .await);
    let dk = ok(keys
        .generate_data_key(&admin(), "phi", ctx(&[("t", "1")]), true)
        .await);
    let mut unknown = dk.wrapped.clone();
    unknown[1] ^= 0xff;
    // "o" may unwrap and rewrap other/* keys only: phi's blob is refused by the policy
    // and answered exactly as the blob of a key that does not exist.
    let tenant = caller("o", &[]);
    for rewrap in [false, true] {
        let (forbidden, missing) = if rewrap {
            (
                keys.rewrap_key(&tenant, &dk.wrapped, ctx(&[("t", "1")]))
                    .await
                    .map(|_| ()),
                keys.rewrap_key(&tenant, &unknown, ctx(&[("t", "1")]))
                    .await
                    .map(|_| ()),
            )
        } else {
            (
                keys.unwrap_key(&tenant, &dk.wrapped, ctx(&[("t", "1")]))
                    .await
                    .map(|_| ()),
                keys.unwrap_key(&tenant, &unknown, ctx(&[("t", "1")]))
                    .await
                    .map(|_| ()),
            )
        };
        assert!(matches!(
            forbidden.result,
            Err(ServiceError::InvalidWrappedKey)
        ));
        assert!(matches!(
            missing.result,
            Err(ServiceError::InvalidWrappedKey)
        ));
        // Only the record tells them apart.
        assert_eq!(
            (forbidden.facts.key.as_deref(), forbidden.facts.version),
            (Some("phi"), None)
        );
        assert_eq!(
            forbidden.facts.detail,
            Some(crate::service::POLICY_REFUSED_AS_INVALID)
        );
        assert_eq!((missing.facts.key, missing.facts.detail), (None, None));
    }
}
