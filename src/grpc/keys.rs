//! `arca.v1.KeyService`: proto ↔ domain conversion around [`KeyService`]. No logic here
//! beyond conversion: every decision is the service's.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::audit::Note;
use super::pb;
use super::status::{caller, to_status};
use crate::clock::rfc3339;
use crate::keys::{EncryptionContext, VersionState};
use crate::secret::Plaintext;
use crate::service::{AdminOutcome, KeyOptions, KeyRecord, KeyService, ServiceError};

/// The gRPC face of the key service.
pub struct KeyApi {
    svc: Arc<KeyService>,
}

impl KeyApi {
    /// Wraps the service.
    pub fn new(svc: Arc<KeyService>) -> Self {
        KeyApi { svc }
    }
}

fn context(map: std::collections::HashMap<String, String>) -> EncryptionContext {
    map.into_iter().collect()
}

fn state_to_pb(s: VersionState) -> pb::KeyVersionState {
    match s {
        VersionState::Enabled => pb::KeyVersionState::Enabled,
        VersionState::Disabled => pb::KeyVersionState::Disabled,
        VersionState::ScheduledForDestruction => pb::KeyVersionState::ScheduledForDestruction,
        VersionState::Destroyed => pb::KeyVersionState::Destroyed,
    }
}

pub(super) fn key_to_pb(k: &KeyRecord) -> pb::Key {
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

fn admin_to_pb(o: AdminOutcome) -> pb::AdminResponse {
    match o {
        AdminOutcome::Done(k) => pb::AdminResponse {
            key: Some(key_to_pb(&k)),
            approval_request: None,
        },
        AdminOutcome::Pending(r) => pb::AdminResponse {
            key: None,
            approval_request: Some(super::quorum::request_to_pb(&r)),
        },
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyApi {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let c = caller(&req)?;
        let note = Note::of(&req);
        let r = req.into_inner();
        note.key(&r.name, None);
        let opts = KeyOptions {
            rotation_period_ms: match r.rotation_period_seconds {
                0 => None,
                s => Some(seconds_to_ms(s).map_err(|e| to_status(e, &c.request_id))?),
            },
            retain_until: time_of(&r.retain_until).map_err(|e| to_status(e, &c.request_id))?,
        };
        let k = self
            .svc
            .create_key(&c, &r.name, &r.description, opts)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(key_to_pb(&k)))
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let c = caller(&req)?;
        Note::of(&req).key(&req.get_ref().name, None);
        let k = self
            .svc
            .get_key(&c, &req.get_ref().name)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(key_to_pb(&k)))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let (keys, next) = self
            .svc
            .list_keys(&c, r.page_size, &r.page_token)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(key_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let c = caller(&req)?;
        let note = Note::of(&req);
        let r = req.into_inner();
        note.key(&r.key_name, None);
        note.context(&r.context);
        let dk = self
            .svc
            .generate_data_key(&c, &r.key_name, &context(r.context), r.without_plaintext)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        note.key("", Some(dk.key_version));
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext: dk
                .plaintext
                .map(|p| p.expose().to_vec())
                .unwrap_or_default(),
            wrapped_key: dk.wrapped,
            key_name: dk.key_name.to_string(),
            key_version: dk.key_version,
        }))
    }

    async fn wrap_key(
        &self,
        req: Request<pb::WrapKeyRequest>,
    ) -> Result<Response<pb::WrapKeyResponse>, Status> {
        let c = caller(&req)?;
        let note = Note::of(&req);
        let mut r = req.into_inner();
        note.key(&r.key_name, None);
        note.context(&r.context);
        let plaintext = Plaintext::new(Zeroizing::new(std::mem::take(&mut r.plaintext)));
        let w = self
            .svc
            .wrap_key(
                &c,
                &r.key_name,
                plaintext,
                &context(std::mem::take(&mut r.context)),
            )
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        note.key("", Some(w.key_version));
        Ok(Response::new(pb::WrapKeyResponse {
            wrapped_key: w.wrapped,
            key_name: w.key_name.to_string(),
            key_version: w.key_version,
        }))
    }

    async fn unwrap_key(
        &self,
        req: Request<pb::UnwrapKeyRequest>,
    ) -> Result<Response<pb::UnwrapKeyResponse>, Status> {
        let c = caller(&req)?;
        let note = Note::of(&req);
        let r = req.into_inner();
        note.context(&r.context);
        let u = self
            .svc
            .unwrap_key(&c, &r.wrapped_key, &context(r.context))
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        note.key(u.key_name.as_str(), Some(u.key_version));
        Ok(Response::new(pb::UnwrapKeyResponse {
            plaintext: u.plaintext.expose().to_vec(),
            key_name: u.key_name.to_string(),
            key_version: u.key_version,
        }))
    }

    async fn rewrap_key(
        &self,
        req: Request<pb::RewrapKeyRequest>,
    ) -> Result<Response<pb::RewrapKeyResponse>, Status> {
        let c = caller(&req)?;
        let note = Note::of(&req);
        let r = req.into_inner();
        note.context(&r.context);
        let w = self
            .svc
            .rewrap_key(&c, &r.wrapped_key, &context(r.context))
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        note.key(w.key_name.as_str(), Some(w.key_version));
        Ok(Response::new(pb::RewrapKeyResponse {
            wrapped_key: w.wrapped,
            key_name: w.key_name.to_string(),
            key_version: w.key_version,
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        Note::of(&req).key(&req.get_ref().name, None);
        let o = self
            .svc
            .rotate_key(&c, &req.get_ref().name)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn disable_key_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, Some(r.version));
        let o = self
            .svc
            .disable_version(&c, &r.name, r.version)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn enable_key_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, Some(r.version));
        let o = self
            .svc
            .enable_version(&c, &r.name, r.version)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn retire_key_version(
        &self,
        req: Request<pb::RetireKeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, Some(r.version));
        let o = async {
            let waiting = seconds_to_ms(r.waiting_period_seconds)?;
            self.svc.retire(&c, &r.name, Some(r.version), waiting).await
        }
        .await
        .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn retire_key(
        &self,
        req: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, None);
        let o = async {
            let waiting = seconds_to_ms(r.waiting_period_seconds)?;
            self.svc.retire(&c, &r.name, None, waiting).await
        }
        .await
        .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn cancel_retirement(
        &self,
        req: Request<pb::CancelRetirementRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, (r.version != 0).then_some(r.version));
        let version = (r.version != 0).then_some(r.version);
        let o = self
            .svc
            .cancel_retirement(&c, &r.name, version)
            .await
            .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        Note::of(&req).key(&r.name, None);
        let o = async {
            let until = time_of(&r.retain_until)?;
            self.svc.set_retention(&c, &r.name, until).await
        }
        .await
        .map_err(|e| to_status(e, &c.request_id))?;
        Ok(Response::new(admin_to_pb(o)))
    }
}

/// Seconds on the wire → ms, refusing what does not fit.
fn seconds_to_ms(s: u64) -> Result<i64, ServiceError> {
    i64::try_from(s)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or(ServiceError::InvalidArgument("duration out of range"))
}

/// An RFC 3339 time or date on the wire ("" = none) → Unix ms.
fn time_of(s: &str) -> Result<Option<i64>, ServiceError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    crate::clock::parse_rfc3339(s)
        .map(Some)
        .ok_or(ServiceError::InvalidArgument(
            "time must be RFC 3339 UTC (2027-01-31T00:00:00Z) or a date (2027-01-31)",
        ))
}
