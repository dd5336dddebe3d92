//! Access-control state ([`AccessStore`]): approved policy versions, time-bound role
//! grants, break-glass reviews, and principals' TOTP enrolments with their failures; and
//! the in-transaction steps an approval's completion reuses ([`insert_policy_in`],
//! [`insert_grant_in`]).
//!
//! Invariants:
//! - A policy version and a granted elevation are written in the same transaction as the
//!   `EXECUTED` mark of the approval request that ordered them (exactly once; the
//!   completion is `ApprovalStore`'s).
//! - A break-glass grant and its review are written in one transaction: there is never a
//!   grant without an open review. A review closes once (`Conflict::ReviewClosed`).
//! - A TOTP step is recorded with a conditional update, so a code is accepted at most once
//!   even across nodes (`Conflict::StepUsed`).
//! - A code is checked only in an attempt slot reserved before (ADR 14): under the
//!   enrolment's row lock, a `pending` failure row is added only while the principal is
//!   not locked out and its failures plus pending attempts in the window are below the
//!   limit (`Conflict::LockedOut` otherwise). A failed check settles its row as a failure
//!   (locking at the limit, in the same transaction); a passed check deletes it with the
//!   step it used. A row left pending (a crash) counts until the window passes.
//! - A TOTP secret is stored only sealed (the caller seals it under `arca:meta`).
//!
//! Must not import: the other table-family files of `store/`; tonic, prost, cryptoki.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::attempts::{reserve_in, Holder, Slot};
use super::classify::classify;
use super::error::{Conflict, Result, StoreError};
use super::pool::SqlStore;
use super::rows::get;
use super::tx::Tx;

/// An approved policy as stored.
#[derive(Clone, Debug)]
pub struct PolicyVersion {
    /// Increases by one with every approved change.
    pub seq: i64,
    /// The policy document.
    pub text: String,
    /// The approval request that made it, if any.
    pub request_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// The row's state MAC (hex, `arca:state-mac`; ADR 12), `None` if not stamped.
    pub mac: Option<String>,
}

/// A time-bound role grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// `grant_…`.
    pub id: String,
    /// Who holds it.
    pub principal: String,
    /// The role.
    pub role: String,
    /// `elevation` or `break-glass`.
    pub kind: String,
    /// Why (given by the requester).
    pub reason: String,
    /// The approval request (elevations).
    pub request_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; the grant is void from then on.
    pub expires_at: i64,
    /// The row's state sequence (1; ADR 12).
    pub state_seq: i64,
    /// The row's state MAC (hex, `arca:state-mac`), `None` if not stamped.
    pub mac: Option<String>,
}

/// A break-glass review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewRecord {
    /// `rev_…`.
    pub id: String,
    /// The grant under review.
    pub grant_id: String,
    /// Who broke the glass.
    pub principal: String,
    /// Their reason.
    pub reason: String,
    /// Unix ms.
    pub opened_at: i64,
    /// Unix ms, once closed.
    pub closed_at: Option<i64>,
    /// The auditor who closed it.
    pub closed_by: Option<String>,
    /// The auditor's note.
    pub note: Option<String>,
}

/// A principal's TOTP enrolment.
#[derive(Clone, Debug)]
pub struct TotpEnrolment {
    /// Principal name.
    pub principal: String,
    /// The TOTP secret sealed under `arca:meta`.
    pub sealed: Vec<u8>,
    /// Last step accepted.
    pub last_step: Option<i64>,
    /// Locked out until (Unix ms).
    pub locked_until: Option<i64>,
}

/// An authenticated set (`state_rosters`, ADR 12): `totp` lists every principal ever
/// enrolled in TOTP, so a deleted enrolment is told apart from none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    /// The set's name (`totp`).
    pub name: String,
    /// Its members, sorted.
    pub members: Vec<String>,
    /// +1 with every change.
    pub state_seq: i64,
    /// The state MAC (hex; `q:…` when the init ceremony stamped it), `None` if not stamped.
    pub mac: Option<String>,
}

/// A principal's MFA attempt to reserve before its code is checked.
#[derive(Clone, Debug)]
pub struct MfaAttempt<'a> {
    /// Principal.
    pub principal: &'a str,
    /// The attempt's id (random, unique), to settle or release it by.
    pub id: &'a str,
    /// Unix ms.
    pub at: i64,
    /// Count failures and pending attempts after this time...
    pub since: i64,
    /// ...and reserve only while there are fewer than this many.
    pub limit: u32,
}

/// A principal's failed MFA attempt and the lock-out rule to apply.
#[derive(Clone, Debug)]
pub struct MfaFailure<'a> {
    /// Principal.
    pub principal: &'a str,
    /// The reserved attempt this failure settles.
    pub attempt: &'a str,
    /// Unix ms.
    pub at: i64,
    /// What failed (`missing`, `totp`, `replay`).
    pub reason: &'a str,
    /// Count failures after this time...
    pub since: i64,
    /// ...lock at this many...
    pub limit: u32,
    /// ...until this time.
    pub lock_until: i64,
}

/// Storage of access-control state.
#[async_trait::async_trait]
pub trait AccessStore: Send + Sync + 'static {
    /// The newest approved policy, if any.
    async fn latest_policy(&self) -> Result<Option<PolicyVersion>>;
    /// Stores a policy applied without approval (dev mode's 1-of-1) as version
    /// `policy.seq`, which must follow the newest (`Conflict::PolicySeq` otherwise).
    async fn insert_policy(&self, policy: &PolicyVersion) -> Result<()>;
    /// Stores a grant made without approval (dev mode's 1-of-1 elevation).
    async fn insert_grant(&self, grant: &GrantRecord) -> Result<()>;
    /// Stores a break-glass grant and its open review in one transaction.
    async fn break_glass(&self, grant: &GrantRecord, review_id: &str) -> Result<ReviewRecord>;
    /// Grants not yet expired at `now`.
    async fn active_grants(&self, now: i64) -> Result<Vec<GrantRecord>>;
    /// Sets the MAC of grant `id` whose MAC is still `was`; false if it changed.
    async fn stamp_grant(&self, id: &str, was: Option<&str>, mac: &str) -> Result<bool>;
    /// Sets the MAC of policy version `seq` whose MAC is still `was`; false if it changed.
    async fn stamp_policy(&self, seq: i64, was: Option<&str>, mac: &str) -> Result<bool>;
    /// Reviews, newest first; only open ones if `open_only`.
    async fn list_reviews(&self, open_only: bool) -> Result<Vec<ReviewRecord>>;
    /// Closes an open review; `NotFound`, or `Conflict::ReviewClosed` if closed already.
    async fn close_review(&self, id: &str, by: &str, note: &str, now: i64) -> Result<ReviewRecord>;
    /// A principal's enrolment.
    async fn totp_enrolment(&self, principal: &str) -> Result<Option<TotpEnrolment>>;
    /// Enrols (or re-enrols) a principal; clears its last step and lock. With `roster`,
    /// in the same transaction, replaces the roster of that name if its sequence is
    /// still `was_seq` (`Conflict::ChangedConcurrently` otherwise, and nothing changes).
    async fn enroll_totp(
        &self,
        principal: &str,
        sealed: &[u8],
        now: i64,
        roster: Option<(&Roster, i64)>,
    ) -> Result<()>;
    /// The roster `name`, if its row exists.
    async fn roster(&self, name: &str) -> Result<Option<Roster>>;
    /// Replaces roster `r.name` with `r` if its sequence is still `was_seq`; false if not.
    async fn replace_roster(&self, r: &Roster, was_seq: i64) -> Result<bool>;
    /// Every principal with a TOTP enrolment.
    async fn enrolled_principals(&self) -> Result<Vec<String>>;
    /// Sets the MAC of roster `name` at sequence `seq` whose MAC is still `was`; false if
    /// it changed.
    async fn stamp_roster(
        &self,
        name: &str,
        seq: i64,
        was: Option<&str>,
        mac: &str,
    ) -> Result<bool>;
    /// Reserves an attempt slot before a code is checked: `Conflict::LockedOut` if the
    /// principal is locked out or its failures and pending attempts within the window
    /// reach the limit; `NotFound` if it is not enrolled.
    async fn reserve_mfa_attempt(&self, attempt: &MfaAttempt<'_>) -> Result<()>;
    /// Records that `step` was used and releases the attempt's slot, in one transaction;
    /// `Conflict::StepUsed` on a replay (the slot stays reserved).
    async fn use_principal_totp_step(
        &self,
        principal: &str,
        step: i64,
        attempt: &str,
    ) -> Result<()>;
    /// Settles a reserved attempt as a failure; returns the failures within the window,
    /// locking the principal when they reach the limit.
    async fn record_mfa_failure(&self, failure: &MfaFailure<'_>) -> Result<u32>;
}

/// A roster's members as stored: each name hex-encoded, comma-separated.
fn encode_members(m: &[String]) -> String {
    m.iter().map(hex::encode).collect::<Vec<_>>().join(",")
}

fn decode_members(s: &str) -> Result<Vec<String>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            hex::decode(x)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(StoreError::Corrupt("roster member"))
        })
        .collect()
}

/// Replaces roster `r.name` with `r` through `exec` if its sequence is still `was_seq`.
async fn replace_roster_in<'e, E>(exec: E, r: &Roster, was_seq: i64) -> Result<bool>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let done = sqlx::query(
        "UPDATE state_rosters SET members = $1, state_seq = $2, mac = $3 \
         WHERE name = $4 AND state_seq = $5",
    )
    .bind(encode_members(&r.members))
    .bind(r.state_seq)
    .bind(r.mac.clone())
    .bind(r.name.clone())
    .bind(was_seq)
    .execute(exec)
    .await
    .map_err(classify)?;
    Ok(done.rows_affected() == 1)
}

const GRANT_COLUMNS: &str =
    "id, principal, role, kind, reason, request_id, created_at, expires_at, state_seq, mac";
const REVIEW_COLUMNS: &str =
    "id, grant_id, principal, reason, opened_at, closed_at, closed_by, note";

fn grant_from_row(row: &AnyRow) -> Result<GrantRecord> {
    Ok(GrantRecord {
        id: get(row, "id")?,
        principal: get(row, "principal")?,
        role: get(row, "role")?,
        kind: get(row, "kind")?,
        reason: get(row, "reason")?,
        request_id: get(row, "request_id")?,
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        state_seq: get(row, "state_seq")?,
        mac: get(row, "mac")?,
    })
}

fn review_from_row(row: &AnyRow) -> Result<ReviewRecord> {
    Ok(ReviewRecord {
        id: get(row, "id")?,
        grant_id: get(row, "grant_id")?,
        principal: get(row, "principal")?,
        reason: get(row, "reason")?,
        opened_at: get(row, "opened_at")?,
        closed_at: get(row, "closed_at")?,
        closed_by: get(row, "closed_by")?,
        note: get(row, "note")?,
    })
}

/// Inside a transaction: stores a grant.
pub(super) async fn insert_grant_in(tx: &mut Tx<'_>, g: &GrantRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO role_grants (id, principal, role, kind, reason, request_id, created_at, \
         expires_at, state_seq, mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(g.id.clone())
    .bind(g.principal.clone())
    .bind(g.role.clone())
    .bind(g.kind.clone())
    .bind(g.reason.clone())
    .bind(g.request_id.clone())
    .bind(g.created_at)
    .bind(g.expires_at)
    .bind(g.state_seq)
    .bind(g.mac.clone())
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

/// Inside a transaction: stores `p` as the next version (`p.seq` must be the newest
/// plus one: `Conflict::PolicySeq` otherwise, so a version's MAC, which covers its seq,
/// is never computed for a number another writer took).
pub(super) async fn insert_policy_in(tx: &mut Tx<'_>, p: &PolicyVersion) -> Result<()> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS n FROM access_policies")
        .fetch_one(&mut **tx)
        .await
        .map_err(classify)?;
    let newest = row
        .try_get::<i64, _>("n")
        .map_err(|_| StoreError::Corrupt("policy seq"))?;
    if p.seq != newest + 1 {
        return Err(StoreError::Conflict(Conflict::PolicySeq));
    }
    sqlx::query(
        "INSERT INTO access_policies (seq, text, request_id, created_at, mac) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(p.seq)
    .bind(p.text.clone())
    .bind(p.request_id.clone())
    .bind(p.created_at)
    .bind(p.mac.clone())
    .execute(&mut **tx)
    .await
    .map_err(classify)?;
    Ok(())
}

#[async_trait::async_trait]
impl AccessStore for SqlStore {
    async fn latest_policy(&self) -> Result<Option<PolicyVersion>> {
        let row = sqlx::query(
            "SELECT seq, text, request_id, created_at, mac FROM access_policies \
             ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(PolicyVersion {
                seq: get(&r, "seq")?,
                text: get(&r, "text")?,
                request_id: get(&r, "request_id")?,
                created_at: get(&r, "created_at")?,
                mac: get(&r, "mac")?,
            })
        })
        .transpose()
    }

    async fn insert_policy(&self, policy: &PolicyVersion) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_policy_in(&mut tx, policy).await?;
        tx.commit().await.map_err(classify)
    }

    async fn stamp_grant(&self, id: &str, was: Option<&str>, mac: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE role_grants SET mac = $1 WHERE id = $2 AND COALESCE(mac, '') = $3")
                .bind(mac.to_string())
                .bind(id.to_string())
                .bind(was.unwrap_or("").to_string())
                .execute(&self.writer)
                .await
                .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn stamp_policy(&self, seq: i64, was: Option<&str>, mac: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE access_policies SET mac = $1 WHERE seq = $2 AND COALESCE(mac, '') = $3",
        )
        .bind(mac.to_string())
        .bind(seq)
        .bind(was.unwrap_or("").to_string())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_grant(&self, grant: &GrantRecord) -> Result<()> {
        let mut tx = self.begin_write().await?;
        insert_grant_in(&mut tx, grant).await?;
        tx.commit().await.map_err(classify)
    }

    async fn break_glass(&self, grant: &GrantRecord, review_id: &str) -> Result<ReviewRecord> {
        let mut tx = self.begin_write().await?;
        insert_grant_in(&mut tx, grant).await?;
        sqlx::query(
            "INSERT INTO access_reviews (id, grant_id, principal, reason, opened_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(review_id.to_string())
        .bind(grant.id.clone())
        .bind(grant.principal.clone())
        .bind(grant.reason.clone())
        .bind(grant.created_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(ReviewRecord {
            id: review_id.to_string(),
            grant_id: grant.id.clone(),
            principal: grant.principal.clone(),
            reason: grant.reason.clone(),
            opened_at: grant.created_at,
            closed_at: None,
            closed_by: None,
            note: None,
        })
    }

    async fn active_grants(&self, now: i64) -> Result<Vec<GrantRecord>> {
        let sql = format!(
            "SELECT {GRANT_COLUMNS} FROM role_grants WHERE expires_at > $1 ORDER BY created_at"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(grant_from_row).collect()
    }

    async fn list_reviews(&self, open_only: bool) -> Result<Vec<ReviewRecord>> {
        let filter = if open_only {
            "WHERE closed_at IS NULL "
        } else {
            ""
        };
        let sql = format!(
            "SELECT {REVIEW_COLUMNS} FROM access_reviews {filter}ORDER BY opened_at DESC, id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.reader)
            .await
            .map_err(classify)?;
        rows.iter().map(review_from_row).collect()
    }

    async fn close_review(&self, id: &str, by: &str, note: &str, now: i64) -> Result<ReviewRecord> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE access_reviews SET closed_at = $2, closed_by = $3, note = $4 \
             WHERE id = $1 AND closed_at IS NULL",
        )
        .bind(id.to_string())
        .bind(now)
        .bind(by.to_string())
        .bind(note.to_string())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let sql = format!("SELECT {REVIEW_COLUMNS} FROM access_reviews WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .ok_or(StoreError::NotFound)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(Conflict::ReviewClosed));
        }
        let rec = review_from_row(&row)?;
        tx.commit().await.map_err(classify)?;
        Ok(rec)
    }

    async fn totp_enrolment(&self, principal: &str) -> Result<Option<TotpEnrolment>> {
        let row = sqlx::query(
            "SELECT principal, totp_sealed, last_step, locked_until FROM principal_totp \
             WHERE principal = $1",
        )
        .bind(principal.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(TotpEnrolment {
                principal: get(&r, "principal")?,
                sealed: hex::decode(get::<String>(&r, "totp_sealed")?)
                    .map_err(|_| StoreError::Corrupt("totp"))?,
                last_step: get(&r, "last_step")?,
                locked_until: get(&r, "locked_until")?,
            })
        })
        .transpose()
    }

    async fn enroll_totp(
        &self,
        principal: &str,
        sealed: &[u8],
        now: i64,
        roster: Option<(&Roster, i64)>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        if let Some((r, was_seq)) = roster {
            if !replace_roster_in(&mut *tx, r, was_seq).await? {
                return Err(StoreError::Conflict(Conflict::ChangedConcurrently));
            }
        }
        sqlx::query("DELETE FROM principal_totp WHERE principal = $1")
            .bind(principal.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        sqlx::query(
            "INSERT INTO principal_totp (principal, totp_sealed, enrolled_at) VALUES ($1, $2, $3)",
        )
        .bind(principal.to_string())
        .bind(hex::encode(sealed))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn roster(&self, name: &str) -> Result<Option<Roster>> {
        let row =
            sqlx::query("SELECT name, members, state_seq, mac FROM state_rosters WHERE name = $1")
                .bind(name.to_string())
                .fetch_optional(&self.reader)
                .await
                .map_err(classify)?;
        row.map(|r| {
            Ok(Roster {
                name: get(&r, "name")?,
                members: decode_members(&get::<String>(&r, "members")?)?,
                state_seq: get(&r, "state_seq")?,
                mac: get(&r, "mac")?,
            })
        })
        .transpose()
    }

    async fn replace_roster(&self, r: &Roster, was_seq: i64) -> Result<bool> {
        replace_roster_in(&self.writer, r, was_seq).await
    }

    async fn enrolled_principals(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT principal FROM principal_totp ORDER BY principal")
            .fetch_all(&self.reader)
            .await
            .map_err(classify)
    }

    async fn stamp_roster(
        &self,
        name: &str,
        seq: i64,
        was: Option<&str>,
        mac: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE state_rosters SET mac = $1 \
             WHERE name = $2 AND state_seq = $3 AND COALESCE(mac, '') = $4",
        )
        .bind(mac.to_string())
        .bind(name.to_string())
        .bind(seq)
        .bind(was.unwrap_or("").to_string())
        .execute(&self.writer)
        .await
        .map_err(classify)?;
        Ok(done.rows_affected() == 1)
    }

    async fn reserve_mfa_attempt(&self, a: &MfaAttempt<'_>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let slot = Slot {
            holder: Holder::Principal(a.principal),
            id: a.id,
            at: a.at,
            since: a.since,
            limit: a.limit,
        };
        reserve_in(&mut tx, &slot).await?;
        tx.commit().await.map_err(classify)
    }

    async fn use_principal_totp_step(
        &self,
        principal: &str,
        step: i64,
        attempt: &str,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE principal_totp SET last_step = $1 \
             WHERE principal = $2 AND (last_step IS NULL OR last_step < $1)",
        )
        .bind(step)
        .bind(principal.to_string())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(Conflict::StepUsed));
        }
        sqlx::query("DELETE FROM principal_failures WHERE attempt = $1 AND reason = 'pending'")
            .bind(attempt.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn record_mfa_failure(&self, f: &MfaFailure<'_>) -> Result<u32> {
        let mut tx = self.begin_write().await?;
        // The same row lock as the reservation's.
        sqlx::query("UPDATE principal_totp SET locked_until = locked_until WHERE principal = $1")
            .bind(f.principal.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let settled = sqlx::query(
            "UPDATE principal_failures SET reason = $1 WHERE attempt = $2 AND reason = 'pending'",
        )
        .bind(f.reason.to_string())
        .bind(f.attempt.to_string())
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if settled.rows_affected() != 1 {
            // The slot is gone (never reserved, or settled already): the failure still
            // counts, as its own row.
            sqlx::query(
                "INSERT INTO principal_failures (principal, at, reason) VALUES ($1, $2, $3)",
            )
            .bind(f.principal.to_string())
            .bind(f.at)
            .bind(f.reason.to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM principal_failures \
             WHERE principal = $1 AND at > $2 AND reason <> 'pending'",
        )
        .bind(f.principal.to_string())
        .bind(f.since)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let n: i64 = row.try_get("n").map_err(|_| StoreError::Corrupt("count"))?;
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if n >= f.limit {
            sqlx::query("UPDATE principal_totp SET locked_until = $1 WHERE principal = $2")
                .bind(f.lock_until)
                .bind(f.principal.to_string())
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(n)
    }
}
