//! `arca.v1.KeyService` over the key services ([`Keys`], [`Rotation`], [`Lifecycle`]):
//! each method converts its request, calls one use case and converts the answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::call::{accept, reply};
use super::convert::{admin_to_pb, context, key_to_pb, seconds_to_ms, time_of};
use super::pb;
use crate::secret::Plaintext;
use crate::service::{KeyOptions, Keys, Lifecycle, Outcome, Rotation, ServiceError};

/// The gRPC face of the key services.
pub struct KeyApi {
    keys: Arc<Keys>,
    rotation: Arc<Rotation>,
    lifecycle: Arc<Lifecycle>,
}

impl KeyApi {
    /// Over the key services.
    pub fn new(keys: Arc<Keys>, rotation: Arc<Rotation>, lifecycle: Arc<Lifecycle>) -> Self {
        KeyApi {
            keys,
            rotation,
            lifecycle,
        }
    }
}

/// A conversion failure before the use case ran, with the facts the request names.
fn refused<T>(e: ServiceError, name: &str, version: Option<u32>) -> Outcome<T> {
    Outcome::new(Err(e), crate::service::Facts::key(name, version))
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyApi {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let (c, r) = accept(req)?;
        let opts = (|| {
            Ok(KeyOptions {
                rotation_period_ms: match r.rotation_period_seconds {
                    0 => None,
                    s => Some(seconds_to_ms(s)?),
                },
                retain_until: time_of(&r.retain_until)?,
            })
        })();
        let out = match opts {
            Ok(opts) => {
                self.keys
                    .create_key(&c, &r.name, &r.description, opts)
                    .await
            }
            Err(e) => refused(e, &r.name, None),
        };
        reply(&c, out, |k| key_to_pb(&k))
    }

    async fn get_key(&self, req: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let (c, r) = accept(req)?;
        let out = self.keys.get_key(&c, &r.name).await;
        reply(&c, out, |k| key_to_pb(&k))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.keys.list_keys(&c, r.page_size, &r.page_token).await;
        reply(&c, out, |(keys, next)| pb::ListKeysResponse {
            keys: keys.iter().map(key_to_pb).collect(),
            next_page_token: next,
        })
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self
            .keys
            .generate_data_key(&c, &r.key_name, context(r.context), r.without_plaintext)
            .await;
        reply(&c, out, |dk| pb::GenerateDataKeyResponse {
            plaintext: dk
                .plaintext
                .map(|p| p.expose().to_vec())
                .unwrap_or_default(),
            wrapped_key: dk.wrapped,
            key_name: dk.key_name.to_string(),
            key_version: dk.key_version,
        })
    }

    async fn wrap_key(
        &self,
        req: Request<pb::WrapKeyRequest>,
    ) -> Result<Response<pb::WrapKeyResponse>, Status> {
        let (c, mut r) = accept(req)?;
        let plaintext = Plaintext::new(Zeroizing::new(std::mem::take(&mut r.plaintext)));
        let ctx = context(std::mem::take(&mut r.context));
        let out = self.keys.wrap_key(&c, &r.key_name, plaintext, ctx).await;
        reply(&c, out, |w| pb::WrapKeyResponse {
            wrapped_key: w.wrapped,
            key_name: w.key_name.to_string(),
            key_version: w.key_version,
        })
    }

    async fn unwrap_key(
        &self,
        req: Request<pb::UnwrapKeyRequest>,
    ) -> Result<Response<pb::UnwrapKeyResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self
            .keys
            .unwrap_key(&c, &r.wrapped_key, context(r.context))
            .await;
        reply(&c, out, |u| pb::UnwrapKeyResponse {
            plaintext: u.plaintext.expose().to_vec(),
            key_name: u.key_name.to_string(),
            key_version: u.key_version,
        })
    }

    async fn rewrap_key(
        &self,
        req: Request<pb::RewrapKeyRequest>,
    ) -> Result<Response<pb::RewrapKeyResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self
            .keys
            .rewrap_key(&c, &r.wrapped_key, context(r.context))
            .await;
        reply(&c, out, |w| pb::RewrapKeyResponse {
            wrapped_key: w.wrapped,
            key_name: w.key_name.to_string(),
            key_version: w.key_version,
        })
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.rotation.rotate_key(&c, &r.name).await;
        reply(&c, out, admin_to_pb)
    }

    async fn disable_key_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.lifecycle.disable_version(&c, &r.name, r.version).await;
        reply(&c, out, admin_to_pb)
    }

    async fn enable_key_version(
        &self,
        req: Request<pb::KeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.lifecycle.enable_version(&c, &r.name, r.version).await;
        reply(&c, out, admin_to_pb)
    }

    async fn retire_key_version(
        &self,
        req: Request<pb::RetireKeyVersionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = match seconds_to_ms(r.waiting_period_seconds) {
            Ok(waiting) => {
                self.lifecycle
                    .retire(&c, &r.name, Some(r.version), waiting)
                    .await
            }
            Err(e) => refused(e, &r.name, Some(r.version)),
        };
        reply(&c, out, admin_to_pb)
    }

    async fn retire_key(
        &self,
        req: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = match seconds_to_ms(r.waiting_period_seconds) {
            Ok(waiting) => self.lifecycle.retire(&c, &r.name, None, waiting).await,
            Err(e) => refused(e, &r.name, None),
        };
        reply(&c, out, admin_to_pb)
    }

    async fn cancel_retirement(
        &self,
        req: Request<pb::CancelRetirementRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let version = (r.version != 0).then_some(r.version);
        let out = self.lifecycle.cancel_retirement(&c, &r.name, version).await;
        reply(&c, out, admin_to_pb)
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = match time_of(&r.retain_until) {
            Ok(until) => self.lifecycle.set_retention(&c, &r.name, until).await,
            Err(e) => refused(e, &r.name, None),
        };
        reply(&c, out, admin_to_pb)
    }
}
