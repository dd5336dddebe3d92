//! Storage of approval requests: [`ApprovalStore`] and its implementation on [`SqlStore`].
//!
//! Invariants (enforced by conditional updates here and by triggers in the migrations):
//! - Only a `PENDING` request changes; every other state is final, and a decided row is
//!   never updated again. Requests and approvals are never deleted.
//! - Every transaction that changes a request first touches its row with a conditional
//!   `UPDATE … WHERE state = 'PENDING'`. That is the portable row lock: on PostgreSQL a
//!   concurrent writer waits and then sees the condition re-checked on the newest row,
//!   on SQLite `BEGIN IMMEDIATE` serialises writers anyway. So an approval, a rejection,
//!   an expiry and an execution of the same request are decided one at a time.
//! - Execution is exactly once: the operation's effect (a new version, a state change)
//!   and `PENDING → EXECUTED` with its result commit in one transaction, which refuses a
//!   request that is no longer pending. A loser rolls back its effect.
//! - A custodian approves a request once (primary key). A share rests only sealed under
//!   the HSM key `arca:meta` (the service seals it), and is wiped (`NULL`) in the same
//!   transaction that decides the request; who approved and when stays.
//!
//! Must not import: tonic, prost, cryptoki.

use arca_hsm::ObjectId;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::sql::{classify, get, KeyLookup, SqlStore};
use super::{
    CustodianRecord, KeyRecord, QuorumConfig, Result, StoreError, TokenRecord, VersionRecord,
};
use crate::keys::{KeyId, KeyName, VersionState};
use crate::quorum::approvals::{Operation, Parameters, QuorumApproved, RequestState, Standing};

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

/// Storage of approval requests.
#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync + 'static {
    /// Stores a new `PENDING` request.
    async fn create_request(&self, req: &NewRequest<'_>) -> Result<ApprovalRecord>;

    /// The request with its approvals; `NotFound` if there is none.
    async fn request(&self, id: &str) -> Result<ApprovalRecord>;

    /// Requests, newest first, optionally in one stored state, after the page position
    /// `after` = (created_at, id) of the last one seen.
    async fn list_requests(
        &self,
        state: Option<RequestState>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>>;

    /// Records `custodian`'s approval with their sealed share, if the request is
    /// `PENDING`, not expired at `now` and short of K approvals; `StateConflict` naming
    /// the state (`EXPIRED`, or `PENDING` when K approvals are in) otherwise, and
    /// `AlreadyExists` if that custodian approved before.
    async fn add_approval(
        &self,
        id: &str,
        custodian: &str,
        sealed_share: &[u8],
        now: i64,
    ) -> Result<ApprovalRecord>;

    /// The sealed shares still stored for a request, oldest approval first.
    async fn sealed_shares(&self, id: &str) -> Result<Vec<SealedShare>>;

    /// `PENDING → REJECTED` by `by` with `reason`, wiping the stored shares. Refused
    /// (`StateConflict`) once decided or expired.
    async fn reject_request(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<ApprovalRecord>;

    /// `PENDING → FAILED` with `reason`, wiping the stored shares.
    async fn fail_request(&self, id: &str, reason: &str, now: i64) -> Result<ApprovalRecord>;

    /// Marks every pending request past its expiry and short of K approvals `EXPIRED`
    /// and wipes the shares of every decided request. Returns how many expired.
    async fn expire_requests(&self, now: i64) -> Result<u64>;

    /// Ids of `PENDING` requests with at least K approvals (to run), oldest first.
    async fn ready_requests(&self) -> Result<Vec<String>>;

    /// In one transaction: adds version `version` of `key` (as [`super::Store::add_version`])
    /// and marks request `id` `EXECUTED` with the key as result, wiping its shares. Takes
    /// the proof that K approvals rebuilt the quorum secret.
    /// `StateConflict` if the request is not pending with K approvals (nothing changes).
    async fn complete_add_version(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: moves the version to `to` (from one of `from`; nothing to do
    /// if it is in `to` already) and marks request `id` `EXECUTED` with the key as
    /// result, wiping its shares. `StateConflict` as for the other completions.
    #[allow(clippy::too_many_arguments)]
    async fn complete_set_version_state(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: applies a lifecycle change to `key` and marks request `id`
    /// `EXECUTED` with the key as result, wiping its shares. `StateConflict` as for the
    /// other completions (and as [`super::Store::apply_lifecycle`]).
    async fn complete_lifecycle(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        change: &super::LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: replaces the quorum configuration (only while
    /// `previous_generation` is current; `StateConflict` otherwise), adds the new
    /// generation's custodians and tokens, revokes every earlier custodian token, and
    /// marks request `id` `EXECUTED` with the rekey as result, wiping its shares.
    /// Returns the ids of the revoked tokens. `StateConflict` as for the other
    /// completions.
    async fn complete_rekey(
        &self,
        id: &str,
        approved: &QuorumApproved,
        quorum: &NewQuorum<'_>,
        now: i64,
    ) -> Result<Vec<String>>;
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

/// Groups joined request/approval rows (ordered by request, then approval) into records.
fn requests_from_rows(rows: &[AnyRow]) -> Result<Vec<ApprovalRecord>> {
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
        versions,
    }))
}

pub(super) type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

impl SqlStore {
    async fn load_request<'e, E>(&self, exec: E, id: &str) -> Result<ApprovalRecord>
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

    /// The stored state of a request, named for a `StateConflict`.
    async fn conflict(&self, tx: &mut Tx<'_>, id: &str, now: i64) -> StoreError {
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
            Some(RequestState::Pending) if n < threshold && expires_at <= now => {
                RequestState::Expired
            }
            Some(s) => s,
            None => return StoreError::Corrupt("request state"),
        };
        StoreError::StateConflict {
            current: current.as_str(),
        }
    }

    /// Ends a completion transaction: reads the key as it is now, marks the request
    /// `EXECUTED` with it as the result, and commits.
    async fn executed_with_key(
        &self,
        mut tx: Tx<'static>,
        id: &str,
        key: &KeyId,
        now: i64,
    ) -> Result<KeyRecord> {
        let rec = self.load_key(&mut *tx, KeyLookup::Id(key)).await?;
        let result = result_to_json(&RequestResult::Key(rec.clone()));
        Self::decide(
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

    /// Locks a pending request with K approvals for its completion (see the module
    /// docs); `StateConflict` otherwise.
    pub(super) async fn claim_for_completion(
        &self,
        tx: &mut Tx<'_>,
        id: &str,
        now: i64,
    ) -> Result<()> {
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
            Err(self.conflict(tx, id, now).await)
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

    /// Decides a pending request (`REJECTED`, `FAILED`) without running anything.
    async fn decide_alone(
        &self,
        id: &str,
        state: RequestState,
        by: Option<&str>,
        reason: &str,
        now: i64,
    ) -> Result<ApprovalRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        // A rejection needs a request still open: not expired, unless K approvals are in
        // (then it only waits to run, and a rejection still stops it).
        let done = sqlx::query(
            "UPDATE approval_requests SET updated_at = $2 \
             WHERE id = $1 AND state = 'PENDING' AND (expires_at > $2 OR $3 = 1 OR \
             (SELECT COUNT(*) FROM request_approvals a WHERE a.request_id = $1) >= threshold)",
        )
        .bind(id.to_string())
        .bind(now)
        .bind(i64::from(state == RequestState::Failed))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(self.conflict(&mut tx, id, now).await);
        }
        Self::decide(&mut tx, id, state, by, Some(reason), None, now).await?;
        let rec = self.load_request(&mut *tx, id).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }
}

async fn wipe_shares(tx: &mut Tx<'_>, id: Option<&str>) -> Result<()> {
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

#[async_trait::async_trait]
impl ApprovalStore for SqlStore {
    async fn create_request(&self, r: &NewRequest<'_>) -> Result<ApprovalRecord> {
        let parameters = serde_json::to_string(r.parameters)
            .map_err(|_| StoreError::Corrupt("request parameters"))?;
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO approval_requests (id, operation, parameters, digest, requester, \
             threshold, generation, state, created_at, expires_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'PENDING', $8, $9, $8)",
        )
        .bind(r.id.to_string())
        .bind(r.operation.as_str())
        .bind(parameters)
        .bind(r.digest.to_string())
        .bind(r.requester.to_string())
        .bind(i64::from(r.threshold))
        .bind(r.generation)
        .bind(r.created_at)
        .bind(r.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let rec = self.load_request(&mut *tx, r.id).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn request(&self, id: &str) -> Result<ApprovalRecord> {
        self.load_request(&self.reader, id).await
    }

    async fn list_requests(
        &self,
        state: Option<RequestState>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<ApprovalRecord>> {
        let (at, id) = after.unwrap_or((0, ""));
        let rows = sqlx::query(request_select!(
            "WHERE r.id IN (SELECT id FROM approval_requests \
                 WHERE ($1 = '' OR state = $1) \
                 AND ($2 = 0 OR created_at < $3 OR (created_at = $3 AND id < $4)) \
                 ORDER BY created_at DESC, id DESC LIMIT $5) \
             ORDER BY r.created_at DESC, r.id DESC, a.approved_at, a.custodian"
        ))
        .bind(state.map_or("", RequestState::as_str))
        .bind(i64::from(after.is_some()))
        .bind(at)
        .bind(id.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(classify)?;
        requests_from_rows(&rows)
    }

    async fn add_approval(
        &self,
        id: &str,
        custodian: &str,
        sealed_share: &[u8],
        now: i64,
    ) -> Result<ApprovalRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        let open = sqlx::query(
            "UPDATE approval_requests SET updated_at = $2 \
             WHERE id = $1 AND state = 'PENDING' AND expires_at > $2 \
             AND (SELECT COUNT(*) FROM request_approvals a WHERE a.request_id = $1) < threshold",
        )
        .bind(id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if open.rows_affected() != 1 {
            return Err(self.conflict(&mut tx, id, now).await);
        }
        sqlx::query(
            "INSERT INTO request_approvals (request_id, custodian, approved_at, share_sealed) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id.to_string())
        .bind(custodian.to_string())
        .bind(now)
        .bind(hex::encode(sealed_share))
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let rec = self.load_request(&mut *tx, id).await?;
        // On PostgreSQL the count in the condition above may predate an approval that
        // committed while this transaction waited for the row; this statement sees it.
        if rec.approvals.len() > usize::from(rec.threshold) {
            return Err(StoreError::StateConflict {
                current: RequestState::Pending.as_str(),
            });
        }
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn sealed_shares(&self, id: &str) -> Result<Vec<SealedShare>> {
        let rows = sqlx::query(
            "SELECT custodian, share_sealed FROM request_approvals \
             WHERE request_id = $1 AND share_sealed IS NOT NULL ORDER BY approved_at, custodian",
        )
        .bind(id.to_string())
        .fetch_all(&self.writer)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(|row| {
                Ok(SealedShare {
                    custodian: get(row, "custodian")?,
                    sealed: hex::decode(get::<String>(row, "share_sealed")?)
                        .map_err(|_| StoreError::Corrupt("sealed share"))?,
                })
            })
            .collect()
    }

    async fn reject_request(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<ApprovalRecord> {
        self.decide_alone(id, RequestState::Rejected, Some(by), reason, now)
            .await
    }

    async fn fail_request(&self, id: &str, reason: &str, now: i64) -> Result<ApprovalRecord> {
        self.decide_alone(id, RequestState::Failed, None, reason, now)
            .await
    }

    async fn expire_requests(&self, now: i64) -> Result<u64> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        let expired = sqlx::query(
            "UPDATE approval_requests SET state = 'EXPIRED', decided_at = $1, updated_at = $1 \
             WHERE state = 'PENDING' AND expires_at <= $1 AND (SELECT COUNT(*) \
             FROM request_approvals a WHERE a.request_id = approval_requests.id) < threshold",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected();
        wipe_shares(&mut tx, None).await?;
        tx.commit().await.map_err(classify)?;
        Ok(expired)
    }

    async fn ready_requests(&self) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT r.id FROM approval_requests r WHERE r.state = 'PENDING' AND \
             (SELECT COUNT(*) FROM request_approvals a WHERE a.request_id = r.id) >= r.threshold \
             ORDER BY r.created_at, r.id",
        )
        .fetch_all(&self.writer)
        .await
        .map_err(classify)
    }

    async fn complete_add_version(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        self.claim_for_completion(&mut tx, id, now).await?;
        // As `Store::add_version`: the next number only, then primary.
        super::sql::insert_next_version(&mut tx, key, version, hsm_id, now).await?;
        self.executed_with_key(tx, id, key, now).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn complete_set_version_state(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        self.claim_for_completion(&mut tx, id, now).await?;
        // Another node may have changed the version meanwhile (PostgreSQL): then the
        // caller decides again from the new state.
        super::sql::change_version_state(&mut tx, key, version, from, to, now, true).await?;
        self.executed_with_key(tx, id, key, now).await
    }

    async fn complete_lifecycle(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        key: &KeyId,
        change: &super::LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        self.claim_for_completion(&mut tx, id, now).await?;
        super::lifecycle::apply_in(&mut tx, key, change, now).await?;
        self.executed_with_key(tx, id, key, now).await
    }

    async fn complete_rekey(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        q: &NewQuorum<'_>,
        now: i64,
    ) -> Result<Vec<String>> {
        let cfg = q.config;
        if cfg.generation != q.previous_generation + 1 {
            return Err(StoreError::Corrupt("rekey generation"));
        }
        let mut tx = self.writer.begin_with(self.begin).await.map_err(classify)?;
        self.claim_for_completion(&mut tx, id, now).await?;
        let done = sqlx::query(
            "UPDATE quorum_config SET generation = $1, threshold = $2, shares = $3, \
             sealed_pin = $4, verifier = $5, updated_at = $6 WHERE id = 1 AND generation = $7",
        )
        .bind(cfg.generation)
        .bind(i64::from(cfg.threshold))
        .bind(i64::from(cfg.shares))
        .bind(hex::encode(&cfg.sealed_pin))
        .bind(hex::encode(&cfg.verifier))
        .bind(now)
        .bind(q.previous_generation)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::StateConflict {
                current: "generation",
            });
        }
        for c in q.custodians {
            sqlx::query(
                "INSERT INTO custodians (name, generation, share_index, commitment, totp_sealed, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(c.name.clone())
            .bind(c.generation)
            .bind(i64::from(c.share_index))
            .bind(hex::encode(&c.commitment))
            .bind(hex::encode(&c.totp_sealed))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        // Every custodian token issued so far belongs to an earlier generation.
        let revoked: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tokens WHERE principal LIKE 'custodian:%' AND revoked_at IS NULL",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        sqlx::query(
            "UPDATE tokens SET revoked_at = $1 \
             WHERE principal LIKE 'custodian:%' AND revoked_at IS NULL",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        for t in q.tokens {
            super::tokens::insert_token_in(&mut *tx, t).await?;
        }
        let result = result_to_json(&RequestResult::Rekey {
            threshold: cfg.threshold,
            shares: cfg.shares,
            generation: cfg.generation,
        });
        Self::decide(
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
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::sync::Arc;

    use super::*;
    use crate::quorum::approvals::digest;
    use crate::store::{NewKey, Store};

    const T0: i64 = 1_800_000_000_000;
    const TTL: i64 = 60_000;

    /// A real proof, from a 1-of-1 split.
    fn proof() -> QuorumApproved {
        use crate::quorum::{approvals::verify_quorum, crypto, shamir};
        let s = crate::secret::QuorumSecret::from_slice(&[1; 32]).unwrap();
        let shares = shamir::split(&s, 1, 1).unwrap();
        verify_quorum(&[&shares[0]], 1, &crypto::verifier(&s)).unwrap()
    }

    /// Where a case's database lives: a SQLite file in a temporary directory, or a fresh
    /// database on the PostgreSQL server at `ARCA_TEST_POSTGRES_URL` (dropped after the
    /// case). Without that variable the PostgreSQL cases print a SKIP line and pass,
    /// unless `ARCA_REQUIRE_POSTGRES=1`.
    enum Db {
        Sqlite(tempfile::TempDir),
        Postgres {
            admin: String,
            url: String,
            name: String,
        },
    }

    impl Db {
        async fn postgres(test: &str) -> Option<Db> {
            use sqlx::Connection;
            let admin = match std::env::var("ARCA_TEST_POSTGRES_URL") {
                Ok(u) if !u.is_empty() => u,
                _ => {
                    assert!(
                        std::env::var("ARCA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                        "ARCA_REQUIRE_POSTGRES=1 but ARCA_TEST_POSTGRES_URL is not set"
                    );
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIP {test}: ARCA_TEST_POSTGRES_URL is not set"
                    );
                    return None;
                }
            };
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).unwrap();
            let name = format!("arca_ta_{}", hex::encode(raw));
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&admin).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .unwrap();
            let _ = conn.close().await;
            let (base, query) = match admin.split_once('?') {
                Some((b, q)) => (b, format!("?{q}")),
                None => (admin.as_str(), String::new()),
            };
            let (scheme, rest) = base.split_once("://").unwrap();
            let authority = rest.split('/').next().unwrap_or_default();
            let url = format!("{scheme}://{authority}/{name}{query}");
            Some(Db::Postgres { admin, url, name })
        }

        async fn open(&self) -> SqlStore {
            match self {
                Db::Sqlite(dir) => SqlStore::open_sqlite(&dir.path().join("a.db")).await,
                Db::Postgres { url, .. } => SqlStore::open_postgres(url).await,
            }
            .unwrap()
        }

        async fn remove(self) {
            use sqlx::Connection;
            if let Db::Postgres { admin, name, .. } = self {
                if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            }
        }
    }

    /// Runs a case in a task (so a failing case still removes its database).
    async fn run<F, Fut>(db: Db, case: F)
    where
        F: FnOnce(Arc<Db>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let db = Arc::new(db);
        let outcome = tokio::spawn(case(Arc::clone(&db))).await;
        if let Ok(db) = Arc::try_unwrap(db) {
            db.remove().await;
        }
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Each case as `case::sqlite` and `case::postgres`.
    macro_rules! on_both_backends {
        ($($case:ident),* $(,)?) => {$(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = super::Db::Sqlite(tempfile::tempdir().unwrap());
                    super::run(db, super::$case).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let test = concat!(module_path!(), "::postgres");
                    if let Some(db) = super::Db::postgres(test).await {
                        super::run(db, super::$case).await;
                    }
                }
            }
        )*};
    }

    on_both_backends!(
        approvals_count_once_and_only_while_open,
        completion_runs_once_records_the_result_and_wipes_the_shares,
        a_failed_effect_leaves_the_request_pending,
        rejection_and_expiry_decide_and_wipe,
        lists_newest_first_by_page_and_state,
        two_nodes_complete_at_once_and_one_wins,
        two_custodians_take_the_last_place_at_once_and_one_gets_it,
    );

    async fn key(s: &SqlStore, name: &str, n: u8) -> KeyRecord {
        s.create_key(&NewKey {
            id: KeyId::from_random([n; 16]),
            name: KeyName::parse(name).unwrap(),
            description: String::new(),
            first_hsm_id: ObjectId([n; 16]),
            rotation_period_ms: None,
            retain_until: None,
            now: T0,
        })
        .await
        .unwrap()
    }

    async fn request(s: &SqlStore, id: &str, op: Operation, params: &Parameters) -> ApprovalRecord {
        let d = digest(op, params);
        s.create_request(&NewRequest {
            id,
            operation: op,
            parameters: params,
            digest: &d,
            requester: "dev-admin",
            threshold: 2,
            generation: 1,
            created_at: T0,
            expires_at: T0 + TTL,
        })
        .await
        .unwrap()
    }

    fn rotate_params(name: &str) -> Parameters {
        [("key".to_string(), name.to_string())]
            .into_iter()
            .collect()
    }

    async fn approvals_count_once_and_only_while_open(db: Arc<Db>) {
        let s = db.open().await;
        let r = request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
        assert_eq!(r.state, RequestState::Pending);
        assert_eq!(r.parameters, rotate_params("a"));
        let r = s
            .add_approval("req_1", "c1", b"sealed-1", T0 + 1)
            .await
            .unwrap();
        assert_eq!(r.approvals.len(), 1);
        assert!(matches!(
            s.add_approval("req_1", "c1", b"sealed-x", T0 + 2).await,
            Err(StoreError::AlreadyExists)
        ));
        // Expired: refused, named EXPIRED.
        assert!(matches!(
            s.add_approval("req_1", "c2", b"s", T0 + TTL).await,
            Err(StoreError::StateConflict { current: "EXPIRED" })
        ));
        let r = s
            .add_approval("req_1", "c2", b"sealed-2", T0 + 3)
            .await
            .unwrap();
        assert_eq!(
            r.approvals
                .iter()
                .map(|a| a.custodian.as_str())
                .collect::<Vec<_>>(),
            ["c1", "c2"]
        );
        // K in: no more approvals; the request is ready to run and does not expire.
        assert!(matches!(
            s.add_approval("req_1", "c3", b"s", T0 + 4).await,
            Err(StoreError::StateConflict { current: "PENDING" })
        ));
        assert_eq!(s.ready_requests().await.unwrap(), ["req_1"]);
        assert_eq!(s.expire_requests(T0 + 2 * TTL).await.unwrap(), 0);
        assert_eq!(s.sealed_shares("req_1").await.unwrap().len(), 2);
        assert!(matches!(s.request("nope").await, Err(StoreError::NotFound)));
    }

    async fn completion_runs_once_records_the_result_and_wipes_the_shares(db: Arc<Db>) {
        let s = db.open().await;
        let k = key(&s, "a", 1).await;
        request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
        s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
        // Short of K: nothing runs.
        assert!(matches!(
            s.complete_add_version("req_1", &proof(), &k.id, 2, &ObjectId([9; 16]), T0 + 2)
                .await,
            Err(StoreError::StateConflict { current: "PENDING" })
        ));
        s.add_approval("req_1", "c2", b"y", T0 + 2).await.unwrap();
        let rec = s
            .complete_add_version("req_1", &proof(), &k.id, 2, &ObjectId([9; 16]), T0 + 3)
            .await
            .unwrap();
        assert_eq!(rec.primary_version, 2);
        // The second completion changes nothing: the version stays single.
        assert!(matches!(
            s.complete_add_version("req_1", &proof(), &k.id, 3, &ObjectId([8; 16]), T0 + 4)
                .await,
            Err(StoreError::StateConflict {
                current: "EXECUTED"
            })
        ));
        assert_eq!(s.key_by_id(&k.id).await.unwrap().versions.len(), 2);
        let r = s.request("req_1").await.unwrap();
        assert_eq!(r.state, RequestState::Executed);
        assert_eq!(r.decided_at, Some(T0 + 3));
        let Some(RequestResult::Key(after)) = r.result else {
            panic!("no result")
        };
        assert_eq!(after.primary_version, 2);
        assert_eq!(after.versions[1].hsm_id, ObjectId([9; 16]));
        assert_eq!(after.name.as_str(), "a");
        // Shares wiped, approvers kept.
        assert!(s.sealed_shares("req_1").await.unwrap().is_empty());
        assert_eq!(r.approvals.len(), 2);
        assert!(s.ready_requests().await.unwrap().is_empty());
        // A decided request is final, in the database too.
        assert!(
            sqlx::query("UPDATE approval_requests SET state = 'PENDING'")
                .execute(&s.writer)
                .await
                .is_err()
        );
        assert!(
            sqlx::query("UPDATE request_approvals SET share_sealed = 'aa'")
                .execute(&s.writer)
                .await
                .is_err()
        );
        assert!(sqlx::query("DELETE FROM request_approvals")
            .execute(&s.writer)
            .await
            .is_err());
        assert!(sqlx::query(
            "INSERT INTO request_approvals (request_id, custodian, approved_at) VALUES ('req_1', 'c9', 1)"
        )
        .execute(&s.writer)
        .await
        .is_err());
    }

    async fn a_failed_effect_leaves_the_request_pending(db: Arc<Db>) {
        let s = db.open().await;
        let k = key(&s, "a", 1).await;
        request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
        s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
        s.add_approval("req_1", "c2", b"y", T0 + 2).await.unwrap();
        // A version number another rotation took: the whole transaction rolls back.
        assert!(matches!(
            s.complete_add_version("req_1", &proof(), &k.id, 5, &ObjectId([9; 16]), T0 + 3)
                .await,
            Err(StoreError::AlreadyExists)
        ));
        let r = s.request("req_1").await.unwrap();
        assert_eq!(r.state, RequestState::Pending);
        assert_eq!(s.sealed_shares("req_1").await.unwrap().len(), 2);
        // A state change from a state that does not allow it: the same.
        let p: Parameters = [("key", "a"), ("version", "1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        request(&s, "req_2", Operation::DisableKeyVersion, &p).await;
        s.add_approval("req_2", "c1", b"x", T0 + 1).await.unwrap();
        s.add_approval("req_2", "c2", b"y", T0 + 2).await.unwrap();
        assert!(matches!(
            s.complete_set_version_state(
                "req_2",
                &proof(),
                &k.id,
                1,
                &[VersionState::Disabled],
                VersionState::ScheduledForDestruction,
                T0 + 3
            )
            .await,
            Err(StoreError::StateConflict { current: "ENABLED" })
        ));
        assert_eq!(
            s.request("req_2").await.unwrap().state,
            RequestState::Pending
        );
        let rec = s
            .complete_set_version_state(
                "req_2",
                &proof(),
                &k.id,
                1,
                &[VersionState::Enabled],
                VersionState::Disabled,
                T0 + 4,
            )
            .await
            .unwrap();
        assert_eq!(rec.versions[0].state, VersionState::Disabled);
        assert_eq!(
            s.request("req_2").await.unwrap().state,
            RequestState::Executed
        );
    }

    async fn rejection_and_expiry_decide_and_wipe(db: Arc<Db>) {
        let s = db.open().await;
        request(&s, "req_1", Operation::RotateKey, &rotate_params("a")).await;
        request(&s, "req_2", Operation::RotateKey, &rotate_params("b")).await;
        s.add_approval("req_1", "c1", b"x", T0 + 1).await.unwrap();
        s.add_approval("req_2", "c1", b"x", T0 + 1).await.unwrap();
        let r = s
            .reject_request("req_1", "custodian:c2", "wrong key", T0 + 2)
            .await
            .unwrap();
        assert_eq!(r.state, RequestState::Rejected);
        assert_eq!(r.decided_by.as_deref(), Some("custodian:c2"));
        assert_eq!(r.reason.as_deref(), Some("wrong key"));
        assert!(s.sealed_shares("req_1").await.unwrap().is_empty());
        assert!(matches!(
            s.add_approval("req_1", "c2", b"y", T0 + 3).await,
            Err(StoreError::StateConflict {
                current: "REJECTED"
            })
        ));
        assert!(matches!(
            s.reject_request("req_1", "x", "again", T0 + 3).await,
            Err(StoreError::StateConflict {
                current: "REJECTED"
            })
        ));
        // Expiry: refused for rejection, then swept.
        assert!(matches!(
            s.reject_request("req_2", "x", "late", T0 + TTL).await,
            Err(StoreError::StateConflict { current: "EXPIRED" })
        ));
        assert_eq!(s.expire_requests(T0 + TTL - 1).await.unwrap(), 0);
        assert_eq!(s.expire_requests(T0 + TTL).await.unwrap(), 1);
        let r = s.request("req_2").await.unwrap();
        assert_eq!(r.state, RequestState::Expired);
        assert!(s.sealed_shares("req_2").await.unwrap().is_empty());
        // Failing is for pending requests only.
        let r = s.fail_request("req_2", "x", T0 + TTL).await;
        assert!(matches!(
            r,
            Err(StoreError::StateConflict { current: "EXPIRED" })
        ));
    }

    async fn lists_newest_first_by_page_and_state(db: Arc<Db>) {
        let s = db.open().await;
        for i in 0..5 {
            let d = digest(Operation::RotateKey, &rotate_params("a"));
            s.create_request(&NewRequest {
                id: &format!("req_{i}"),
                operation: Operation::RotateKey,
                parameters: &rotate_params("a"),
                digest: &d,
                requester: "r",
                threshold: 2,
                generation: 1,
                created_at: T0 + i64::from(i / 2),
                expires_at: T0 + TTL,
            })
            .await
            .unwrap();
        }
        s.reject_request("req_1", "x", "no", T0).await.unwrap();
        let mut seen = Vec::new();
        let mut after: Option<(i64, String)> = None;
        loop {
            let page = s
                .list_requests(None, after.as_ref().map(|(t, i)| (*t, i.as_str())), 2)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|r| (r.created_at, r.id.clone()));
            seen.extend(page.into_iter().map(|r| r.id));
        }
        assert_eq!(seen, ["req_4", "req_3", "req_2", "req_1", "req_0"]);
        let rejected = s
            .list_requests(Some(RequestState::Rejected), None, 10)
            .await
            .unwrap();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].id, "req_1");
    }

    async fn two_nodes_complete_at_once_and_one_wins(db: Arc<Db>) {
        let a = Arc::new(db.open().await);
        let b = Arc::new(db.open().await);
        for round in 0..8u8 {
            let k = key(&a, &format!("k{round}"), 100 + round).await;
            let id = format!("req_{round}");
            request(&a, &id, Operation::RotateKey, &rotate_params("k")).await;
            a.add_approval(&id, "c1", b"x", T0 + 1).await.unwrap();
            a.add_approval(&id, "c2", b"y", T0 + 2).await.unwrap();
            let race = |s: Arc<SqlStore>, obj: u8| {
                let (id, key) = (id.clone(), k.id);
                tokio::spawn(async move {
                    s.complete_add_version(&id, &proof(), &key, 2, &ObjectId([obj; 16]), T0 + 3)
                        .await
                })
            };
            let (ra, rb) = tokio::join!(
                race(Arc::clone(&a), round),
                race(Arc::clone(&b), 200 - round)
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert_eq!(
                [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
                1,
                "round {round}: {ra:?} / {rb:?}"
            );
            for r in [&ra, &rb] {
                if let Err(e) = r {
                    assert!(
                        matches!(
                            e,
                            StoreError::StateConflict {
                                current: "EXECUTED"
                            } | StoreError::AlreadyExists
                        ),
                        "round {round}: loser got {e:?}"
                    );
                }
            }
            assert_eq!(b.key_by_id(&k.id).await.unwrap().versions.len(), 2);
            assert_eq!(b.request(&id).await.unwrap().state, RequestState::Executed);
        }
    }

    async fn two_custodians_take_the_last_place_at_once_and_one_gets_it(db: Arc<Db>) {
        let a = Arc::new(db.open().await);
        let b = Arc::new(db.open().await);
        for round in 0..8u8 {
            let id = format!("req_{round}");
            request(&a, &id, Operation::RotateKey, &rotate_params("k")).await;
            a.add_approval(&id, "c1", b"x", T0 + 1).await.unwrap();
            let add = |s: Arc<SqlStore>, who: &'static str| {
                let id = id.clone();
                tokio::spawn(async move { s.add_approval(&id, who, b"z", T0 + 2).await })
            };
            let (ra, rb) = tokio::join!(add(Arc::clone(&a), "c2"), add(Arc::clone(&b), "c3"));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert_eq!(
                [&ra, &rb].iter().filter(|r| r.is_ok()).count(),
                1,
                "round {round}: {ra:?} / {rb:?}"
            );
            assert_eq!(b.request(&id).await.unwrap().approvals.len(), 2);
        }
    }
}
