//! Unit tests of the access policy: the shipped files, decisions by table, validation at
//! load.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::authz::ratelimit::Limit;

type Row<'a> = (
    &'a str,
    &'a [&'a str],
    Action,
    Option<&'a str>,
    Option<&'a BTreeMap<String, String>>,
    bool,
);

fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn decide(p: &Policy, who: &str, token_roles: &[&str], req: Request<'_>) -> Decision {
    let token: Vec<String> = token_roles.iter().map(|s| s.to_string()).collect();
    let roles = p.roles_of(who, &token);
    p.authorize(
        Subject {
            name: who,
            roles: &roles,
        },
        req,
    )
}

fn allowed(p: &Policy, who: &str, action: Action, key: Option<&str>) -> bool {
    matches!(
        decide(
            p,
            who,
            &[],
            Request {
                action,
                key,
                context: Some(&BTreeMap::new()),
            }
        ),
        Decision::Allow(_)
    )
}

#[test]
fn the_shipped_policy_loads_and_the_built_in_copy_equals_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let on_disk = Policy::load_dir(&dir).unwrap();
    assert_eq!(on_disk, Policy::default());
    for r in [
        "service",
        "key-admin",
        "custodian",
        "auditor",
        "break-glass",
        "admin",
    ] {
        assert!(on_disk.role(r).is_some(), "{r}");
    }
}

/// Roles × operations × key names on the shipped policy.
#[test]
fn shipped_roles_table() {
    use Action::*;
    let p = Policy::default();
    let k = Some("billing/ssn");
    #[rustfmt::skip]
    let table: &[(&str, Action, Option<&str>, bool)] = &[
        // A service uses keys, never administers them.
        ("svc:billing", GenerateDataKey, k, true),
        ("svc:billing", WrapKey, k, true),
        ("svc:billing", UnwrapKey, k, true),
        ("svc:billing", RewrapKey, k, true),
        ("svc:billing", CreateKey, k, false),
        ("svc:billing", RotateKey, k, false),
        ("svc:billing", DisableKeyVersion, k, false),
        ("svc:billing", CreateToken, None, false),
        ("svc:billing", Approve, None, false),
        ("svc:billing", QueryAudit, None, false),
        // A key admin administers keys, never sees their material.
        ("key-admin:ann", CreateKey, k, true),
        ("key-admin:ann", GetKey, k, true),
        ("key-admin:ann", ListKeys, k, true),
        ("key-admin:ann", RotateKey, k, true),
        ("key-admin:ann", DisableKeyVersion, k, true),
        ("key-admin:ann", EnableKeyVersion, k, true),
        ("key-admin:ann", RetireKeyVersion, k, true),
        ("key-admin:ann", RetireKey, k, true),
        ("key-admin:ann", CancelRetirement, k, true),
        ("key-admin:ann", SetRetention, k, true),
        ("key-admin:ann", UnwrapKey, k, false),
        ("key-admin:ann", GenerateDataKey, k, false),
        ("key-admin:ann", WrapKey, k, false),
        ("key-admin:ann", Approve, None, false),
        ("key-admin:ann", Elevate, None, true),
        // Custodians unseal and approve; no key operation.
        ("custodian:c1", Unseal, None, true),
        ("custodian:c1", Approve, None, true),
        ("custodian:c1", Reject, None, true),
        ("custodian:c1", UnwrapKey, k, false),
        ("custodian:c1", CreateKey, k, false),
        // Auditors read the audit trail and close reviews; no key operation.
        ("auditor:eve", QueryAudit, None, true),
        ("auditor:eve", VerifyAudit, None, true),
        ("auditor:eve", ListReviews, None, true),
        ("auditor:eve", CloseReview, None, true),
        ("auditor:eve", GetKey, k, false),
        ("auditor:eve", UnwrapKey, k, false),
        ("auditor:eve", ListKeys, k, false),
        // Nobody bound: nothing.
        ("stranger", GetKey, k, false),
        ("stranger", ListRequests, None, false),
        // The dev/bootstrap admin keeps what it had.
        ("dev-admin", CreateToken, None, true),
        ("dev-admin", Init, None, true),
        ("dev-admin", CreateKey, k, true),
        ("dev-admin", UnwrapKey, k, true),
        ("dev-admin", Approve, None, false),
    ];
    for (who, action, key, want) in table {
        assert_eq!(
            allowed(&p, who, *action, *key),
            *want,
            "{who} {action} {key:?}"
        );
    }
}

const CUSTOM: &str = r#"
version = 1

[roles.tenant-svc]
mfa = false
[[roles.tenant-svc.allow]]
operations = ["GenerateDataKey", "UnwrapKey"]
keys = ["tenants/*"]
context = { tenant = ["${principal.id}"], purpose = ["billing", "care"] }
[[roles.tenant-svc.allow]]
operations = ["GetKey"]
keys = ["tenants/*", "shared"]

[roles.audit-svc]
[[roles.audit-svc.allow]]
operations = ["WrapKey"]
keys = ["*"]
context = { owner = ["${principal}"], region = ["*"] }

[roles.ops]
mfa = true
max_elevation = "30m"
rate_limit = { per_second = 2.0, burst = 2 }
[[roles.ops.allow]]
operations = ["RotateKey", "GetKey"]
keys = ["*"]

[groups]
oncall = ["alice", "bob"]

[[bindings]]
principals = ["svc:*"]
roles = ["tenant-svc"]

[[bindings]]
groups = ["oncall"]
roles = ["ops"]

[[bindings]]
principals = ["svc:audit"]
roles = ["audit-svc"]

[break_glass]
principals = ["alice"]
role = "ops"
max_duration = "1h"
"#;

#[test]
fn globs_groups_context_and_token_narrowing() {
    use Action::*;
    let p = Policy::parse(CUSTOM).unwrap();
    let good = ctx(&[("tenant", "acme"), ("purpose", "care")]);
    let other = ctx(&[("tenant", "globex"), ("purpose", "care")]);
    let bad_purpose = ctx(&[("tenant", "acme"), ("purpose", "ads")]);
    let missing = ctx(&[("tenant", "acme")]);
    let owner_ok = ctx(&[("owner", "svc:audit"), ("region", "eu-1")]);
    let owner_bad = ctx(&[("owner", "audit"), ("region", "eu-1")]);
    let no_region = ctx(&[("owner", "svc:audit")]);
    #[rustfmt::skip]
    let table: &[Row] = &[
        ("svc:acme", &[], GenerateDataKey, Some("tenants/acme"), Some(&good), true),
        ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&good), true),
        ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&other), false),
        ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&bad_purpose), false),
        ("svc:acme", &[], UnwrapKey, Some("tenants/acme"), Some(&missing), false),
        ("svc:acme", &[], UnwrapKey, Some("other/x"), Some(&good), false),
        ("svc:acme", &[], WrapKey, Some("tenants/acme"), Some(&good), false),
        ("svc:acme", &[], GetKey, Some("shared"), None, true),
        ("svc:acme", &[], RotateKey, Some("shared"), None, false),
        // A pre-check without key or context: some rule may allow it.
        ("svc:acme", &[], UnwrapKey, None, None, true),
        ("alice", &[], RotateKey, Some("any"), None, true),
        ("carol", &[], RotateKey, Some("any"), None, false),
        // The token narrows: a token naming only another role holds nothing here.
        ("alice", &["tenant-svc"], RotateKey, Some("any"), None, false),
        ("svc:acme", &["tenant-svc", "ops"], GetKey, Some("shared"), None, true),
        ("svc:audit", &[], WrapKey, Some("k"), Some(&owner_ok), true),
        ("svc:audit", &[], WrapKey, Some("k"), Some(&owner_bad), false),
        ("svc:audit", &[], WrapKey, Some("k"), Some(&no_region), false),
        ("alice", &[], BreakGlass, None, None, true),
        ("alice", &["tenant-svc"], EnrollTotp, None, None, true),
        ("carol", &[], EnrollTotp, None, None, false),
        ("bob", &[], BreakGlass, None, None, false),
    ];
    for (who, token, action, key, context, want) in table {
        let d = decide(
            &p,
            who,
            token,
            Request {
                action: *action,
                key: *key,
                context: *context,
            },
        );
        assert_eq!(
            matches!(d, Decision::Allow(_)),
            *want,
            "{who} {token:?} {action} {key:?} {context:?}"
        );
    }
    let Decision::Allow(a) = decide(
        &p,
        "bob",
        &[],
        Request {
            action: RotateKey,
            key: Some("k"),
            context: None,
        },
    ) else {
        panic!("bob may rotate");
    };
    assert!(a.mfa);
    assert_eq!(a.role, "ops");
    assert_eq!(
        a.limit,
        Some(Limit {
            per_second: 2.0,
            burst: 2.0
        })
    );
    assert_eq!(p.role("ops").unwrap().max_elevation_ms(), Some(1_800_000));
    assert_eq!(p.break_glass().unwrap().max_ms, 3_600_000);
}

#[test]
fn separation_of_duties_is_checked_at_load() {
    let bad = r#"
version = 1
[roles.rogue]
[[roles.rogue.allow]]
operations = ["UnwrapKey"]
keys = ["*"]
[[roles.rogue.allow]]
operations = ["Approve"]
"#;
    let e = Policy::parse(bad).unwrap_err();
    assert!(matches!(e, PolicyError::SeparationOfDuties(ref r) if r == "rogue"));
    assert!(e.to_string().contains("\"rogue\""), "{e}");
    assert!(e.to_string().contains("separation of duties"), "{e}");
}

#[test]
fn refuses_what_it_does_not_know() {
    let ok =
        "version = 1\n[roles.r]\n[[roles.r.allow]]\noperations = [\"GetKey\"]\nkeys = [\"*\"]\n";
    Policy::parse(ok).unwrap();
    for (bad, what) in [
        (ok.replace("version = 1", "version = 2"), "version"),
        (ok.replace("GetKey", "GetKeys"), "unknown operation"),
        (format!("{ok}colour = \"red\"\n"), "unknown field"),
        (
            ok.replace("keys = [\"*\"]\n", "keyz = [\"*\"]\n"),
            "unknown field",
        ),
        (ok.replace("keys = [\"*\"]\n", ""), "needs keys"),
        (
            format!("{ok}[[bindings]]\nprincipals = [\"x\"]\nroles = [\"nope\"]\n"),
            "unknown role",
        ),
        (
            format!("{ok}[[bindings]]\ngroups = [\"g\"]\nroles = [\"r\"]\n"),
            "unknown group",
        ),
        (
            format!("{ok}[[bindings]]\nroles = [\"r\"]\n"),
            "no principals",
        ),
        (
            ok.replace(
                "[[roles.r.allow]]",
                "max_elevation = \"2h\"\n[[roles.r.allow]]",
            ),
            "invalid duration",
        ),
        (
            ok.replace(
                "[[roles.r.allow]]",
                "rate_limit = { per_second = 0.0 }\n[[roles.r.allow]]",
            ),
            "rate_limit",
        ),
        (
            ok.replace(
                "keys = [\"*\"]",
                "keys = [\"*\"]\ncontext = { t = [\"a\"] }",
            ),
            "context conditions apply only",
        ),
        (ok.replace("GetKey", "BreakGlass"), "break_glass"),
        (
            ok.replace("[roles.r]", "[roles.R]")
                .replace("roles.r.", "roles.R."),
            "invalid role name",
        ),
        (
            format!("{ok}[break_glass]\nprincipals = [\"a\"]\nrole = \"zz\"\n"),
            "unknown role",
        ),
        ("not toml".to_string(), "invalid access policy"),
    ] {
        let e = Policy::parse(&bad).unwrap_err().to_string();
        assert!(e.contains(what), "{bad:?}: {e}");
    }
    // The same role in two files.
    let e = Policy::from_files(&[("a.toml", ok), ("b.toml", ok)]).unwrap_err();
    assert!(e.to_string().contains("defined twice"), "{e}");
}

#[test]
fn load_dir_skips_other_loaders_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quorum.toml"), "operations = []").unwrap();
    std::fs::write(dir.path().join("alerts.toml"), "whatever = 1").unwrap();
    std::fs::write(dir.path().join("lifecycle.toml"), "waiting = 1").unwrap();
    std::fs::write(dir.path().join("README.md"), "# hi").unwrap();
    assert!(Policy::load_dir(dir.path()).is_err(), "no role files");
    std::fs::write(dir.path().join("custom.toml"), CUSTOM).unwrap();
    let p = Policy::load_dir(dir.path()).unwrap();
    assert!(p.role("ops").is_some());
    assert!(matches!(
        Policy::resolve(Some(&dir.path().join("missing"))),
        Err(PolicyError::Read { .. })
    ));
}

/// The shipped roles and bindings, then `extra` (one document).
fn shipped_with(extra: &str) -> Result<Policy, PolicyError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let roles = std::fs::read_to_string(dir.join("roles.toml")).unwrap();
    let bindings = std::fs::read_to_string(dir.join("bindings.toml")).unwrap();
    Policy::from_files(&[
        ("bindings.toml", bindings.as_str()),
        ("roles.toml", roles.as_str()),
        ("people.toml", &format!("version = 1\n{extra}")),
    ])
}

#[test]
fn people_name_the_person_behind_each_principal() {
    let p = shipped_with("[people]\nalice = [\"key-admin:alice\", \"custodian:alice\"]\n").unwrap();
    assert_eq!(p.person_of("key-admin:alice"), "alice");
    assert_eq!(p.person_of("custodian:alice"), "alice");
    // A principal nobody claims is a person of its own.
    assert_eq!(p.person_of("custodian:bob"), "custodian:bob");
    assert_eq!(p.person_of("dev-admin"), "dev-admin");
    // Without [people], every principal is its own person.
    assert_eq!(
        Policy::default().person_of("custodian:alice"),
        "custodian:alice"
    );
}

#[test]
fn a_principal_claimed_by_two_people_refuses_to_load_naming_file_and_principal() {
    let e = Policy::from_files(&[
        (
            "a.toml",
            "version = 1\n[people]\nalice = [\"custodian:x\"]\n",
        ),
        (
            "b.toml",
            "version = 1\n[people]\nbob = [\"svc:b\", \"custodian:x\"]\n",
        ),
    ])
    .unwrap_err();
    assert!(
        matches!(e, PolicyError::PrincipalClaimedTwice { ref file, ref principal, .. }
            if file == "b.toml" && principal == "custodian:x"),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("b.toml") && text.contains("\"custodian:x\""),
        "{text}"
    );
}

#[test]
fn people_claim_exact_principals_once_each() {
    for (bad, what) in [
        ("[people]\nalice = [\"custodian:*\"]\n", "a glob"),
        ("[people]\nalice = [\"\"]\n", "an empty name"),
        ("[people]\nalice = []\n", "no principals"),
        ("[people]\n\"Alice Smith\" = [\"x\"]\n", "a bad person name"),
        (
            "[people]\nalice = [\"bob\"]\nbob = [\"custodian:bob\"]\n",
            "a person that is another's principal",
        ),
    ] {
        assert!(shipped_with(bad).is_err(), "{what}");
    }
    // One person defined in two files.
    let e = Policy::from_files(&[
        ("a.toml", "version = 1\n[people]\nalice = [\"x\"]\n"),
        ("b.toml", "version = 1\n[people]\nalice = [\"y\"]\n"),
    ]);
    assert!(e.is_err());
    // The same principal twice for the same person is harmless.
    shipped_with("[people]\nalice = [\"x\", \"x\"]\n").unwrap();
}

#[test]
fn separation_of_duties_is_checked_per_person() {
    // Alice as a service and as a custodian: she would unwrap and approve.
    let e = shipped_with("[people]\nalice = [\"svc:alice\", \"custodian:alice\"]\n").unwrap_err();
    assert!(
        matches!(e, PolicyError::PersonSeparationOfDuties { ref person, ref material_role, ref approve_role, .. }
            if person == "alice" && material_role == "service" && approve_role == "custodian"),
        "{e}"
    );
    assert!(e.to_string().contains("separation of duties"), "{e}");
    // As a key admin and a custodian she neither retrieves material: allowed.
    shipped_with("[people]\nalice = [\"key-admin:alice\", \"custodian:alice\"]\n").unwrap();
    // The admin role retrieves material: the bootstrap admin cannot be a custodian.
    assert!(matches!(
        shipped_with("[people]\nroot = [\"dev-admin\", \"custodian:root\"]\n"),
        Err(PolicyError::PersonSeparationOfDuties { .. })
    ));
}

#[test]
fn separation_of_duties_is_checked_per_principal_across_bindings() {
    // One principal bound to service and custodian by two bindings.
    for extra in [
        "[[bindings]]\nprincipals = [\"custodian:alice\"]\nroles = [\"service\"]\n",
        "[[bindings]]\nprincipals = [\"*\"]\nroles = [\"service\"]\n",
        "[[bindings]]\nprincipals = [\"svc:x\"]\nroles = [\"custodian\"]\n",
        "[groups]\nops = [\"*:ops\"]\n[[bindings]]\ngroups = [\"ops\"]\nroles = [\"service\"]\n",
    ] {
        let e = shipped_with(extra).unwrap_err();
        assert!(
            matches!(e, PolicyError::PrincipalSeparationOfDuties { .. }),
            "{extra}: {e}"
        );
    }
    // Disjoint patterns: fine.
    shipped_with("[[bindings]]\nprincipals = [\"app:*\"]\nroles = [\"service\"]\n").unwrap();
}

#[test]
fn token_lifetimes_default_bounded_and_checked_at_load() {
    const DAY: i64 = 24 * 3600 * 1000;
    // As shipped: 90 days by default, at most 365.
    let shipped = Policy::default().token_lifetimes();
    assert_eq!((shipped.default_ms, shipped.max_ms), (90 * DAY, 365 * DAY));
    // Without [tokens], the same: no token made by CreateToken lives forever.
    let bare = Policy::parse("version = 1\n").unwrap().token_lifetimes();
    assert_eq!(bare, TokenLifetimes::default());
    let p = Policy::parse("version = 1\n[tokens]\ndefault_ttl = \"1d\"\nmax_ttl = \"7d\"\n")
        .unwrap()
        .token_lifetimes();
    assert_eq!((p.default_ms, p.max_ms), (DAY, 7 * DAY));
    // Only a maximum below the built-in default: the default shrinks to it.
    let p = Policy::parse("version = 1\n[tokens]\nmax_ttl = \"30d\"\n")
        .unwrap()
        .token_lifetimes();
    assert_eq!((p.default_ms, p.max_ms), (30 * DAY, 30 * DAY));
    for (bad, says) in [
        (
            "default_ttl = \"8d\"\nmax_ttl = \"7d\"",
            "longer than max_ttl",
        ),
        ("max_ttl = \"366d\"", "max_ttl"),
        ("default_ttl = \"30s\"", "default_ttl"),
        ("max_ttl = \"forever\"", "max_ttl"),
        ("lifetime = \"1d\"", "unknown field"),
    ] {
        let e = Policy::parse(&format!("version = 1\n[tokens]\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    // Defined in two files: refused.
    let e = Policy::from_files(&[
        ("a.toml", "version = 1\n[tokens]\nmax_ttl = \"7d\"\n"),
        ("b.toml", "version = 1\n[tokens]\nmax_ttl = \"8d\"\n"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("[tokens] is defined twice"), "{e}");
}
