//! Quorum gates on every admin operation and token lifetimes (issue 18), each written as
//! the attack it stops:
//! - one key admin re-enabling a version the quorum disabled gets an approval request,
//!   and the version stays DISABLED;
//! - with `CreateToken` in `quorum.toml`, one token admin cannot mint a token: the call
//!   opens a request, the requester's token (made by the requester, only its SHA-256
//!   sent) does not work until K custodians approve, then it does — and the approving
//!   custodian never sees it;
//! - a token created with no lifetime expires (the access policy's `[tokens]
//!   default_ttl`), and one asked for longer than `max_ttl` is refused.

use arca::grpc::pb;
use arca::secret::BearerToken;
use tonic::Code;

use crate::support::{assert_code, get_key, three_of_five, unsealed, version_state, Db, TestArca};

const DAY_MS: i64 = 24 * 3600 * 1000;

/// The shipped quorum policy with `CreateToken` added.
fn quorum_policy_with_create_token(dir: &std::path::Path) -> std::path::PathBuf {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/policies/quorum.toml"))
            .unwrap();
    let text = shipped.replace(
        "    \"Elevate\",\n]",
        "    \"Elevate\",\n    \"CreateToken\",\n]",
    );
    assert_ne!(text, shipped, "the shipped quorum policy changed shape");
    let path = dir.join("quorum.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A policy directory: the shipped roles and bindings, with `[tokens]` as given.
fn access_policy_with_tokens(dir: &std::path::Path, tokens: &str) -> std::path::PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let p = dir.join("policies");
    std::fs::create_dir_all(&p).unwrap();
    let roles = std::fs::read_to_string(format!("{root}/roles.toml")).unwrap();
    std::fs::write(p.join("roles.toml"), roles).unwrap();
    let bindings = std::fs::read_to_string(format!("{root}/bindings.toml")).unwrap();
    let cut = bindings
        .find("[tokens]")
        .expect("[tokens] in bindings.toml");
    std::fs::write(
        p.join("bindings.toml"),
        format!("{}[tokens]\n{tokens}\n", &bindings[..cut]),
    )
    .unwrap();
    p
}

/// A fresh token as a client makes it: `arca_` + 64 random hex digits.
fn client_made_token() -> BearerToken {
    BearerToken::from_random(&arca::secret::random::<32>().unwrap())
}

async fn list_keys_with(arca: &TestArca, token: &str) -> Result<(), tonic::Status> {
    arca.keys(token)
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .map(|_| ())
}

on_both_backends!(
    #[tokio::test]
    a_quorum_approved_disable_is_not_undone_by_one_key_admin
);

async fn a_quorum_approved_disable_is_not_undone_by_one_key_admin(db: Db) {
    let (arca, cs) = unsealed(three_of_five(db)).await;
    let mut c = arca.client().await;
    let req = c
        .disable_key_version(pb::KeyVersionRequest {
            name: "phi".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .approval_request
        .expect("DisableKeyVersion is gated");
    for n in [1, 2] {
        assert_eq!(cs.approve(&arca, n, &req).await.unwrap().state, "PENDING");
    }
    assert_eq!(cs.approve(&arca, 3, &req).await.unwrap().state, "EXECUTED");
    assert_eq!(
        version_state(&get_key(&mut c, "phi").await, 1),
        pb::KeyVersionState::Disabled
    );

    // One key admin re-enables: an approval request, not the change.
    let r = c
        .enable_key_version(pb::KeyVersionRequest {
            name: "phi".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.key.is_none(),
        "EnableKeyVersion ran without approval: {r:?}"
    );
    let again = r.approval_request.expect("an approval request");
    assert_eq!(again.operation, "EnableKeyVersion");
    assert_eq!(again.state, "PENDING");
    assert_eq!(
        version_state(&get_key(&mut c, "phi").await, 1),
        pb::KeyVersionState::Disabled,
        "one admin undid a quorum-approved disable"
    );
}

on_both_backends!(
    #[tokio::test]
    with_create_token_gated_one_token_admin_cannot_mint_a_token
);

async fn with_create_token_gated_one_token_admin_cannot_mint_a_token(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let policy = quorum_policy_with_create_token(dir.path());
    let (arca, cs) = unsealed(three_of_five(db).arg("--quorum-policy").arg(&policy)).await;
    let mut access = arca.access(arca.token()).await;
    let ask = |sha: String| pb::CreateTokenRequest {
        principal: "svc:phi-reader".into(),
        roles: vec!["service".into()],
        key_globs: vec!["phi".into()],
        ttl_seconds: 3600,
        token_sha256: sha,
        ..Default::default()
    };

    // Asking the server to mint one: refused (it would have to hand the token to someone).
    let e = access.create_token(ask(String::new())).await;
    let s = assert_code(e, Code::InvalidArgument, "a gated CreateToken with no hash");
    assert!(s.message().contains("token_sha256"), "{s:?}");

    // The requester makes the token and sends its hash: a request, no token.
    let token = client_made_token();
    let hash = token.hash().to_hex();
    let r = access
        .create_token(ask(hash.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.token.is_empty() && r.id.is_empty(),
        "minted without approval"
    );
    let req = r.approval_request.expect("an approval request");
    assert_eq!(req.operation, "CreateToken");
    assert_eq!(req.state, "PENDING");
    assert_eq!(req.parameters.get("token_sha256"), Some(&hash));
    assert_eq!(
        req.parameters.get("principal").map(String::as_str),
        Some("svc:phi-reader")
    );
    let count = "SELECT COUNT(*) FROM tokens WHERE principal = 'svc:phi-reader'";
    assert_eq!(arca.sql(count).unwrap(), "0");
    let e = list_keys_with(&arca, token.expose()).await;
    assert_code(e, Code::Unauthenticated, "the token before approval");

    for n in [4, 5] {
        assert_eq!(cs.approve(&arca, n, &req).await.unwrap().state, "PENDING");
    }
    let e = list_keys_with(&arca, token.expose()).await;
    assert_code(
        e,
        Code::Unauthenticated,
        "the token with two of three approvals",
    );

    // The third approval stores the token; the approver's answer does not carry it.
    let done = cs.approve(&arca, 1, &req).await.unwrap();
    assert_eq!(done.state, "EXECUTED", "{done:?}");
    assert!(done.outcome.contains("svc:phi-reader"), "{done:?}");
    assert!(!format!("{done:?}").contains(token.expose()));
    assert_eq!(arca.sql(count).unwrap(), "1");
    // Stamped (ADR 12) and expiring, as the request said.
    assert_eq!(
        arca.sql(
            "SELECT COUNT(*) FROM tokens WHERE principal = 'svc:phi-reader' \
             AND mac IS NOT NULL AND expires_at - created_at = 3600000"
        )
        .unwrap(),
        "1"
    );
    // The requester's token works now, as scoped.
    list_keys_with(&arca, token.expose()).await.unwrap();
    arca.keys(token.expose())
        .await
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_name: "phi".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_without_ttl_gets_the_default_lifetime_and_above_the_maximum_is_refused() {
    // As shipped: 90 days by default.
    let arca = TestArca::start().await;
    let mut access = arca.access(arca.token()).await;
    let made = access
        .create_token(pb::CreateTokenRequest {
            principal: "svc:default".into(),
            roles: vec!["service".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !made.expires_at.is_empty(),
        "a token that never expires: {made:?}"
    );
    assert_eq!(
        arca.sql("SELECT expires_at - created_at FROM tokens WHERE principal = 'svc:default'")
            .unwrap(),
        (90 * DAY_MS).to_string()
    );
    drop(arca);

    // A policy that allows at most 2 days, 1 day by default.
    let dir = tempfile::tempdir().unwrap();
    let pol = access_policy_with_tokens(dir.path(), "default_ttl = \"1d\"\nmax_ttl = \"2d\"");
    let arca = TestArca::builder()
        .arg("--policy-dir")
        .arg(&pol)
        .start()
        .await;
    let mut access = arca.access(arca.token()).await;
    let ask = |principal: &str, ttl_seconds: u64| pb::CreateTokenRequest {
        principal: principal.into(),
        roles: vec!["service".into()],
        ttl_seconds,
        ..Default::default()
    };
    access.create_token(ask("svc:d", 0)).await.unwrap();
    access
        .create_token(ask("svc:max", 2 * 86_400))
        .await
        .unwrap();
    assert_eq!(
        arca.sql("SELECT expires_at - created_at FROM tokens WHERE principal = 'svc:d'")
            .unwrap(),
        DAY_MS.to_string()
    );
    let e = access.create_token(ask("svc:long", 2 * 86_400 + 1)).await;
    let s = assert_code(e, Code::InvalidArgument, "a lifetime above max_ttl");
    assert!(s.message().contains("max_ttl"), "{s:?}");
    assert_eq!(
        arca.sql("SELECT COUNT(*) FROM tokens WHERE principal = 'svc:long'")
            .unwrap(),
        "0"
    );
}
