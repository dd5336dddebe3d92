//! The rekey ceremony: a quorum operation that replaces custodians, shares and tokens,
//! hands each new kit out once, and refuses to run silently at an unseal.

use super::approvals::{c, quorum, stored_approval};
use super::{admin, custodian, kit_code};
use crate::authz::CUSTODIAN_PREFIX;
use crate::quorum::approvals::{self, Operation, RequestState, PARAM_CUSTODIANS};
use crate::quorum::shamir;
use crate::service::{RequestResult, ServiceError, REKEY_NEEDS_LIVE_APPROVER};
use crate::store::{ApprovalStore, TokenStore};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_rekey_waits_for_the_quorum_and_hands_the_new_kits_to_the_executing_approval() {
    let q = quorum(true).await;
    let svc = &q.w.svc;
    let new = names(&["n1", "n2", "n3"]);
    // Bad parameters are refused up front.
    for (k, list, shares) in [
        (1u32, new.clone(), 0),
        (4, new.clone(), 0),
        (2, names(&["n1", "n1"]), 0),
        (2, names(&["n1", "N2"]), 0),
        (2, names(&["n1", "a,b"]), 0),
        (2, new.clone(), 4),
    ] {
        assert!(matches!(
            svc.ceremony
                .request_rekey(&admin(), k, &list, shares, &Default::default())
                .await,
            Err(ServiceError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        svc.ceremony
            .request_rekey(&c(1), 2, &new, 0, &Default::default())
            .await,
        Err(ServiceError::PermissionDenied)
    ));
    let req = svc
        .ceremony
        .request_rekey(&admin(), 2, &new, 3, &Default::default())
        .await
        .unwrap();
    assert_eq!(req.operation, Operation::Rekey);
    assert_eq!(
        req.parameters.get(PARAM_CUSTODIANS).map(String::as_str),
        Some("n1,n2,n3")
    );
    assert_eq!(
        req.digest,
        approvals::digest(Operation::Rekey, &req.parameters)
    );
    q.next_step();
    let code = q.code(1).await;
    let o = svc
        .approvals
        .approve(&c(1), &req.id, &req.digest, &q.kits[0].share, &code)
        .await
        .unwrap();
    assert!(o.new_kits.is_empty());
    q.approve(2, &req).await.unwrap();
    let system = svc.ctx.system();
    let generation = |cfg: Option<crate::store::QuorumConfig>| cfg.unwrap().generation;
    assert_eq!(
        generation(svc.sealing.quorum_config(&system).await.unwrap()),
        1
    );
    let code = q.code(3).await;
    let o = svc
        .approvals
        .approve(&c(3), &req.id, &req.digest, &q.kits[2].share, &code)
        .await
        .unwrap();
    assert_eq!(o.request.state, RequestState::Executed);
    assert_eq!(
        o.request
            .result
            .as_ref()
            .map(RequestResult::summary)
            .as_deref(),
        Some("rekeyed to 2 of 3, generation 2")
    );
    let kits = o.new_kits;
    assert_eq!(
        kits.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["n1", "n2", "n3"]
    );
    let cfg = svc.sealing.quorum_config(&system).await.unwrap().unwrap();
    assert_eq!((cfg.generation, cfg.threshold, cfg.shares), (2, 2, 3));
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
    // The stored request holds no secret.
    let stored = format!("{:?}", q.w.store.request(&req.id).await.unwrap());
    for k in &kits {
        assert!(!stored.contains(k.share.as_str()));
    }
    // Every generation-1 custodian token is revoked; the new ones are live.
    let tokens = q.w.store.list_tokens().await.unwrap();
    for t in tokens
        .iter()
        .filter(|t| t.principal.starts_with(CUSTODIAN_PREFIX))
    {
        let new_gen = ["n1", "n2", "n3"]
            .iter()
            .any(|n| t.principal == format!("{CUSTODIAN_PREFIX}{n}"));
        assert_eq!(t.revoked_at.is_none(), new_gen, "{}", t.principal);
    }
    // No second run.
    q.next_step();
    assert!(matches!(
        q.approve(4, &req).await,
        Err(ServiceError::Conflict(_))
    ));

    // Old shares no longer unseal; two new kits do, and keys still work.
    q.create("phi").await;
    q.seal().await;
    q.next_step();
    let old = q.code(1).await;
    assert!(svc
        .sealing
        .unseal(&c(1), &q.kits[0].share, &old)
        .await
        .is_err());
    // An old share under a new identity fails the new commitment.
    let code = kit_code(&q.w.store, &kits[0], 2, q.w.now()).await;
    assert!(svc
        .sealing
        .unseal(&custodian("n1"), &q.kits[0].share, &code)
        .await
        .is_err());
    q.next_step();
    for k in &kits[1..] {
        let code = kit_code(&q.w.store, k, 2, q.w.now()).await;
        svc.sealing
            .unseal(&custodian(&k.name), &k.share, &code)
            .await
            .unwrap();
    }
    assert!(svc.ctx.engine.is_open());
    assert_eq!(q.key("phi").await.versions.len(), 1);
}

#[tokio::test]
async fn an_approved_rekey_found_at_unseal_fails_rather_than_run_silently() {
    let q = quorum(true).await;
    let svc = &q.w.svc;
    let new = names(&["n1", "n2", "n3"]);
    let req = svc
        .ceremony
        .request_rekey(&admin(), 2, &new, 0, &Default::default())
        .await
        .unwrap();
    for n in [1, 2, 5] {
        let share = shamir::decode(&q.kits[n - 1].share).unwrap();
        stored_approval(&q, n, &req, share.expose()).await;
    }
    q.seal().await;
    q.next_step();
    q.unseal_all(&[1, 2, 3]).await;
    let r = svc.approvals.get_request(&admin(), &req.id).await.unwrap();
    assert_eq!(r.state, RequestState::Failed);
    assert_eq!(r.reason.as_deref(), Some(REKEY_NEEDS_LIVE_APPROVER));
    assert!(q.w.store.sealed_shares(&req.id).await.unwrap().is_empty());
    let system = svc.ctx.system();
    let cfg = svc.sealing.quorum_config(&system).await.unwrap().unwrap();
    assert_eq!(cfg.generation, 1);
}

#[tokio::test]
async fn rekey_needs_a_real_quorum() {
    let q = quorum(false).await;
    assert!(matches!(
        q.w.svc
            .ceremony
            .request_rekey(&admin(), 2, &names(&["n1", "n2"]), 0, &Default::default())
            .await,
        Err(ServiceError::FailedPrecondition(_))
    ));
}
