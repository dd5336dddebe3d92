//! Contract of [`TokenStore`]: tokens by hash only, revocation once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use super::TestDb;
use crate::store::{Conflict, StoreError, TokenRecord, TokenStore};

on_both_backends!(tokens_by_hash_only, revocation_is_final,);

async fn tokens_by_hash_only(db: Arc<TestDb>) {
    let s = db.open().await;
    let t = crate::secret::BearerToken::from_random(&[5; 32]);
    let rec = TokenRecord {
        id: "tok_1".into(),
        hash: t.hash(),
        principal: "p".into(),
        roles: vec!["admin".into(), "x".into()],
        created_at: 1,
        expires_at: Some(2),
        revoked_at: None,
        key_globs: Vec::new(),
        cidrs: Vec::new(),
        bound_principal: None,
        description: String::new(),
        state_seq: 1,
        mac: None,
    };
    s.insert_token(&rec).await.unwrap();
    let got = s.token_by_hash(&t.hash()).await.unwrap();
    assert_eq!(got.roles, ["admin", "x"]);
    assert_eq!(got.expires_at, Some(2));
    assert_eq!(got.revoked_at, None);
    assert!(matches!(
        s.insert_token(&rec).await,
        Err(StoreError::AlreadyExists)
    ));
    let other = crate::secret::BearerToken::from_random(&[6; 32]);
    assert!(matches!(
        s.token_by_hash(&other.hash()).await,
        Err(StoreError::NotFound)
    ));
    let stored: String = sqlx::query_scalar("SELECT token_hash FROM tokens")
        .fetch_one(&s.reader)
        .await
        .unwrap();
    assert!(!stored.contains(t.expose()));
}

async fn revocation_is_final(db: Arc<TestDb>) {
    let s = db.open().await;
    let token = |id: &str, n: u8| TokenRecord {
        id: id.into(),
        hash: crate::secret::BearerToken::from_random(&[n; 32]).hash(),
        principal: "p".into(),
        roles: vec!["admin".into()],
        created_at: i64::from(n),
        expires_at: None,
        revoked_at: None,
        key_globs: vec!["billing/*".into()],
        cidrs: vec!["10.0.0.0/8".into()],
        bound_principal: Some("spiffe://x".into()),
        description: "d".into(),
        state_seq: 1,
        mac: None,
    };
    s.insert_token(&token("tok_1", 1)).await.unwrap();
    s.insert_token(&token("tok_2", 2)).await.unwrap();
    // The same id again is refused, whatever the hash.
    assert!(matches!(
        s.insert_token(&token("tok_1", 3)).await,
        Err(StoreError::AlreadyExists)
    ));
    s.revoke_token("tok_1", 50).await.unwrap();
    assert!(matches!(
        s.revoke_token("tok_1", 60).await,
        Err(StoreError::Conflict(Conflict::Revoked))
    ));
    assert!(matches!(
        s.revoke_token("tok_9", 60).await,
        Err(StoreError::NotFound)
    ));
    // Newest first; the first revocation's time stays.
    let all = s.list_tokens().await.unwrap();
    let seen: Vec<(&str, Option<i64>)> =
        all.iter().map(|t| (t.id.as_str(), t.revoked_at)).collect();
    assert_eq!(seen, [("tok_2", None), ("tok_1", Some(50))]);
    assert_eq!(all[1].key_globs, ["billing/*"]);
    assert_eq!(all[1].cidrs, ["10.0.0.0/8"]);
    assert_eq!(all[1].bound_principal.as_deref(), Some("spiffe://x"));
}
