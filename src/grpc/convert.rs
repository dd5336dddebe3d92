//! proto ↔ domain conversion, in one place. No decisions here: values are translated,
//! and what cannot be translated is the one `InvalidArgument` the service would give.

use std::collections::HashMap;

use super::pb;
use crate::audit::verify::Report;
use crate::audit::Record;
use crate::clock::rfc3339;
use crate::keys::{EncryptionContext, VersionState};
use crate::service::{
    AccessOutcome, AdminOutcome, ApprovalRecord, CustodianKit, KeyRecord, RequestResult,
    ReviewRecord, SealStatus, ServiceError, TokenInfo,
};

/// A context map from the wire.
pub fn context(map: HashMap<String, String>) -> EncryptionContext {
    map.into_iter().collect()
}

/// Seconds on the wire → ms, refusing what does not fit.
pub fn seconds_to_ms(s: u64) -> Result<i64, ServiceError> {
    i64::try_from(s)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or(ServiceError::InvalidArgument("duration out of range"))
}

/// Seconds on the wire → ms, saturating (durations the service bounds itself).
pub fn seconds_to_ms_saturating(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// An RFC 3339 time or date on the wire ("" = none) → Unix ms.
pub fn time_of(s: &str) -> Result<Option<i64>, ServiceError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    crate::clock::parse_rfc3339(s)
        .map(Some)
        .ok_or(ServiceError::InvalidArgument(
            "time must be RFC 3339 UTC (2027-01-31T00:00:00Z) or a date (2027-01-31)",
        ))
}

fn state_to_pb(s: VersionState) -> pb::KeyVersionState {
    match s {
        VersionState::Enabled => pb::KeyVersionState::Enabled,
        VersionState::Disabled => pb::KeyVersionState::Disabled,
        VersionState::ScheduledForDestruction => pb::KeyVersionState::ScheduledForDestruction,
        VersionState::Destroyed => pb::KeyVersionState::Destroyed,
    }
}

/// A key on the wire.
pub fn key_to_pb(k: &KeyRecord) -> pb::Key {
    pb::Key {
        name: k.name.to_string(),
        id: k.id.to_string(),
        primary_version: k.primary_version,
        versions: k
            .versions
            .iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: state_to_pb(v.state) as i32,
                created_at: rfc3339(v.created_at),
                wrap_count: v.wrap_count,
                destroy_at: v.destroy_at.map(rfc3339).unwrap_or_default(),
                destroyed_at: v.destroyed_at.map(rfc3339).unwrap_or_default(),
                retire_request: v.retire_request.clone().unwrap_or_default(),
            })
            .collect(),
        created_at: rfc3339(k.created_at),
        description: k.description.clone(),
        rotation_period_seconds: k
            .rotation_period_ms
            .and_then(|ms| u64::try_from(ms / 1000).ok())
            .unwrap_or(0),
        retain_until: k.retain_until.map(rfc3339).unwrap_or_default(),
    }
}

/// An administrative outcome: the key, or the approval request made for the change.
pub fn admin_to_pb(o: AdminOutcome) -> pb::AdminResponse {
    match o {
        AdminOutcome::Done(k) => pb::AdminResponse {
            key: Some(key_to_pb(&k)),
            approval_request: None,
        },
        AdminOutcome::Pending(r) => pb::AdminResponse {
            key: None,
            approval_request: Some(request_to_pb(&r)),
        },
    }
}

/// An access change: what it did, or the approval request made for it.
pub fn change_to_pb(out: AccessOutcome) -> pb::AccessChangeResponse {
    match out {
        AccessOutcome::Done(outcome) => pb::AccessChangeResponse {
            outcome,
            approval_request: None,
        },
        AccessOutcome::Pending(r) => pb::AccessChangeResponse {
            outcome: String::new(),
            approval_request: Some(request_to_pb(&r)),
        },
    }
}

/// An approval request on the wire (no share is part of a record).
pub fn request_to_pb(r: &ApprovalRecord) -> pb::ApprovalRequest {
    pb::ApprovalRequest {
        id: r.id.clone(),
        operation: r.operation.as_str().to_string(),
        parameters: r.parameters.clone().into_iter().collect(),
        digest: r.digest.clone(),
        requester: r.requester.clone(),
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::Approval {
                custodian: a.custodian.clone(),
                approved_at: rfc3339(a.approved_at),
            })
            .collect(),
        threshold: u32::from(r.threshold),
        state: r.state.as_str().to_string(),
        expires_at: rfc3339(r.expires_at),
        result: r.result.as_ref().and_then(|res| match res {
            RequestResult::Key(k) => Some(key_to_pb(k)),
            RequestResult::Rekey { .. } | RequestResult::Note(_) => None,
        }),
        rejected_by: r.decided_by.clone().unwrap_or_default(),
        reason: r.reason.clone().unwrap_or_default(),
        created_at: rfc3339(r.created_at),
        decided_at: r.decided_at.map(rfc3339).unwrap_or_default(),
        new_kits: Vec::new(),
        outcome: r
            .result
            .as_ref()
            .map(|res| res.summary())
            .unwrap_or_default(),
    }
}

/// A custodian kit on the wire (the one time it leaves the server).
pub fn kit_to_pb(k: CustodianKit) -> pb::CustodianKit {
    pb::CustodianKit {
        custodian: k.name,
        share: k.share.to_string(),
        token: k.token.expose().to_string(),
        totp_uri: k.totp_uri.to_string(),
    }
}

/// The seal state on the wire.
pub fn seal_to_pb(s: SealStatus) -> pb::SealStatusResponse {
    pb::SealStatusResponse {
        initialized: s.initialized,
        sealed: s.sealed,
        threshold: s.threshold,
        shares: s.shares,
        progress: s.progress,
        hsm_logins_refused: s.hsm_logins_refused,
    }
}

/// A break-glass review on the wire.
pub fn review_to_pb(r: ReviewRecord) -> pb::Review {
    pb::Review {
        id: r.id,
        grant_id: r.grant_id,
        principal: r.principal,
        reason: r.reason,
        opened_at: rfc3339(r.opened_at),
        closed_at: r.closed_at.map(rfc3339).unwrap_or_default(),
        closed_by: r.closed_by.unwrap_or_default(),
        note: r.note.unwrap_or_default(),
    }
}

/// A token as listed (never the secret).
pub fn token_to_pb(t: TokenInfo) -> pb::TokenInfo {
    let r = t.record;
    pb::TokenInfo {
        id: r.id,
        principal: r.principal,
        roles: r.roles,
        key_globs: r.key_globs,
        cidrs: r.cidrs,
        bound_principal: r.bound_principal.unwrap_or_default(),
        created_at: rfc3339(r.created_at),
        expires_at: r.expires_at.map(rfc3339).unwrap_or_default(),
        revoked_at: r.revoked_at.map(rfc3339).unwrap_or_default(),
        description: r.description,
    }
}

/// An audit record on the wire (decrypted, for an auditor).
pub fn record_to_pb(r: Record) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        time: r.time,
        kind: r.kind.as_str().to_string(),
        operation: r.operation,
        result: r.result,
        node: r.details.node,
        request_id: r.details.request_id,
        principal: r.details.principal,
        auth_method: r.details.auth_method,
        key_name: r.details.key_name.unwrap_or_default(),
        key_version: r.details.key_version.unwrap_or_default(),
        client: r.details.client,
        context_digest: r.details.context_digest.unwrap_or_default(),
        latency_us: r.details.latency_us,
        detail: r.details.detail.unwrap_or_default(),
    }
}

/// A verification report on the wire.
pub fn report_to_pb(r: Report) -> pb::VerifyAuditResponse {
    pb::VerifyAuditResponse {
        ok: r.ok,
        records: r.records,
        last_seq: r.last_seq,
        first_bad_seq: r.first_bad_seq.unwrap_or_default(),
        problem: r
            .problem
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        detail: r.detail,
        seals_checked: r.seals_checked,
        seal_macs_checked: r.seal_macs_checked,
        unsealed_tail: r.unsealed_tail,
    }
}
