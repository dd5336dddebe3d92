//! Changes of the access policy: `UpdatePolicy` (refused at once if it does not load; a
//! quorum operation where the quorum policy says so) and SIGHUP's reload of the policy
//! files.
//!
//! Invariants:
//! - A policy that does not load is refused and the policy in force stays.
//! - An approved policy stored in the database wins over the files: SIGHUP no longer
//!   replaces it; only another `UpdatePolicy` does.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::policy_row;
use crate::service::context::Db;
use crate::store::PolicyVersion;
use std::path::Path;
use std::sync::Arc;

use super::grants::AccessOutcome;
use crate::authz::policy::{Policy, PolicyError};
use crate::quorum::approvals::{Operation, Parameters, QuorumApproved};
use crate::service::access::{act, Guard, Scope};
use crate::service::context::Context;
use crate::service::error::{Result, ServiceError};
use crate::service::gate::{request_conflict, Gate};
use crate::service::Caller;
use crate::store::ApprovalRecord;

/// Parameter of `UpdatePolicy`: the new policy document (so the digest covers it).
pub const PARAM_POLICY: &str = "policy";

/// Why SIGHUP's reload was refused (the policy in force stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// An approved policy stored in the database is in force; only `UpdatePolicy`
    /// replaces it.
    #[error("an approved policy (UpdatePolicy) is in force; the files stay unused")]
    ApprovedPolicyInForce,
    /// The files do not load.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

/// The policy service.
pub struct Policies {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
}

impl Policies {
    /// The policy service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, gate: Arc<Gate>) -> Self {
        Policies { ctx, guard, gate }
    }

    /// `UpdatePolicy`: replaces the access policy with `text` (one policy document).
    pub async fn update_policy(&self, caller: &Caller, text: &str) -> Result<AccessOutcome> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::UpdatePolicy>(caller, Scope::none())
            .await?;
        let policy = Policy::parse(text).map_err(ServiceError::InvalidPolicy)?;
        if self.gate.needs_quorum(Operation::UpdatePolicy) {
            let mut params = Parameters::new();
            params.insert(PARAM_POLICY.to_string(), text.to_string());
            let req = self
                .gate
                .open(&proof, Operation::UpdatePolicy, params)
                .await?;
            return Ok(AccessOutcome::Pending(Box::new(req)));
        }
        let db = self.ctx.db(&proof);
        let version = self.next_version(db, text, None).await?;
        db.insert_policy(&version).await?;
        let seq = version.seq;
        self.guard.set_policy(policy, seq);
        Ok(AccessOutcome::Done(format!(
            "access policy version {seq} in force"
        )))
    }

    /// The next policy version after the newest stored, with its state MAC (ADR 12),
    /// which covers its number: storing it fails (`PolicySeq`) if another took it.
    async fn next_version(
        &self,
        db: Db<'_>,
        text: &str,
        request_id: Option<&str>,
    ) -> Result<PolicyVersion> {
        let seq = db.latest_policy().await?.map_or(0, |v| v.seq) + 1;
        let mut version = PolicyVersion {
            seq,
            text: text.to_string(),
            request_id: request_id.map(str::to_string),
            created_at: self.ctx.clock.now_ms(),
            mac: None,
        };
        version.mac = Some(self.ctx.stamp(policy_row(&version)).await?);
        Ok(version)
    }

    /// Runs an approved `UpdatePolicy`.
    pub async fn run_update_policy(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
    ) -> Result<String> {
        let text = req
            .parameters
            .get(PARAM_POLICY)
            .ok_or(ServiceError::InvalidArgument("invalid request parameters"))?;
        let policy = Policy::parse(text).map_err(ServiceError::InvalidPolicy)?;
        let db = self.ctx.db(ok);
        let version = self.next_version(db, text, Some(&req.id)).await?;
        let seq = db
            .complete_update_policy(&req.id, ok, &version, self.ctx.clock.now_ms())
            .await
            .map_err(request_conflict)?;
        self.guard.set_policy(policy, seq);
        Ok(format!("access policy version {seq} in force"))
    }

    /// SIGHUP: reads the policy files of `dir` again. A bad file is refused (the error
    /// says why) and the policy in force stays; so does an approved policy stored in the
    /// database, which only `UpdatePolicy` replaces. Returns the new policy's digest.
    pub async fn reload(&self, dir: &Path) -> std::result::Result<String, ReloadError> {
        let policy = Policy::load_dir(dir)?;
        if self.guard.policy_seq() > 0 {
            return Err(ReloadError::ApprovedPolicyInForce);
        }
        let digest = policy.digest().to_string();
        self.guard.set_policy(policy, 0);
        Ok(digest)
    }
}
