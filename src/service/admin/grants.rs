//! Time-bound role grants: just-in-time elevation (quorum-approved where the quorum policy
//! says so) and break-glass (self-granted by listed principals, alerted at once, with a
//! review that stays open until an auditor closes it).
//!
//! Invariants:
//! - A grant counts only until its `expires_at` (the [`Guard`] judges it on every
//!   request with the clock), and only for a role the policy in force still defines.
//! - An approved elevation is checked again against the policy in force when it runs
//!   (the role's `max_elevation` may have changed since the request).
//! - Nobody closes the review of their own break-glass, through any principal of theirs:
//!   the closer's person and the grant holder's person (`[people]`, by the policy the
//!   `CloseReview` was decided under) differ (ADR 15).
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::grant_row;
use std::sync::Arc;

use crate::authz::policy::DEFAULT_ELEVATION_MS;
use crate::quorum::approvals::{Operation, Parameters, QuorumApproved};
use crate::service::access::{act, Guard, Scope};
use crate::service::context::Context;
use crate::service::error::{Conflict, Rejection, Result, ServiceError};
use crate::service::gate::{request_conflict, Gate};
use crate::service::Caller;
use crate::store::{ApprovalRecord, GrantRecord, ReviewRecord, StoreError};

/// Parameter of `Elevate`: who gets the role.
pub const PARAM_PRINCIPAL: &str = "principal";
/// Parameter of `Elevate`: the role.
pub const PARAM_ROLE: &str = "role";
/// Parameter of `Elevate`: seconds the grant lasts from its approval.
pub const PARAM_DURATION: &str = "duration_seconds";
/// Parameter of `Elevate`: why.
pub const PARAM_REASON: &str = "reason";
/// Longest reason of an elevation or break-glass, in bytes.
pub const MAX_REASON: usize = 1024;

/// What `UpdatePolicy` and `Elevate` answer: done at once (no quorum here), or the
/// approval request made for it.
pub enum AccessOutcome {
    /// Applied: a one-line description.
    Done(String),
    /// Waiting for K-of-N approval.
    Pending(Box<ApprovalRecord>),
}

/// A one-line reason (1 to [`MAX_REASON`] bytes, no control characters).
pub(super) fn check_reason(reason: &str) -> Result<&str> {
    let r = reason.trim();
    if r.is_empty() || r.len() > MAX_REASON || r.chars().any(char::is_control) {
        return Err(ServiceError::InvalidArgument(
            "a reason of 1 to 1024 bytes (one line) is required",
        ));
    }
    Ok(r)
}

fn describe(grant: &GrantRecord) -> String {
    format!(
        "{} holds role {} until {}",
        grant.principal,
        grant.role,
        crate::clock::rfc3339(grant.expires_at)
    )
}

/// The grant service.
pub struct Grants {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
}

impl Grants {
    /// The grant service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, gate: Arc<Gate>) -> Self {
        Grants { ctx, guard, gate }
    }

    /// `Elevate`: asks for `role` for `duration_ms` (0: the role's maximum, at most 1 h):
    /// a quorum operation; once approved, a grant that expires by itself.
    pub async fn elevate(
        &self,
        caller: &Caller,
        role: &str,
        duration_ms: i64,
        reason: &str,
    ) -> Result<AccessOutcome> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::Elevate>(caller, Scope::none())
            .await?;
        let reason = check_reason(reason)?;
        let max = self
            .guard
            .policy()
            .role(role)
            .and_then(|r| r.max_elevation_ms())
            .ok_or(ServiceError::InvalidArgument(
                "the policy allows no elevation to this role",
            ))?;
        let duration = match duration_ms {
            0 => max.min(DEFAULT_ELEVATION_MS),
            d if (1000..=max).contains(&d) => d,
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "duration must be from 1s to the role's max_elevation",
                ))
            }
        };
        let mut params = Parameters::new();
        params.insert(PARAM_PRINCIPAL.to_string(), caller.principal.name.clone());
        params.insert(PARAM_ROLE.to_string(), role.to_string());
        params.insert(PARAM_DURATION.to_string(), (duration / 1000).to_string());
        params.insert(PARAM_REASON.to_string(), reason.to_string());
        if self.gate.needs_quorum(Operation::Elevate) {
            let req = self.gate.open(&proof, Operation::Elevate, params).await?;
            return Ok(AccessOutcome::Pending(Box::new(req)));
        }
        let grant = self.stamped(self.elevation_grant(&params, None)?).await?;
        self.ctx.db(&proof).insert_grant(&grant).await?;
        self.guard.refresh(true).await;
        tracing::warn!(principal = %grant.principal, role = %grant.role, grant = %grant.id, "role elevated (no quorum in this mode)");
        Ok(AccessOutcome::Done(describe(&grant)))
    }

    /// The grant an elevation with `params` makes now (checked against the policy in
    /// force: it may have changed since the request).
    /// `grant` with its state MAC (ADR 12).
    async fn stamped(&self, mut grant: GrantRecord) -> Result<GrantRecord> {
        grant.mac = None;
        grant.mac = Some(self.ctx.stamp(grant_row(&grant)).await?);
        Ok(grant)
    }

    fn elevation_grant(&self, params: &Parameters, request: Option<&str>) -> Result<GrantRecord> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let principal = params.get(PARAM_PRINCIPAL).ok_or(BAD)?;
        let role = params.get(PARAM_ROLE).ok_or(BAD)?;
        let secs: i64 = params
            .get(PARAM_DURATION)
            .and_then(|d| d.parse().ok())
            .ok_or(BAD)?;
        let reason = params.get(PARAM_REASON).ok_or(BAD)?;
        let max = self
            .guard
            .policy()
            .role(role)
            .and_then(|r| r.max_elevation_ms())
            .ok_or(ServiceError::FailedPrecondition(
                "the policy in force allows no elevation to this role",
            ))?;
        let duration = secs.saturating_mul(1000);
        if !(1000..=max).contains(&duration) {
            return Err(ServiceError::FailedPrecondition(
                "the duration exceeds the role's max_elevation in force",
            ));
        }
        let now = self.ctx.clock.now_ms();
        Ok(GrantRecord {
            id: self.ctx.random_id("grant_")?,
            principal: principal.clone(),
            role: role.clone(),
            kind: "elevation".into(),
            reason: reason.clone(),
            request_id: request.map(str::to_string),
            created_at: now,
            expires_at: now + duration,
            state_seq: 1,
            mac: None,
        })
    }

    /// Runs an approved `Elevate`: the grant starts now.
    pub async fn run_elevation(&self, req: &ApprovalRecord, ok: &QuorumApproved) -> Result<String> {
        let grant = self
            .stamped(self.elevation_grant(&req.parameters, Some(&req.id))?)
            .await?;
        self.ctx
            .db(ok)
            .complete_elevation(&req.id, ok, &grant, self.ctx.clock.now_ms())
            .await
            .map_err(request_conflict)?;
        self.guard.refresh(true).await;
        tracing::warn!(
            request = %req.id,
            principal = %grant.principal,
            role = %grant.role,
            grant = %grant.id,
            expires_at = %crate::clock::rfc3339(grant.expires_at),
            "role elevation granted"
        );
        Ok(describe(&grant))
    }

    /// `BreakGlass`: a principal listed in `[break_glass]` takes the break-glass role for
    /// `duration_ms` (0: the maximum, at most 1 h), with no approval: an alert at once and
    /// a review that stays open until an auditor closes it.
    pub async fn break_glass(
        &self,
        caller: &Caller,
        reason: &str,
        duration_ms: i64,
    ) -> Result<(GrantRecord, ReviewRecord)> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::BreakGlass>(caller, Scope::none())
            .await?;
        let reason = check_reason(reason)?;
        let policy = self.guard.policy();
        let bg = policy.break_glass().ok_or(ServiceError::PermissionDenied)?;
        let duration = match duration_ms {
            0 => bg.max_ms,
            d if (1000..=bg.max_ms).contains(&d) => d,
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "duration must be from 1s to the break-glass maximum",
                ))
            }
        };
        let now = self.ctx.clock.now_ms();
        let grant = GrantRecord {
            id: self.ctx.random_id("grant_")?,
            principal: caller.principal.name.clone(),
            role: bg.role.clone(),
            kind: "break-glass".into(),
            reason: reason.to_string(),
            request_id: None,
            created_at: now,
            expires_at: now + duration,
            state_seq: 1,
            mac: None,
        };
        let grant = self.stamped(grant).await?;
        let review = self
            .ctx
            .db(&proof)
            .break_glass(&grant, &self.ctx.random_id("rev_")?)
            .await?;
        self.guard.refresh(true).await;
        tracing::error!(
            alert = "break-glass",
            principal = %grant.principal,
            role = %grant.role,
            grant = %grant.id,
            review = %review.id,
            reason = %grant.reason,
            expires_at = %crate::clock::rfc3339(grant.expires_at),
            "BREAK-GLASS: emergency role taken; review open until an auditor closes it"
        );
        Ok((grant, review))
    }

    /// `ListReviews`: break-glass reviews, newest first.
    pub async fn list_reviews(
        &self,
        caller: &Caller,
        open_only: bool,
    ) -> Result<Vec<ReviewRecord>> {
        let proof = self
            .guard
            .authorize::<act::ListReviews>(caller, Scope::none())
            .await?;
        Ok(self.ctx.db(&proof).list_reviews(open_only).await?)
    }

    /// `CloseReview`: an auditor closes a review with a note. Nobody closes the review of
    /// their own break-glass, through any of their principals (`OWN_REVIEW`).
    pub async fn close_review(
        &self,
        caller: &Caller,
        id: &str,
        note: &str,
    ) -> Result<ReviewRecord> {
        let proof = self
            .guard
            .authorize::<act::CloseReview>(caller, Scope::none())
            .await?;
        let note = check_reason(note)?;
        let db = self.ctx.db(&proof);
        let all = db.list_reviews(false).await?;
        let review = all
            .iter()
            .find(|r| r.id == id)
            .ok_or(ServiceError::NotFound("review not found"))?;
        let person = proof.person();
        if review.principal == caller.principal.name || proof.person_of(&review.principal) == person
        {
            tracing::warn!(
                review = id,
                by = %caller.principal.name,
                person = %person,
                holder = %review.principal,
                "review close refused: the closer is the person who broke the glass"
            );
            return Err(ServiceError::Rejected(Rejection::OwnReview));
        }
        let now = self.ctx.clock.now_ms();
        let rec = match db.close_review(id, &caller.principal.name, note, now).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(ServiceError::NotFound("review not found")),
            Err(StoreError::Conflict(_)) => {
                return Err(ServiceError::Conflict(Conflict::ReviewClosed))
            }
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(review = id, by = %caller.principal.name, "break-glass review closed");
        Ok(rec)
    }
}
