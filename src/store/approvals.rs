//! Approval requests and their votes ([`ApprovalStore`]): creating and listing requests,
//! custodians' approvals with their sealed shares, rejection, failure and expiry — and the
//! completions, each committing an approved operation's effect with the request's
//! `EXECUTED` mark in one transaction.
//!
//! Invariants:
//! - Execution is exactly once: the operation's effect (a new version, a state change, a
//!   lifecycle change, a rekey, a policy, a grant) and `PENDING → EXECUTED` with its
//!   result commit in one transaction, which refuses a request that is no longer pending
//!   or short of K approvals (`Conflict::RequestState`). A loser rolls back its effect.
//! - A custodian approves a request once (primary key), and never past K approvals.
//! - The rows' own rules (only `PENDING` changes; shares wiped when decided) are
//!   `requests.rs`'s; the effects are made by the steps of the families that own their
//!   tables (`keys.rs`, `lifecycle.rs`, `quorum.rs`, `tokens.rs`, `access.rs`).
//!
//! Must not import: tonic, prost, cryptoki. It is the top table family: no other file of
//! `store/` may import it.

use super::access::{insert_grant_in, insert_policy_in, GrantRecord, PolicyVersion};
use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::keys::{change_version_state, insert_next_version, EnabledStamp, KeyRecord};
use super::lifecycle::{apply_in, LifecycleChange};
use super::pool::SqlStore;
use super::quorum::{insert_custodian_in, replace_config_in};
use super::requests::{
    claim_for_completion, conflict, decide, executed_with_key, executed_with_note, load_request,
    request_select, requests_from_rows, result_to_json, wipe_shares, ApprovalRecord, NewQuorum,
    NewRequest, RequestResult, SealedShare,
};
use super::rows::get;
use super::tokens::{insert_token_in, revoke_custodian_tokens_in, TokenRecord};
use crate::keys::{KeyId, ObjectId, VersionState};
use crate::quorum::approvals::{QuorumApproved, RequestState};

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
    /// `PENDING`, not expired at `now` and short of K approvals; `Conflict::RequestState`
    /// naming the state (`EXPIRED`, or `PENDING` when K approvals are in) otherwise, and
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
    /// (`Conflict::RequestState`) once decided or expired.
    async fn reject_request(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        now: i64,
    ) -> Result<ApprovalRecord>;

    /// `PENDING → FAILED` with `reason`, wiping the stored shares (`Conflict::RequestState`
    /// once decided, or expired short of K approvals).
    async fn fail_request(&self, id: &str, reason: &str, now: i64) -> Result<ApprovalRecord>;

    /// Marks every pending request past its expiry and short of K approvals `EXPIRED`
    /// and wipes the shares of every decided request. Returns how many expired.
    async fn expire_requests(&self, now: i64) -> Result<u64>;

    /// Ids of `PENDING` requests with at least K approvals (to run), oldest first.
    async fn ready_requests(&self) -> Result<Vec<String>>;

    /// In one transaction: adds version `version` of `key` (as `KeyStore::add_version`)
    /// and marks request `id` `EXECUTED` with the key as result, wiping its shares. Takes
    /// the proof that K approvals rebuilt the quorum secret.
    /// `Conflict::RequestState` if the request is not pending with K approvals (nothing
    /// changes).
    #[allow(clippy::too_many_arguments)]
    async fn complete_add_version(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        mac: &str,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: moves the version to `to` (from one of `from`; nothing to do
    /// if it is in `to` already) and marks request `id` `EXECUTED` with the key as
    /// result, wiping its shares. `Conflict::RequestState` as for the other completions,
    /// `Conflict::VersionState` as `KeyStore::set_version_state`.
    #[allow(clippy::too_many_arguments)]
    async fn complete_set_version_state(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        from: &[VersionState],
        to: VersionState,
        enabled: Option<&EnabledStamp>,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: applies a lifecycle change to `key` and marks request `id`
    /// `EXECUTED` with the key as result, wiping its shares. `Conflict::RequestState` as
    /// for the other completions (and the conflicts of `LifecycleStore::apply_lifecycle`).
    async fn complete_lifecycle(
        &self,
        id: &str,
        approved: &QuorumApproved,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord>;

    /// In one transaction: replaces the quorum configuration (only while
    /// `previous_generation` is current; `Conflict::Generation` otherwise), adds the new
    /// generation's custodians and tokens, revokes every earlier custodian token, and
    /// marks request `id` `EXECUTED` with the rekey as result, wiping its shares.
    /// Returns the ids of the revoked tokens. `Conflict::RequestState` as for the other
    /// completions.
    async fn complete_rekey(
        &self,
        id: &str,
        approved: &QuorumApproved,
        quorum: &NewQuorum<'_>,
        now: i64,
    ) -> Result<Vec<String>>;

    /// In one transaction: stores the policy of approved request `id` as version
    /// `policy.seq` (the newest plus one, else `Conflict::PolicySeq`) and marks the
    /// request `EXECUTED`; returns the new seq. `Conflict::RequestState` as for the
    /// other completions.
    async fn complete_update_policy(
        &self,
        id: &str,
        approved: &QuorumApproved,
        policy: &PolicyVersion,
        now: i64,
    ) -> Result<i64>;

    /// In one transaction: stores the grant of approved elevation `id` and marks the
    /// request `EXECUTED`. `Conflict::RequestState` as for the other completions.
    async fn complete_elevation(
        &self,
        id: &str,
        approved: &QuorumApproved,
        grant: &GrantRecord,
        now: i64,
    ) -> Result<()>;

    /// In one transaction: stores the token of approved request `id` (its hash only) and
    /// marks the request `EXECUTED`. `AlreadyExists` if the hash or id is taken;
    /// `Conflict::RequestState` as for the other completions.
    async fn complete_create_token(
        &self,
        id: &str,
        approved: &QuorumApproved,
        token: &TokenRecord,
        now: i64,
    ) -> Result<()>;
}

impl SqlStore {
    /// Decides a pending request (`REJECTED`, `FAILED`) without running anything.
    async fn decide_alone(
        &self,
        id: &str,
        state: RequestState,
        by: Option<&str>,
        reason: &str,
        now: i64,
    ) -> Result<ApprovalRecord> {
        let mut tx = self.begin_write().await?;
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
            return Err(conflict(&mut tx, id, now).await);
        }
        decide(&mut tx, id, state, by, Some(reason), None, now).await?;
        let rec = load_request(&mut *tx, id).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }
}

#[async_trait::async_trait]
impl ApprovalStore for SqlStore {
    async fn create_request(&self, r: &NewRequest<'_>) -> Result<ApprovalRecord> {
        let parameters = serde_json::to_string(r.parameters)
            .map_err(|_| StoreError::Corrupt("request parameters"))?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO approval_requests (id, operation, parameters, digest, requester, \
             requester_person, threshold, generation, state, created_at, expires_at, \
             updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', $9, $10, $9)",
        )
        .bind(r.id.to_string())
        .bind(r.operation.as_str())
        .bind(parameters)
        .bind(r.digest.to_string())
        .bind(r.requester.to_string())
        .bind(r.requester_person.to_string())
        .bind(i64::from(r.threshold))
        .bind(r.generation)
        .bind(r.created_at)
        .bind(r.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let rec = load_request(&mut *tx, r.id).await?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn request(&self, id: &str) -> Result<ApprovalRecord> {
        load_request(&self.reader, id).await
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
        let mut tx = self.begin_write().await?;
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
            return Err(conflict(&mut tx, id, now).await);
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
        let rec = load_request(&mut *tx, id).await?;
        // On PostgreSQL the count in the condition above may predate an approval that
        // committed while this transaction waited for the row; this statement sees it.
        if rec.approvals.len() > usize::from(rec.threshold) {
            return Err(StoreError::Conflict(Conflict::RequestState(
                RequestState::Pending,
            )));
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
        let mut tx = self.begin_write().await?;
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

    #[allow(clippy::too_many_arguments)]
    async fn complete_add_version(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        key: &KeyId,
        version: u32,
        hsm_id: &ObjectId,
        mac: &str,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        // As `KeyStore::add_version`: the next number only, then primary.
        insert_next_version(&mut tx, key, version, hsm_id, mac, now).await?;
        executed_with_key(tx, id, key, now).await
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
        enabled: Option<&EnabledStamp>,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        // Another node may have changed the version meanwhile (PostgreSQL): then the
        // caller decides again from the new state.
        change_version_state(&mut tx, key, version, from, to, enabled, now, true).await?;
        executed_with_key(tx, id, key, now).await
    }

    async fn complete_lifecycle(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        key: &KeyId,
        change: &LifecycleChange,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        apply_in(&mut tx, key, change, now).await?;
        executed_with_key(tx, id, key, now).await
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
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        replace_config_in(&mut tx, cfg, q.previous_generation, now).await?;
        for c in q.custodians {
            insert_custodian_in(&mut tx, c, now).await?;
        }
        // Every custodian token issued so far belongs to an earlier generation.
        let revoked = revoke_custodian_tokens_in(&mut tx, now).await?;
        for t in q.tokens {
            insert_token_in(&mut *tx, t).await?;
        }
        let result = result_to_json(&RequestResult::Rekey {
            threshold: cfg.threshold,
            shares: cfg.shares,
            generation: cfg.generation,
        });
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
        Ok(revoked)
    }

    async fn complete_update_policy(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        policy: &PolicyVersion,
        now: i64,
    ) -> Result<i64> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        insert_policy_in(&mut tx, policy).await?;
        let seq = policy.seq;
        executed_with_note(tx, id, format!("access policy version {seq} in force"), now).await?;
        Ok(seq)
    }

    async fn complete_elevation(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        grant: &GrantRecord,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        insert_grant_in(&mut tx, grant).await?;
        let note = format!(
            "{} holds role {} until {} ({})",
            grant.principal,
            grant.role,
            crate::clock::rfc3339(grant.expires_at),
            grant.id
        );
        executed_with_note(tx, id, note, now).await
    }

    async fn complete_create_token(
        &self,
        id: &str,
        _approved: &QuorumApproved,
        token: &TokenRecord,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        claim_for_completion(&mut tx, id, now).await?;
        insert_token_in(&mut *tx, token).await?;
        let note = format!(
            "token {} for {} valid until {}",
            token.id,
            token.principal,
            token
                .expires_at
                .map(crate::clock::rfc3339)
                .unwrap_or_else(|| "never".into())
        );
        executed_with_note(tx, id, note, now).await
    }
}
