//! The service side of the audit trail: the HSM operations the writer needs (over the
//! engine, which exists only while unsealed), and the auditor's use cases (query, verify).
//!
//! Invariant: who may read the audit trail is decided by the access policy alone
//! (`QueryAudit`, `VerifyAudit`), before any record is read; records are decrypted only
//! for such a caller.

use std::sync::{Arc, Weak};

use zeroize::Zeroizing;

use super::{Caller, KeyService, Result, ServiceError};
use crate::audit::verify::{Filter, Report};
use crate::audit::{AuditError, AuditKeys, AuditLog, Record};
use crate::authz::policy::Action;

impl From<AuditError> for ServiceError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Unavailable => ServiceError::AuditUnavailable,
            AuditError::Hsm => ServiceError::Unavailable("HSM unavailable"),
            AuditError::Store(s) => s.into(),
            e => ServiceError::Internal(Box::new(e)),
        }
    }
}

/// [`AuditKeys`] over the service's engine.
pub struct EngineKeys(Weak<KeyService>);

impl EngineKeys {
    /// For `svc`.
    pub fn for_service(svc: &Arc<KeyService>) -> Arc<dyn AuditKeys> {
        Arc::new(EngineKeys(Arc::downgrade(svc)))
    }

    fn engine(&self) -> std::result::Result<Arc<crate::keys::KeyEngine>, AuditError> {
        self.0
            .upgrade()
            .and_then(|s| s.engine().ok())
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

impl KeyService {
    /// Attaches the audit log (once, at start-up).
    pub fn set_audit(&self, log: Arc<AuditLog>) {
        if self.audit.set(log).is_err() {
            tracing::warn!("the audit log was attached twice; keeping the first");
        }
    }

    /// The audit log, unless the server runs without one (benchmarks only).
    pub fn audit(&self) -> Option<&Arc<AuditLog>> {
        self.audit.get()
    }

    /// Records a background action (no caller waits for it).
    pub fn audit_job(
        &self,
        operation: &str,
        ok: bool,
        key: Option<(&str, Option<u32>)>,
        detail: &str,
    ) {
        if let Some(log) = self.audit() {
            let code = if ok { 0 } else { 13 };
            log.job(operation, code, key, detail);
        }
    }

    fn audit_log(&self) -> Result<&Arc<AuditLog>> {
        self.audit().ok_or(ServiceError::FailedPrecondition(
            "this server runs without an audit log",
        ))
    }

    /// Decrypted records matching `filter` from seq `from`, at most `limit`, and where
    /// to continue.
    pub async fn query_audit(
        &self,
        caller: &Caller,
        filter: &Filter,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, Option<u64>)> {
        self.authorize(caller, Action::QueryAudit, None, None)
            .await?;
        self.engine()?;
        let log = self.audit_log()?;
        Ok(crate::audit::verify::query(
            log.store().as_ref(),
            log.keys().as_ref(),
            filter,
            from,
            limit.clamp(1, 1000),
        )
        .await?)
    }

    /// Verifies the trail from seq `from`; a failure also raises an alert.
    pub async fn verify_audit(&self, caller: &Caller, from: u64) -> Result<Report> {
        self.authorize(caller, Action::VerifyAudit, None, None)
            .await?;
        let log = self.audit_log()?;
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
