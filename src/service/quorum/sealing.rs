//! Sealing and unsealing (DESIGN §2).
//!
//! The service starts sealed: no HSM session exists and every key operation answers
//! `UNAVAILABLE "sealed"` (reason `SEALED`). K distinct custodians each submit their share with a TOTP
//! code; each share is checked against its custodian's commitment on arrival. At K the
//! quorum secret is rebuilt, checked against the verifier, used to open the sealed HSM
//! PIN, and zeroized; the PIN opens the HSM and is then held only by the HSM layer. After
//! every unseal, approved requests a crash left unrun are run ([`Approvals::recover`]).
//!
//! Invariants:
//! - Partial unseal progress lives in memory only, and expires [`UNSEAL_PROGRESS_TTL_MS`]
//!   after its first share; one share per custodian per unseal.
//! - `Seal` drops the engine at once (closing every HSM session) and any progress.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::approvals::Approvals;
use super::custodians::{custodian_name, Custodians};
use crate::authz::stamp::{
    enabled_row, grant_row, policy_row, retention_row, roster_row, scheduled_row, token_row,
    QUORUM_MAC_PREFIX, TOTP_ROSTER,
};
use crate::keys::state::Unverified;
use crate::keys::HsmAccess;
use crate::keys::VersionState;
use crate::quorum::{crypto, shamir};
use crate::secret::Share;
use crate::service::access::{act, Guard, Scope};
use crate::service::context::{Context, Permit};
use crate::service::error::{Conflict, Rejection, Result, ServiceError};
use crate::service::Caller;
use crate::store::{QuorumConfig, Roster, TokenRecord};

/// Partial unseal progress expires this long after its first share.
pub const UNSEAL_PROGRESS_TTL_MS: i64 = 10 * 60 * 1000;

/// The seal state as reported to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealStatus {
    /// Whether the quorum was initialised.
    pub initialized: bool,
    /// Whether the service is sealed.
    pub sealed: bool,
    /// K.
    pub threshold: u32,
    /// N.
    pub shares: u32,
    /// Custodians whose shares are held for the unseal in progress.
    pub progress: Vec<String>,
}

struct Progress {
    started_at: i64,
    shares: Vec<(String, Share)>,
}

/// The seal service.
pub struct Sealing {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    custodians: Arc<Custodians>,
    approvals: Arc<Approvals>,
    hsm: HsmAccess,
    progress: tokio::sync::Mutex<Option<Progress>>,
}

impl Sealing {
    /// The seal service over `ctx`; `hsm` opens the HSM at unseal.
    pub fn new(
        ctx: Arc<Context>,
        guard: Arc<Guard>,
        custodians: Arc<Custodians>,
        approvals: Arc<Approvals>,
        hsm: HsmAccess,
    ) -> Self {
        Sealing {
            ctx,
            guard,
            custodians,
            approvals,
            hsm,
            progress: tokio::sync::Mutex::new(None),
        }
    }

    /// `SealStatus`: seal state and unseal progress, for callers the policy allows it
    /// (also whoever may unseal, seal or init); no MFA step, as it is read while sealed.
    pub async fn status(&self, caller: &Caller) -> Result<SealStatus> {
        let proof = self
            .guard
            .authorize_without_mfa::<act::SealStatus>(caller)
            .await?;
        self.status_with(&proof).await
    }

    async fn status_with(&self, permit: &impl Permit) -> Result<SealStatus> {
        let cfg = self.ctx.db(permit).quorum_config().await?;
        let now = self.ctx.clock.now_ms();
        let mut progress = self.progress.lock().await;
        if progress
            .as_ref()
            .is_some_and(|p| now - p.started_at > UNSEAL_PROGRESS_TTL_MS)
        {
            *progress = None;
        }
        Ok(SealStatus {
            initialized: cfg.is_some(),
            sealed: !self.ctx.engine.is_open(),
            threshold: cfg.as_ref().map_or(0, |c| u32::from(c.threshold)),
            shares: cfg.as_ref().map_or(0, |c| u32::from(c.shares)),
            progress: progress
                .as_ref()
                .map(|p| p.shares.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default(),
        })
    }

    /// The stored quorum configuration, if initialised (start-up wiring).
    pub async fn quorum_config(&self, permit: &impl Permit) -> Result<Option<QuorumConfig>> {
        Ok(self.ctx.db(permit).quorum_config().await?)
    }

    /// `Unseal`: a custodian submits a share with a TOTP code. At the K-th distinct share
    /// the service unseals.
    pub async fn unseal(
        &self,
        caller: &Caller,
        share_text: &str,
        totp_code: &str,
    ) -> Result<SealStatus> {
        let proof = self
            .guard
            .authorize::<act::Unseal>(caller, Scope::none())
            .await?;
        let name = custodian_name(caller)
            .ok_or(ServiceError::PermissionDenied)?
            .to_string();
        let cfg = self.custodians.config(&proof).await?;
        if self.ctx.engine.is_open() {
            return Err(ServiceError::Conflict(Conflict::AlreadyUnsealed));
        }
        let share = self
            .custodians
            .check(&proof, &name, &cfg, share_text, totp_code)
            .await?;
        let now = self.ctx.clock.now_ms();
        let mut progress = self.progress.lock().await;
        if progress
            .as_ref()
            .is_some_and(|p| now - p.started_at > UNSEAL_PROGRESS_TTL_MS)
        {
            tracing::info!("unseal progress expired; starting over");
            *progress = None;
        }
        let p = progress.get_or_insert_with(|| Progress {
            started_at: now,
            shares: Vec::new(),
        });
        if p.shares.iter().any(|(n, _)| *n == name) {
            return Err(ServiceError::Rejected(Rejection::DuplicateShare));
        }
        p.shares.push((name.clone(), share));
        tracing::info!(custodian = %name, have = p.shares.len(), need = cfg.threshold, "unseal share accepted");
        if p.shares.len() >= usize::from(cfg.threshold) {
            let taken = progress.take().map(|p| p.shares).unwrap_or_default();
            drop(progress);
            let shares: Vec<Share> = taken.into_iter().map(|(_, s)| s).collect();
            self.unseal_with_shares(&cfg, &shares).await?;
        } else {
            drop(progress);
        }
        self.status_with(&proof).await
    }

    /// Rebuilds S from `shares`, checks it, opens the PIN and the HSM. Used by `Unseal`
    /// and by dev mode's auto-unseal.
    pub async fn unseal_with_shares(&self, cfg: &QuorumConfig, shares: &[Share]) -> Result<()> {
        let refs: Vec<&Share> = shares.iter().collect();
        let secret = shamir::combine(&refs, cfg.threshold)?;
        crypto::check_verifier(&secret, &cfg.verifier)?;
        let pin = crypto::open_pin(&secret, &cfg.sealed_pin)?;
        // Rows the init ceremony wrote while the HSM was locked carry the quorum's MAC:
        // checked now, while the rebuilt secret is here, and stamped by the HSM below.
        let system = self.ctx.system();
        let quorum_stamped: Vec<(TokenRecord, bool)> = self
            .ctx
            .db(&system)
            .list_tokens()
            .await?
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .filter_map(|t| {
                let mac = t.mac.as_deref()?.strip_prefix(QUORUM_MAC_PREFIX)?;
                let ok = crypto::check_state_mac(&secret, &token_row(&t).into_bytes(), mac);
                Some((t, ok))
            })
            .collect();
        let roster = self
            .ctx
            .db(&system)
            .roster(TOTP_ROSTER)
            .await?
            .and_then(|r| {
                let mac = r.mac.as_deref()?.strip_prefix(QUORUM_MAC_PREFIX)?;
                let ok = crypto::check_state_mac(&secret, &roster_row(&r).into_bytes(), mac);
                Some((r, ok))
            });
        drop(secret);
        self.open_with_pin(pin).await?;
        if let Some((r, ok)) = roster {
            if ok {
                if let Err(e) = self.stamp_roster(&r).await {
                    tracing::warn!(error = %e, "cannot stamp the roster the quorum vouched for");
                }
            } else {
                self.ctx
                    .refuse_state("state_rosters", &r.name, Unverified::Forged, true);
            }
        }
        for (t, ok) in quorum_stamped {
            if !ok {
                self.ctx
                    .refuse_state("tokens", &t.id, Unverified::Forged, true);
                continue;
            }
            if let Err(e) = self.stamp_token(&t).await {
                tracing::warn!(token_id = %t.id, error = %e, "cannot stamp a token the quorum vouched for");
            }
        }
        tracing::info!("unsealed");
        Ok(())
    }

    /// Replaces the MAC of `t` (as read) with the HSM's.
    async fn stamp_token(&self, t: &TokenRecord) -> Result<()> {
        let mac = self.ctx.stamp(token_row(t)).await?;
        let system = self.ctx.system();
        self.ctx
            .db(&system)
            .stamp_token(&t.id, t.state_seq, t.mac.as_deref(), &mac)
            .await?;
        Ok(())
    }

    /// Replaces the MAC of roster `r` (as read) with the HSM's.
    async fn stamp_roster(&self, r: &Roster) -> Result<bool> {
        let mac = self.ctx.stamp(roster_row(r)).await?;
        let system = self.ctx.system();
        Ok(self
            .ctx
            .db(&system)
            .stamp_roster(&r.name, r.state_seq, r.mac.as_deref(), &mac)
            .await?)
    }

    /// Opens the HSM with `pin` and starts the engine (unsealed); then runs what a crash
    /// left approved but unrun.
    pub async fn open_with_pin(&self, pin: Zeroizing<Vec<u8>>) -> Result<()> {
        let engine = self.hsm.open(pin).await?;
        self.ctx.engine.put(Arc::new(engine));
        if self.ctx.cfg.restamp_unstamped {
            if let Err(e) = self.restamp_unstamped().await {
                tracing::warn!(error = %e, "re-stamping unstamped rows failed");
            }
        }
        self.approvals.recover().await;
        Ok(())
    }

    /// The upgrade step (`--restamp-unstamped`, and dev mode at every unseal): every
    /// live token, unexpired grant, ENABLED key version, the TOTP roster and the newest
    /// policy without a state MAC gets one.
    /// It trusts those rows as they are now, so it runs only at an unseal (K custodians)
    /// and is recorded with the rows it stamped.
    async fn restamp_unstamped(&self) -> Result<()> {
        let system = self.ctx.system();
        let db = self.ctx.db(&system);
        let mut stamped = Vec::new();
        for t in db.list_tokens().await? {
            if t.revoked_at.is_none() && t.mac.is_none() {
                self.stamp_token(&t).await?;
                stamped.push(format!("tokens/{}", t.id));
            }
        }
        for g in db.active_grants(self.ctx.clock.now_ms()).await? {
            if g.mac.is_none() {
                let mac = self.ctx.stamp(grant_row(&g)).await?;
                if db.stamp_grant(&g.id, None, &mac).await? {
                    stamped.push(format!("role_grants/{}", g.id));
                }
            }
        }
        let mut after: Option<String> = None;
        loop {
            let page = db.list_keys(after.as_deref(), 500).await?;
            for k in &page {
                if let (Some(t), None) = (k.retain_until, &k.retention_mac) {
                    let mac = self.ctx.stamp(retention_row(&k.id, t)).await?;
                    if db.stamp_retention(&k.id, t, &mac).await? {
                        stamped.push(format!("keys/{}/retain_until", k.id));
                    }
                }
                for v in &k.versions {
                    let row = match v.state {
                        _ if v.mac.is_some() => continue,
                        VersionState::Enabled => {
                            enabled_row(&k.id, v.version, &v.hsm_id, v.state_seq)
                        }
                        VersionState::ScheduledForDestruction => {
                            let at = v.destroy_at.unwrap_or(0);
                            scheduled_row(&k.id, v.version, &v.hsm_id, at, v.state_seq)
                        }
                        _ => continue,
                    };
                    {
                        let mac = self.ctx.stamp(row).await?;
                        if db
                            .stamp_version(&k.id, v.version, v.state, v.state_seq, None, &mac)
                            .await?
                        {
                            stamped.push(format!("key_versions/{}/{}", k.id, v.version));
                        }
                    }
                }
            }
            match page.last() {
                Some(k) if page.len() == 500 => after = Some(k.name.to_string()),
                _ => break,
            }
        }
        if let Some(r) = db.roster(TOTP_ROSTER).await? {
            if r.mac.is_none() && self.stamp_roster(&r).await? {
                stamped.push(format!("state_rosters/{}", r.name));
            }
        }
        if let Some(p) = db.latest_policy().await? {
            if p.mac.is_none() {
                let mac = self.ctx.stamp(policy_row(&p)).await?;
                if db.stamp_policy(p.seq, None, &mac).await? {
                    stamped.push(format!("access_policies/{}", p.seq));
                }
            }
        }
        if !stamped.is_empty() {
            tracing::warn!(
                rows = stamped.len(),
                "rows without a state MAC stamped (upgrade step)"
            );
            self.ctx
                .record_job("state.restamped", true, None, &stamped.join(" "));
        }
        Ok(())
    }

    /// `Seal`: seals at once, dropping the engine (closing every HSM session and logging
    /// out) and any unseal progress.
    pub async fn seal(&self, caller: &Caller) -> Result<SealStatus> {
        let proof = self
            .guard
            .authorize::<act::Seal>(caller, Scope::none())
            .await?;
        let engine = self.ctx.engine.take();
        *self.progress.lock().await = None;
        if let Some(engine) = engine {
            // Joining the HSM workers blocks; do it off the async threads. Requests that
            // still hold the engine finish first.
            let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
            tracing::warn!("sealed");
        }
        self.status_with(&proof).await
    }
}
