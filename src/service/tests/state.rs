//! State MACs (ADR 12): the encodings and the check, over the fake HSM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::open_world;
use crate::authz::stamp::{grant_row, stamp, token_row, Checked, Stamps};
use crate::keys::state::Unverified;
use crate::secret::TokenHash;
use crate::service::ServiceConfig;
use crate::store::{GrantRecord, TokenRecord};

fn token() -> TokenRecord {
    TokenRecord {
        id: "tok_1".into(),
        hash: TokenHash([7; 32]),
        principal: "svc:a".into(),
        roles: vec!["reader".into()],
        created_at: 1,
        expires_at: None,
        key_globs: vec![],
        cidrs: vec![],
        bound_principal: None,
        description: String::new(),
        revoked_at: None,
        state_seq: 1,
        mac: None,
    }
}

#[tokio::test]
async fn a_changed_field_a_moved_mac_and_a_missing_mac_are_refused() {
    let w = open_world(ServiceConfig::default()).await;
    let e = w.svc.ctx.engine().unwrap();
    let stamps = Stamps::default();
    let t = token();
    let mac = stamp(&e, token_row(&t)).await.unwrap();
    assert_eq!(
        stamps.check(&e, token_row(&t), Some(&mac)).await.unwrap(),
        Checked::Good
    );
    let mut admin = t.clone();
    admin.roles = vec!["admin".into()];
    let refused = stamps
        .check(&e, token_row(&admin), Some(&mac))
        .await
        .unwrap();
    assert_eq!(
        refused,
        Checked::Refused {
            why: Unverified::Forged,
            first: true
        }
    );
    // Remembered: the alert fires once.
    assert_eq!(
        stamps
            .check(&e, token_row(&admin), Some(&mac))
            .await
            .unwrap(),
        Checked::Refused {
            why: Unverified::Forged,
            first: false
        }
    );
    let mut other = t.clone();
    other.id = "tok_2".into();
    assert!(matches!(
        stamps
            .check(&e, token_row(&other), Some(&mac))
            .await
            .unwrap(),
        Checked::Refused { .. }
    ));
    for none in [None, Some("q:00")] {
        assert!(matches!(
            stamps.check(&e, token_row(&t), none).await.unwrap(),
            Checked::Refused {
                why: Unverified::Unstamped,
                ..
            }
        ));
    }
    // A grant's MAC never verifies a token, even with equal-looking fields.
    let g = GrantRecord {
        id: "tok_1".into(),
        principal: "svc:a".into(),
        role: "reader".into(),
        kind: "elevation".into(),
        reason: String::new(),
        request_id: None,
        created_at: 1,
        expires_at: 2,
        state_seq: 1,
        mac: None,
    };
    let gmac = stamp(&e, grant_row(&g)).await.unwrap();
    assert!(matches!(
        stamps.check(&e, token_row(&t), Some(&gmac)).await.unwrap(),
        Checked::Refused { .. }
    ));
}
