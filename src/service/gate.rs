//! The quorum gate: whether an operation waits for K-of-N approval here, and the opening
//! of its approval request (DESIGN §2 "Quorum operations"). Running an approved request is
//! `quorum::approvals`, above every service whose operations it runs.
//!
//! Invariants:
//! - A request is opened only by a caller authorized for its operation (the gate takes the
//!   caller's [`Authorized`] proof), and its digest is computed here from the operation and
//!   its parameters, never taken from the caller.
//! - A request records its requester's principal and the person behind it (`[people]`),
//!   by the policy the requester was authorized under (ADR 15).
//! - A gated change commits either on its own ([`Commit::Direct`], where no quorum gates
//!   it) or in one transaction with the completion of the request K custodians approved
//!   ([`Commit::Approved`], which holds the `QuorumApproved` proof).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::Arc;

use super::access::{Act, Authorized};
use super::context::Context;
use super::error::{Conflict, Result, ServiceError};
use crate::keys::KeyName;
use crate::quorum::approvals::{
    self, Operation, Parameters, QuorumApproved, PARAM_KEY, PARAM_VERSION,
};
use crate::store::{ApprovalRecord, KeyRecord, NewRequest};

/// How an administrative change commits.
#[derive(Clone, Copy)]
pub enum Commit<'a> {
    /// On its own: the operation needs no approval here.
    Direct,
    /// In one transaction with the completion of the request `id`, which K custodians
    /// approved.
    Approved(&'a str, &'a QuorumApproved),
}

impl Commit<'_> {
    /// The approval request that ordered the change, if any.
    pub fn request(&self) -> Option<&str> {
        match self {
            Commit::Direct => None,
            Commit::Approved(id, _) => Some(id),
        }
    }
}

/// Outcome of an administrative call: done now, or (with dual control) waiting for quorum.
pub enum AdminOutcome {
    /// The operation ran; the key as it is now.
    Done(KeyRecord),
    /// The operation waits for K-of-N approval: the request made for it.
    Pending(Box<ApprovalRecord>),
}

/// The parameters of an operation on a key.
pub fn key_params(name: &KeyName, version: Option<u32>) -> Parameters {
    let mut p = Parameters::new();
    p.insert(PARAM_KEY.to_string(), name.to_string());
    if let Some(v) = version {
        p.insert(PARAM_VERSION.to_string(), v.to_string());
    }
    p
}

/// Opens approval requests for gated operations.
pub struct Gate {
    ctx: Arc<Context>,
}

impl Gate {
    /// A gate over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Gate { ctx }
    }

    /// Whether `op` waits for K-of-N approval on this server.
    pub fn needs_quorum(&self, op: Operation) -> bool {
        self.ctx.cfg.quorum_gates && self.ctx.cfg.quorum_policy.requires(op)
    }

    /// Where `op` waits for quorum, opens its approval request (with `parameters`);
    /// otherwise runs it now (`run`, a future that does nothing until awaited).
    pub async fn open_or_run<A: Act>(
        &self,
        proof: &Authorized<A>,
        op: Operation,
        parameters: Parameters,
        run: impl std::future::Future<Output = Result<KeyRecord>>,
    ) -> Result<AdminOutcome> {
        if self.needs_quorum(op) {
            let req = self.open(proof, op, parameters).await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(run.await?))
    }

    /// Creates the approval request for `op` with `parameters`, asked by the holder of
    /// `proof`.
    pub async fn open<A: Act>(
        &self,
        proof: &Authorized<A>,
        op: Operation,
        parameters: Parameters,
    ) -> Result<ApprovalRecord> {
        let db = self.ctx.db(proof);
        let cfg = db
            .quorum_config()
            .await?
            .ok_or(ServiceError::Conflict(Conflict::NotInitialised))?;
        let id = self.ctx.random_id("req_")?;
        let digest = approvals::digest(op, &parameters);
        let now = self.ctx.clock.now_ms();
        let requester = &proof.principal().name;
        let requester_person = proof.person();
        let rec = db
            .create_request(&NewRequest {
                id: &id,
                operation: op,
                parameters: &parameters,
                digest: &digest,
                requester,
                requester_person: &requester_person,
                threshold: cfg.threshold,
                generation: cfg.generation,
                created_at: now,
                expires_at: now.saturating_add(self.ctx.cfg.quorum_policy.request_ttl_ms()),
            })
            .await?;
        tracing::info!(
            request = %id,
            operation = %op,
            requester = %requester,
            person = %requester_person,
            threshold = cfg.threshold,
            "approval request created"
        );
        Ok(rec)
    }
}

/// A store conflict on an approval request, as what it found.
pub fn request_conflict(e: crate::store::StoreError) -> ServiceError {
    use crate::store::{Conflict as Found, StoreError};
    match e {
        StoreError::Conflict(Found::RequestState(s)) => {
            ServiceError::Conflict(Conflict::Request(s))
        }
        StoreError::Conflict(Found::Generation) => ServiceError::Conflict(Conflict::QuorumChanged),
        StoreError::NotFound => ServiceError::NotFound("approval request not found"),
        e => e.into(),
    }
}
