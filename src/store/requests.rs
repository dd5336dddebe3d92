//! Approval requests' rows (`approval_requests`, `request_approvals`): the records, their
//! decoding (and the stored form of a result), and the in-transaction steps every
//! approval write shares — reading a request, naming what a refused write found
//! ([`conflict`]), claiming a request for its completion, deciding it and wiping its
//! shares. `approvals.rs` builds the `ApprovalStore` on these.
//!
//! Invariants (enforced by conditional updates here and by triggers in the migrations):
//! - Only a `PENDING` request changes; every other state is final, and a decided row is
//!   never updated again. Requests and approvals are never deleted.
//! - Every transaction that changes a request first touches its row with a conditional
//!   `UPDATE … WHERE state = 'PENDING'`. That is the portable row lock: on PostgreSQL a
//!   concurrent writer waits and then sees the condition re-checked on the newest row,
//!   on SQLite `BEGIN IMMEDIATE` serialises writers anyway. So an approval, a rejection,
//!   an expiry and an execution of the same request are decided one at a time.
//! - A share rests only sealed under the HSM key `arca:meta` (the service seals it), and
//!   is wiped (`NULL`) in the same transaction that decides the request; who approved
//!   and when stays.
//!
//! Must not import: `approvals.rs` (which imports this one), table-family files of
//! `store/` other than `keys.rs`, `quorum.rs` and `tokens.rs`; tonic, prost, cryptoki.

use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::keys::{load_key, KeyLookup, KeyRecord, VersionRecord};
use super::quorum::{CustodianRecord, QuorumConfig};
use super::rows::get;
use super::tokens::TokenRecord;
use super::tx::Tx;
use crate::keys::{KeyId, KeyName, ObjectId, VersionState};
use crate::quorum::approvals::{Operation, Parameters, RequestState, Standing};

/// A request to store.
#[derive(Clone, Debug)]
pub struct NewRequest<'a> {
    /// `req_…`.
    pub id: &'a str,
    /// What would run.
    pub operation: Operation,
    /// Its parameters.
    pub parameters: &'a Parameters,
    /// Hex SHA-256 of the canonical operation and parameters.
    pub digest: &'a str,
    /// Principal name of the requester.
    pub requester: &'a str,
    /// K at the time of the request.
    pub threshold: u8,
    /// The quorum generation whose custodians may approve.
    pub generation: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: i64,
}

/// One custodian's approval (the share is not part of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalEntry {
    /// Custodian name (without the `custodian:` prefix).
    pub custodian: String,
    /// Unix ms.
    pub approved_at: i64,
}

/// What an executed operation produced.
#[derive(Clone, Debug)]
pub enum RequestResult {
    /// The key as it was right after the operation.
    Key(KeyRecord),
    /// A rekey: the new quorum (no share or token is ever part of a result).
    Rekey {
        /// K.
        threshold: u8,
        /// N.
        shares: u8,
        /// The new generation.
        generation: i64,
    },
    /// Another operation (a policy change, an elevation): what it did, in words.
    Note(String),
}

impl RequestResult {
    /// A one-line summary, e.g. `rekeyed to 2 of 3, generation 2`.
    pub fn summary(&self) -> String {
        match self {
            RequestResult::Key(k) => format!("{} at primary version {}", k.name, k.primary_version),
            RequestResult::Rekey {
                threshold,
                shares,
                generation,
            } => format!("rekeyed to {threshold} of {shares}, generation {generation}"),
            RequestResult::Note(text) => text.clone(),
        }
    }
}

/// What a rekey stores, in one transaction with the completion of its request.
pub struct NewQuorum<'a> {
    /// The generation being replaced: the rekey commits only while it is current.
    pub previous_generation: i64,
    /// The new configuration (its generation is `previous_generation + 1`).
    pub config: &'a QuorumConfig,
    /// The new generation's custodians.
    pub custodians: &'a [CustodianRecord],
    /// The new generation's custodian tokens (hashes only).
    pub tokens: &'a [TokenRecord],
}

/// A stored approval request.
#[derive(Clone, Debug)]
pub struct ApprovalRecord {
    /// `req_…`.
    pub id: String,
    /// The operation.
    pub operation: Operation,
    /// Its parameters.
    pub parameters: Parameters,
    /// Hex SHA-256 of the canonical operation and parameters.
    pub digest: String,
    /// Principal name of the requester.
    pub requester: String,
    /// K.
    pub threshold: u8,
    /// Quorum generation.
    pub generation: i64,
    /// State as stored (see [`Standing::effective_state`] for expiry).
    pub state: RequestState,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: i64,
    /// When it left `PENDING` (Unix ms).
    pub decided_at: Option<i64>,
    /// Who rejected it.
    pub decided_by: Option<String>,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
    /// What the operation produced, once executed.
    pub result: Option<RequestResult>,
    /// Approvals, oldest first.
    pub approvals: Vec<ApprovalEntry>,
}

impl ApprovalRecord {
    /// The view the approval rules take.
    pub fn standing(&self) -> Standing<'_> {
        Standing {
            state: self.state,
            expires_at: self.expires_at,
            requester: &self.requester,
            threshold: self.threshold,
            approvals: self.approvals.len(),
            digest: &self.digest,
        }
    }
}

/// A custodian's share as stored: sealed under `arca:meta`.
pub struct SealedShare {
    /// Custodian name.
    pub custodian: String,
    /// The sealed bytes (format of the key engine's `seal_meta`).
    pub sealed: Vec<u8>,
}

/// The joined request/approval select, with a tail (WHERE and ORDER BY) appended.
macro_rules! request_select {
    ($tail:literal) => {
        concat!(
            "SELECT r.id, r.operation, r.parameters, r.digest, r.requester, r.threshold, ",
            "r.generation, r.state, r.created_at, r.expires_at, r.decided_at, r.decided_by, ",
            "r.reason, r.result, a.custodian, a.approved_at ",
            "FROM approval_requests r LEFT JOIN request_approvals a ON a.request_id = r.id ",
            $tail
        )
    };
}
pub(super) use request_select;

/// Groups joined request/approval rows (ordered by request, then approval) into records.
pub(super) fn requests_from_rows(rows: &[AnyRow]) -> Result<Vec<ApprovalRecord>> {
    let mut out: Vec<ApprovalRecord> = Vec::new();
    for row in rows {
        let id: String = get(row, "id")?;
        if out.last().is_none_or(|r| r.id != id) {
            out.push(request_from_row(row, id)?);
        }
        let custodian: Option<String> = get(row, "custodian")?;
        let approved_at: Option<i64> = get(row, "approved_at")?;
        if let (Some(custodian), Some(approved_at), Some(r)) =
            (custodian, approved_at, out.last_mut())
        {
            r.approvals.push(ApprovalEntry {
                custodian,
                approved_at,
            });
        }
    }
    Ok(out)
}

fn request_from_row(row: &AnyRow, id: String) -> Result<ApprovalRecord> {
    let parameters: Parameters = serde_json::from_str(&get::<String>(row, "parameters")?)
        .map_err(|_| StoreError::Corrupt("request parameters"))?;
    let result = match get::<Option<String>>(row, "result")? {
        Some(text) => Some(result_from_json(&text)?),
        None => None,
    };
    Ok(ApprovalRecord {
        id,
        operation: Operation::parse(&get::<String>(row, "operation")?)
            .ok_or(StoreError::Corrupt("request operation"))?,
        parameters,
        digest: get(row, "digest")?,
        requester: get(row, "requester")?,
        threshold: u8::try_from(get::<i64>(row, "threshold")?)
            .map_err(|_| StoreError::Corrupt("request threshold"))?,
        generation: get(row, "generation")?,
        state: RequestState::parse(&get::<String>(row, "state")?)
            .ok_or(StoreError::Corrupt("request state"))?,
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        decided_at: get(row, "decided_at")?,
        decided_by: get(row, "decided_by")?,
        reason: get(row, "reason")?,
        result,
        approvals: Vec::new(),
    })
}

/// The stored form of a result: `{"kind":"key","key":{…}}`.
pub(super) fn result_to_json(r: &RequestResult) -> String {
    match r {
        RequestResult::Key(k) => json!({
            "kind": "key",
            "key": {
                "id": k.id.to_string(),
                "name": k.name.as_str(),
                "description": k.description,
                "primary_version": k.primary_version,
                "created_at": k.created_at,
                "versions": k.versions.iter().map(|v| json!({
                    "version": v.version,
                    "state": v.state.as_str(),
                    "hsm_id": v.hsm_id.to_string(),
                    "wrap_count": v.wrap_count,
                    "created_at": v.created_at,
                    "updated_at": v.updated_at,
                    "destroy_at": v.destroy_at,
                    "destroyed_at": v.destroyed_at,
                    "retire_request": v.retire_request,
                    "destroying_at": v.destroying_at,
                })).collect::<Vec<_>>(),
                "rotation_period_ms": k.rotation_period_ms,
                "retain_until": k.retain_until,
                "retention_applied_at": k.retention_applied_at,
            }
        })
        .to_string(),
        RequestResult::Rekey {
            threshold,
            shares,
            generation,
        } => json!({
            "kind": "rekey",
            "threshold": threshold,
            "shares": shares,
            "generation": generation,
        })
        .to_string(),
        RequestResult::Note(text) => json!({ "kind": "note", "text": text }).to_string(),
    }
}

fn result_from_json(text: &str) -> Result<RequestResult> {
    const BAD: StoreError = StoreError::Corrupt("request result");
    let v: Value = serde_json::from_str(text).map_err(|_| BAD)?;
    if v["kind"] == "rekey" {
        let small = |v: &Value| v.as_u64().and_then(|n| u8::try_from(n).ok()).ok_or(BAD);
        return Ok(RequestResult::Rekey {
            threshold: small(&v["threshold"])?,
            shares: small(&v["shares"])?,
            generation: v["generation"].as_i64().ok_or(BAD)?,
        });
    }
    if v["kind"] == "note" {
        return Ok(RequestResult::Note(
            v["text"].as_str().ok_or(BAD)?.to_string(),
        ));
    }
    if v["kind"] != "key" {
        return Err(BAD);
    }
    let k = &v["key"];
    let s = |v: &Value| v.as_str().map(str::to_string).ok_or(BAD);
    let i = |v: &Value| v.as_i64().ok_or(BAD);
    let u32_ = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(BAD);
    let mut versions = Vec::new();
    for x in k["versions"].as_array().ok_or(BAD)? {
        let mut hsm = [0u8; 16];
        hex::decode_to_slice(s(&x["hsm_id"])?, &mut hsm).map_err(|_| BAD)?;
        versions.push(VersionRecord {
            version: u32_(&x["version"])?,
            state: VersionState::parse(&s(&x["state"])?).ok_or(BAD)?,
            hsm_id: ObjectId(hsm),
            wrap_count: x["wrap_count"].as_u64().ok_or(BAD)?,
            created_at: i(&x["created_at"])?,
            updated_at: i(&x["updated_at"])?,
            destroy_at: x["destroy_at"].as_i64(),
            destroyed_at: x["destroyed_at"].as_i64(),
            retire_request: x["retire_request"].as_str().map(str::to_string),
            destroying_at: x["destroying_at"].as_i64(),
            // A result is a record of what happened, never authority: no MAC kept.
            state_seq: x["state_seq"].as_i64().unwrap_or(0),
            mac: None,
        });
    }
    Ok(RequestResult::Key(KeyRecord {
        id: KeyId::parse(&s(&k["id"])?).ok_or(BAD)?,
        name: KeyName::parse(&s(&k["name"])?).map_err(|_| BAD)?,
        description: s(&k["description"])?,
        primary_version: u32_(&k["primary_version"])?,
        created_at: i(&k["created_at"])?,
        rotation_period_ms: k["rotation_period_ms"].as_i64(),
        retain_until: k["retain_until"].as_i64(),
        retention_applied_at: k["retention_applied_at"].as_i64(),
        retention_mac: None,
        versions,
    }))
}

/// The request `id` with its approvals, read through `exec` (a pool, or an open
/// transaction to see its own writes); `NotFound` if there is none.
pub(super) async fn load_request<'e, E>(exec: E, id: &str) -> Result<ApprovalRecord>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(request_select!(
        "WHERE r.id = $1 ORDER BY a.approved_at, a.custodian"
    ))
    .bind(id.to_string())
    .fetch_all(exec)
    .await
    .map_err(classify)?;
    requests_from_rows(&rows)?.pop().ok_or(StoreError::NotFound)
}

/// The state of a request (its effective one at `now`: `EXPIRED` once past its expiry
/// short of K approvals) as a `Conflict::RequestState`, after a conditional update
/// matched nothing; `NotFound` if there is no such request.
pub(super) async fn conflict(tx: &mut Tx<'_>, id: &str, now: i64) -> StoreError {
    let row = sqlx::query(
        "SELECT state, expires_at, threshold, \
         (SELECT COUNT(*) FROM request_approvals a WHERE a.request_id = r.id) AS n \
         FROM approval_requests r WHERE r.id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return StoreError::NotFound,
        Err(e) => return classify(e),
    };
    let state = get::<String>(&row, "state")
        .ok()
        .and_then(|s| RequestState::parse(&s));
    let expires_at: i64 = get(&row, "expires_at").unwrap_or(i64::MAX);
    let threshold: i64 = get(&row, "threshold").unwrap_or(0);
    let n: i64 = row.try_get("n").unwrap_or(0);
    let current = match state {
        Some(RequestState::Pending) if n < threshold && expires_at <= now => RequestState::Expired,
        Some(s) => s,
        None => return StoreError::Corrupt("request state"),
    };
    StoreError::Conflict(Conflict::RequestState(current))
}

/// Locks a pending request with K approvals for its completion (see the module docs);
/// `Conflict::RequestState` otherwise.
pub(super) async fn claim_for_completion(tx: &mut Tx<'_>, id: &str, now: i64) -> Result<()> {
    let done = sqlx::query(
        "UPDATE approval_requests SET updated_at = $2 \
         WHERE id = $1 AND state = 'PENDING' \
         AND (SELECT COUNT(*) FROM request_approvals a WHERE a.request_id = $1) >= threshold",
    )
    .bind(id.to_string())
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(conflict(tx, id, now).await)
    }
}

/// Marks a claimed request decided and wipes its shares.
#[allow(clippy::too_many_arguments)]
pub(super) async fn decide(
    tx: &mut Tx<'_>,
    id: &str,
    state: RequestState,
    by: Option<&str>,
    reason: Option<&str>,
    result: Option<String>,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE approval_requests SET state = $2, decided_at = $3, updated_at = $3, \
         decided_by = $4, reason = $5, result = $6 WHERE id = $1 AND state = 'PENDING'",
    )
    .bind(id.to_string())
    .bind(state.as_str())
    .bind(now)
    .bind(by.map(str::to_string))
    .bind(reason.map(str::to_string))
    .bind(result)
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    wipe_shares(tx, Some(id)).await
}

/// Ends a completion transaction: reads the key as it is now, marks the request
/// `EXECUTED` with it as the result, and commits.
pub(super) async fn executed_with_key(
    mut tx: Tx<'static>,
    id: &str,
    key: &KeyId,
    now: i64,
) -> Result<KeyRecord> {
    let rec = load_key(&mut *tx, KeyLookup::Id(key)).await?;
    let result = result_to_json(&RequestResult::Key(rec.clone()));
    decide(
        &mut tx,
        id,
        RequestState::Executed,
        None,
        None,
        Some(result),
        now,
    )
    .await?;
    tx.commit().await.map_err(classify)?;
    Ok(rec)
}

/// Ends a completion transaction: marks the request `EXECUTED` with a note as the
/// result, and commits.
pub(super) async fn executed_with_note(
    mut tx: Tx<'static>,
    id: &str,
    note: String,
    now: i64,
) -> Result<()> {
    let result = result_to_json(&RequestResult::Note(note));
    decide(
        &mut tx,
        id,
        RequestState::Executed,
        None,
        None,
        Some(result),
        now,
    )
    .await?;
    tx.commit().await.map_err(classify)
}

/// Wipes the stored shares of request `id`, or (`None`) of every decided request.
pub(super) async fn wipe_shares(tx: &mut Tx<'_>, id: Option<&str>) -> Result<()> {
    let q = match id {
        Some(id) => sqlx::query(
            "UPDATE request_approvals SET share_sealed = NULL \
             WHERE request_id = $1 AND share_sealed IS NOT NULL",
        )
        .bind(id.to_string()),
        None => sqlx::query(
            "UPDATE request_approvals SET share_sealed = NULL WHERE share_sealed IS NOT NULL \
             AND request_id IN (SELECT id FROM approval_requests WHERE state <> 'PENDING')",
        ),
    };
    q.execute(&mut **tx).await.map_err(classify)?;
    Ok(())
}
