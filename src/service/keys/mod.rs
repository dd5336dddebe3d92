//! The key operations: the data plane (generate, wrap, unwrap and rewrap data keys) and
//! key CRUD (create, get, list).
//!
//! Invariants:
//! - Sealed first: while sealed a caller learns nothing about keys.
//! - Each call canonicalises its context once and decides once; the proof carries the
//!   canonical bytes to the HSM (AAD) and the call's [`Facts`] carry their keyed digest.
//! - Only the primary version wraps, and only while `ENABLED`; only `ENABLED` versions
//!   unwrap; a known version in another state is a [`Conflict`] before any HSM call.
//! - A wrapped key that fails in any way (parse, unknown key or version, authentication,
//!   or a key the caller may not use: its roles, its token's key globs or the context's
//!   conditions) is the one `InvalidWrappedKey`, so that a blob is no oracle of which
//!   keys exist (this rule wins over "not allowed → PERMISSION_DENIED", DESIGN §4); a
//!   caller that may unwrap no key at all gets `PermissionDenied` before the blob is even
//!   parsed.
//! - Every wrap is counted against the version's reserved budget before the HSM call; a
//!   version at its usage limit is rotated (once, whichever node notices first).
//! - A call's [`Facts`] name the key it named (by name), or, for a wrapped key, the key
//!   and version the blob names once the policy allows the caller that key; and, for a
//!   caller allowed on the key, the version the call used or was refused on (the primary
//!   for a wrap, the blob's for an unwrap), refused or not. A caller refused the key a
//!   blob names by the policy gets a record that names the key (no version) with the
//!   detail [`POLICY_REFUSED_AS_INVALID`]; its answer names nothing.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod budget;

use crate::authz::stamp::{enabled_row, key_row, retention_row};
use std::sync::Arc;

use super::access::{act, Act, Attempt, Authorized, Guard, Scope};
use super::context::Context;
use super::error::{Conflict, Result, ServiceError};
use super::facts::{Facts, Outcome};
use super::gate::Commit;
use super::rotation::{Rotation, Target, When};
use super::Caller;
use crate::keys::{
    CanonicalContext, EncryptionContext, KeyId, KeyName, KeysError, ObjectId, VersionState,
    WrappedKey,
};
use crate::secret::Plaintext;
use crate::store::{KeyRecord, NewKey, StoreError};
use budget::Budgets;

/// Largest page of `ListKeys`.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The audit detail of a wrapped key refused by the policy and answered as invalid.
pub const POLICY_REFUSED_AS_INVALID: &str =
    "PERMISSION_DENIED by the policy; answered as an invalid wrapped key";
/// Longest rotation period a key may have (10 years).
const MAX_ROTATION_MS: i64 = 3650 * 86_400_000;

/// Options of a new key.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyOptions {
    /// Scheduled rotation period (ms).
    pub rotation_period_ms: Option<i64>,
    /// Retention date (Unix ms).
    pub retain_until: Option<i64>,
}

/// A generated data key.
pub struct DataKey {
    /// The plaintext key, unless the caller asked for none.
    pub plaintext: Option<Plaintext>,
    /// Its wrapped form (format v1).
    pub wrapped: Vec<u8>,
    /// The key that wrapped it.
    pub key_name: KeyName,
    /// The version that wrapped it.
    pub key_version: u32,
}

/// A wrapped key and where it was wrapped.
pub struct Wrapped {
    /// Wrapped form (format v1).
    pub wrapped: Vec<u8>,
    /// Key name.
    pub key_name: KeyName,
    /// Version.
    pub key_version: u32,
}

/// An unwrapped key and where it came from.
pub struct Unwrapped {
    /// The key material.
    pub plaintext: Plaintext,
    /// Key name.
    pub key_name: KeyName,
    /// Version.
    pub key_version: u32,
}

/// The key operations.
pub struct Keys {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    rotation: Arc<Rotation>,
    budgets: Arc<Budgets>,
}

impl Keys {
    /// The key operations over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, rotation: Arc<Rotation>) -> Self {
        Keys {
            budgets: Arc::new(Budgets::new(Arc::clone(&ctx))),
            ctx,
            guard,
            rotation,
        }
    }

    /// The context, canonicalised once, with its digest in `facts`.
    fn canonical(&self, context: EncryptionContext, facts: &mut Facts) -> Result<CanonicalContext> {
        let ctx = CanonicalContext::new(context)?;
        facts.context_digest = self.ctx.context_digest(ctx.bytes());
        Ok(ctx)
    }

    /// `CreateKey`: a key and its version 1 in the HSM.
    pub async fn create_key(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        opts: KeyOptions,
    ) -> Outcome<KeyRecord> {
        let result = self.create(caller, name, description, opts).await;
        Outcome::new(result, Facts::key(name, None))
    }

    async fn create(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        opts: KeyOptions,
    ) -> Result<KeyRecord> {
        let engine = self.ctx.engine()?;
        let name = KeyName::parse(name)?;
        let proof = self
            .guard
            .authorize::<act::CreateKey>(caller, Scope::key(name.clone()))
            .await?;
        if let Some(p) = opts.rotation_period_ms {
            if p < self.ctx.cfg.lifecycle.min_rotation_ms || p > MAX_ROTATION_MS {
                return Err(ServiceError::InvalidArgument(
                    "rotation period outside the policy's bounds",
                ));
            }
        }
        if description.len() > 1024 {
            return Err(ServiceError::InvalidArgument(
                "description longer than 1024 bytes",
            ));
        }
        let db = self.ctx.db(&proof);
        match db.key_by_name(&name).await {
            Ok(_) => return Err(ServiceError::AlreadyExists("key name already used")),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let id = KeyId::from_random(engine.random().await?);
        let object = engine.create_version_object(id, 1).await?;
        let first_mac = self.ctx.stamp(enabled_row(&id, 1, &object, 1)).await?;
        let key_mac = self.ctx.stamp(key_row(&id, name.as_str())).await?;
        let retention_mac = match opts.retain_until {
            Some(t) => Some(self.ctx.stamp(retention_row(&id, t, false)).await?),
            None => None,
        };
        let result = db
            .create_key(&NewKey {
                id,
                name,
                description: description.to_string(),
                first_hsm_id: object,
                first_mac,
                rotation_period_ms: opts.rotation_period_ms,
                retain_until: opts.retain_until,
                retention_mac,
                key_mac,
                now: self.ctx.clock.now_ms(),
            })
            .await;
        match result {
            Ok(rec) => Ok(self.ctx.cache.put(rec)),
            Err(e) => {
                // The row never existed, so the object can never be used: remove it.
                if let Err(de) = engine.destroy_object(object).await {
                    tracing::warn!(error = %de, "could not remove the HSM object of a failed create");
                }
                Err(e.into())
            }
        }
    }

    /// `GetKey`.
    pub async fn get_key(&self, caller: &Caller, name: &str) -> Outcome<KeyRecord> {
        let result = async {
            self.ctx.engine()?;
            let name = KeyName::parse(name)?;
            let proof = self
                .guard
                .authorize::<act::GetKey>(caller, Scope::key(name.clone()))
                .await?;
            Ok(self.ctx.db(&proof).key_by_name(&name).await?)
        }
        .await;
        Outcome::new(result, Facts::key(name, None))
    }

    /// `ListKeys`: a page of the keys the caller may list, by name; the page token is the
    /// last name of the previous page.
    pub async fn list_keys(
        &self,
        caller: &Caller,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<KeyRecord>, String)> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::ListKeys>(caller, Scope::none())
            .await?;
        let size = match page_size {
            0 => 100,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match page_token {
            "" => None,
            t => Some(decode_page_token(t)?),
        };
        let mut keys = self
            .ctx
            .db(&proof)
            .list_keys(after.as_deref(), size)
            .await?;
        let full = keys.len() == size as usize;
        let last = keys.last().map(|k| k.name.to_string());
        keys.retain(|k| Guard::may_see(&proof, k.name.as_str()));
        let next = match last {
            Some(last) if full => encode_page_token(&last),
            _ => String::new(),
        };
        Ok((keys, next))
    }

    /// `GenerateDataKey`: a data key from the HSM's RNG, wrapped under the key's primary
    /// version.
    pub async fn generate_data_key(
        &self,
        caller: &Caller,
        key_name: &str,
        context: EncryptionContext,
        without_plaintext: bool,
    ) -> Outcome<DataKey> {
        let mut facts = Facts::key(key_name, None);
        let result = self
            .generate(caller, key_name, context, without_plaintext, &mut facts)
            .await;
        Outcome::new(result, facts)
    }

    async fn generate(
        &self,
        caller: &Caller,
        key_name: &str,
        context: EncryptionContext,
        without_plaintext: bool,
        facts: &mut Facts,
    ) -> Result<DataKey> {
        let engine = self.ctx.engine()?;
        let ctx = self.canonical(context, facts)?;
        let name = KeyName::parse(key_name)?;
        let proof = self
            .guard
            .authorize::<act::GenerateDataKey>(caller, Scope::key_with(name, ctx))
            .await?;
        let (key, version, object) = self.reserve_primary(&proof, &mut facts.version).await?;
        let (plaintext, wrapped) = engine
            .generate_data_key(key.id, version, object, proof.context_bytes())
            .await?;
        Ok(DataKey {
            plaintext: (!without_plaintext).then_some(plaintext),
            wrapped: wrapped.encode(),
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// `WrapKey`: caller-supplied key material (16 to 64 bytes) wrapped under the key's
    /// primary version.
    pub async fn wrap_key(
        &self,
        caller: &Caller,
        key_name: &str,
        plaintext: Plaintext,
        context: EncryptionContext,
    ) -> Outcome<Wrapped> {
        let mut facts = Facts::key(key_name, None);
        let result = self
            .wrap(caller, key_name, plaintext, context, &mut facts)
            .await;
        Outcome::new(result, facts)
    }

    async fn wrap(
        &self,
        caller: &Caller,
        key_name: &str,
        plaintext: Plaintext,
        context: EncryptionContext,
        facts: &mut Facts,
    ) -> Result<Wrapped> {
        let engine = self.ctx.engine()?;
        if !(16..=64).contains(&plaintext.len()) {
            return Err(KeysError::InvalidPlaintextLength.into());
        }
        let ctx = self.canonical(context, facts)?;
        let name = KeyName::parse(key_name)?;
        let proof = self
            .guard
            .authorize::<act::WrapKey>(caller, Scope::key_with(name, ctx))
            .await?;
        let (key, version, object) = self.reserve_primary(&proof, &mut facts.version).await?;
        let wrapped = engine
            .wrap(key.id, version, object, plaintext, proof.context_bytes())
            .await?;
        Ok(Wrapped {
            wrapped: wrapped.encode(),
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// `UnwrapKey`.
    pub async fn unwrap_key(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: EncryptionContext,
    ) -> Outcome<Unwrapped> {
        let mut facts = Facts::default();
        let result = self.unwrap(caller, wrapped, context, &mut facts).await;
        Outcome::new(result, facts)
    }

    async fn unwrap(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: EncryptionContext,
        facts: &mut Facts,
    ) -> Result<Unwrapped> {
        let engine = self.ctx.engine()?;
        let ctx = self.canonical(context, facts)?;
        let attempt = self.guard.attempt::<act::UnwrapKey>(caller).await?;
        let (proof, key, blob) = self.resolve(caller, attempt, wrapped, ctx, facts).await?;
        let object = self.enabled_version(&key, blob.version)?;
        let version = blob.version;
        let plaintext = engine.unwrap(blob, object, proof.context_bytes()).await?;
        facts.version = Some(version);
        Ok(Unwrapped {
            plaintext,
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// `RewrapKey`: a wrapped key moved to its key's primary version inside the server
    /// (the plaintext never leaves the HSM worker).
    pub async fn rewrap_key(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: EncryptionContext,
    ) -> Outcome<Wrapped> {
        let mut facts = Facts::default();
        let result = self.rewrap(caller, wrapped, context, &mut facts).await;
        Outcome::new(result, facts)
    }

    async fn rewrap(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: EncryptionContext,
        facts: &mut Facts,
    ) -> Result<Wrapped> {
        let engine = self.ctx.engine()?;
        let ctx = self.canonical(context, facts)?;
        let attempt = self.guard.attempt::<act::RewrapKey>(caller).await?;
        let (proof, key, blob) = self.resolve(caller, attempt, wrapped, ctx, facts).await?;
        let from_object = self.enabled_version(&key, blob.version)?;
        // A refusal names the version the blob was wrapped under (the one read); only a
        // rewrap that happened names the version it moved to.
        let (_, to_version, to_object) = self.reserve_primary(&proof, &mut None).await?;
        let rewrapped = engine
            .rewrap(
                blob,
                from_object,
                to_version,
                to_object,
                proof.context_bytes(),
            )
            .await?;
        facts.version = Some(to_version);
        Ok(Wrapped {
            wrapped: rewrapped.encode(),
            key_name: key.name.clone(),
            key_version: to_version,
        })
    }

    /// Parses a wrapped key, finds its key (with the attempt's permit), and completes the
    /// decision on that key with the context.
    async fn resolve<A: Act>(
        &self,
        caller: &Caller,
        attempt: Attempt<A>,
        wrapped: &[u8],
        ctx: CanonicalContext,
        facts: &mut Facts,
    ) -> Result<(Authorized<A>, Arc<KeyRecord>, WrappedKey)> {
        let blob = WrappedKey::parse(wrapped)?;
        let key = match self
            .ctx
            .key_by_id(self.ctx.db(&attempt), &blob.key_id)
            .await
        {
            Ok(k) => k,
            Err(ServiceError::NotFound(_)) => return Err(ServiceError::InvalidWrappedKey),
            Err(e) => return Err(e),
        };
        // Decided before the version is looked at: a caller learns nothing about versions
        // of keys it may not use.
        let decision = self
            .guard
            .confirm(caller, attempt, Scope::key_with(key.name.clone(), ctx))
            .await;
        match decision {
            // Not allowed on this key (by the policy, the token's key globs or the
            // context's conditions): answered exactly as a blob that names no key (one
            // code, one message, no reason), so that a blob tells a caller nothing about
            // which keys exist. The record names the key for auditors, with no version,
            // and says the answer stands for a policy refusal.
            Err(ServiceError::PermissionDenied) => {
                facts.key = Some(key.name.to_string());
                facts.detail = Some(POLICY_REFUSED_AS_INVALID);
                Err(ServiceError::InvalidWrappedKey)
            }
            // The policy allows the caller this key (any refusal now is its rate limit or
            // MFA, or comes later): the record names the key and the version the blob
            // names, whatever happens next, so that every attempt on the key, a refusal
            // of a disabled, retired or destroyed version included, is found by key in
            // the audit trail.
            decision => {
                facts.key = Some(key.name.to_string());
                facts.version = Some(blob.version);
                Ok((decision?, key, blob))
            }
        }
    }

    /// The primary version of the proof's key with one wrap reserved under it. A primary
    /// that reached the usage limit is rotated (once, whichever node notices first) and
    /// the wrap goes to the new primary. `primary` is the last primary version looked at,
    /// also when the wrap is refused (a primary that is not `ENABLED`), for the record.
    async fn reserve_primary<A: Act>(
        &self,
        proof: &Authorized<A>,
        primary: &mut Option<u32>,
    ) -> Result<(Arc<KeyRecord>, u32, ObjectId)> {
        let name = proof
            .key()
            .ok_or(ServiceError::internal("a wrap decided without a key"))?;
        let db = self.ctx.db(proof);
        for _ in 0..3 {
            let key = self.ctx.key_by_name(db, name).await?;
            *primary = Some(key.primary_version);
            let v = key
                .version(key.primary_version)
                .ok_or(ServiceError::internal("primary version row missing"))?;
            if v.state != VersionState::Enabled {
                if let Some(why) = self.ctx.cache.forged(&key.id, v.version) {
                    return Err(ServiceError::StateForged(why));
                }
                return Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled));
            }
            // Destroyed elsewhere and not yet forgotten here (see `enabled_version`).
            if self.ctx.forgetting.is_pending(&v.hsm_id) {
                return Err(ServiceError::Conflict(Conflict::PrimaryNotEnabled));
            }
            let (version, object) = (v.version, v.hsm_id);
            if self.budgets.take(db, key.id, version).await? {
                return Ok((key, version, object));
            }
            let when = When::IfPrimary {
                version,
                why: "usage limit",
            };
            self.rotation
                .rotate(proof, Target::Id(&key.id), when, Commit::Direct)
                .await?;
        }
        Err(ServiceError::Aborted(
            "key version reached its usage limit; retry",
        ))
    }
}

impl Keys {
    /// The HSM object of `version` of `key`, if that version may unwrap (an ENABLED row
    /// whose MAC did not verify is refused as forged).
    fn enabled_version(&self, key: &KeyRecord, version: u32) -> Result<ObjectId> {
        let v = key
            .version(version)
            .ok_or(ServiceError::InvalidWrappedKey)?;
        match v.state {
            // Destroyed elsewhere and not yet forgotten here: whatever the database says
            // now (a row forced back), the node's own record of the tombstone decides.
            VersionState::Enabled if self.ctx.forgetting.is_pending(&v.hsm_id) => Err(
                ServiceError::Conflict(Conflict::of_version(VersionState::Destroyed)),
            ),
            VersionState::Enabled => Ok(v.hsm_id),
            other => match self.ctx.cache.forged(&key.id, version) {
                Some(why) => Err(ServiceError::StateForged(why)),
                None => Err(ServiceError::Conflict(Conflict::of_version(other))),
            },
        }
    }
}

fn encode_page_token(last: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last)
}

fn decode_page_token(t: &str) -> Result<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(ServiceError::InvalidArgument("invalid page token"))
}
