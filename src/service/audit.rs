//! The service side of the audit trail: the HSM operations the writer needs (over the
//! engine, which exists only while unsealed), and the auditor's use cases (`QueryAudit`,
//! `VerifyAudit`).
//!
//! Invariant: who may read the audit trail is decided by the access policy alone, before
//! any record is read; records are decrypted only for such a caller.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::{Arc, Weak};

use zeroize::Zeroizing;

use super::access::{act, Guard, Scope};
use super::context::Context;
use super::error::{Result, ServiceError};
use super::Caller;
use crate::audit::verify::{Filter, Report};
use crate::audit::{AuditError, AuditKeys, AuditLog, Record};

/// [`AuditKeys`] over the context's engine.
pub struct EngineKeys(Weak<Context>);

impl EngineKeys {
    /// For `ctx`.
    pub fn for_context(ctx: &Arc<Context>) -> Arc<dyn AuditKeys> {
        Arc::new(EngineKeys(Arc::downgrade(ctx)))
    }

    fn engine(&self) -> std::result::Result<Arc<crate::keys::KeyEngine>, AuditError> {
        self.0
            .upgrade()
            .and_then(|c| c.engine().ok())
            .ok_or(AuditError::Hsm)
    }
}

fn hsm(e: crate::keys::KeysError) -> AuditError {
    tracing::warn!(error = %e, "HSM call of the audit log failed");
    AuditError::Hsm
}

#[async_trait::async_trait]
impl AuditKeys for EngineKeys {
    fn is_open(&self) -> bool {
        self.engine().is_ok()
    }

    async fn ensure(&self) -> std::result::Result<(), AuditError> {
        if self.engine()?.ensure_audit_mac_key().await.map_err(hsm)? {
            tracing::info!(
                label = crate::keys::AUDIT_MAC_KEY_LABEL,
                "made the HSM system key"
            );
        }
        Ok(())
    }

    async fn mac(&self, data: Vec<u8>) -> std::result::Result<Zeroizing<[u8; 32]>, AuditError> {
        self.engine()?.audit_mac(data).await.map_err(hsm)
    }

    async fn random32(&self) -> std::result::Result<Zeroizing<[u8; 32]>, AuditError> {
        Ok(Zeroizing::new(
            self.engine()?.random::<32>().await.map_err(hsm)?,
        ))
    }

    async fn seal_meta(
        &self,
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> std::result::Result<Vec<u8>, AuditError> {
        self.engine()?.seal_meta(aad, plaintext).await.map_err(hsm)
    }

    async fn open_meta(
        &self,
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> std::result::Result<Zeroizing<Vec<u8>>, AuditError> {
        self.engine()?
            .open_meta(aad, sealed)
            .await
            .map_err(|_| AuditError::Corrupt("audit data key does not open"))
    }
}

/// The auditor's use cases.
pub struct AuditQueries {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
}

impl AuditQueries {
    /// Over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>) -> Self {
        AuditQueries { ctx, guard }
    }

    fn log(&self) -> Result<&Arc<AuditLog>> {
        self.ctx.audit().ok_or(ServiceError::FailedPrecondition(
            "this server runs without an audit log",
        ))
    }

    /// `QueryAudit`: decrypted records matching `filter` from seq `from`, at most `limit`,
    /// and where to continue.
    pub async fn query(
        &self,
        caller: &Caller,
        filter: &Filter,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, Option<u64>)> {
        self.guard
            .authorize::<act::QueryAudit>(caller, Scope::none())
            .await?;
        self.ctx.engine()?;
        let log = self.log()?;
        Ok(crate::audit::verify::query(
            log.store().as_ref(),
            log.keys().as_ref(),
            filter,
            from,
            limit.clamp(1, 1000),
        )
        .await?)
    }

    /// `VerifyAudit`: verifies the trail from seq `from`; a failure also raises an alert.
    pub async fn verify(&self, caller: &Caller, from: u64) -> Result<Report> {
        self.guard
            .authorize::<act::VerifyAudit>(caller, Scope::none())
            .await?;
        let log = self.log()?;
        let report = crate::audit::verify::verify(
            log.store().as_ref(),
            log.keys().as_ref(),
            log.config().checkpoints.as_deref(),
            from,
        )
        .await?;
        if !report.ok {
            tracing::error!(
                first_bad_seq = report.first_bad_seq,
                problem = report.problem.map(|p| p.as_str()),
                detail = %report.detail,
                "audit verification failed"
            );
            log.job(
                "audit.verify_failed",
                crate::audit::record::codes::DATA_LOSS,
                None,
                &format!(
                    "first_bad_seq={} problem={}",
                    report.first_bad_seq.unwrap_or(0),
                    report.problem.map(|p| p.as_str()).unwrap_or("")
                ),
            );
        }
        Ok(report)
    }
}
