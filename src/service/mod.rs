//! The use cases of Arca: authenticate → authorize → act on keys → persist.
//!
//! [`KeyService`] is transport-free: it takes domain values and returns domain values or a
//! [`ServiceError`]; `grpc` maps those to the wire in one place.
//!
//! Invariants:
//! - Every use case authorizes its caller through the access policy (one decision,
//!   `rbac.rs`) right after the seal check and input parsing, before any lookup: a
//!   refusal is the same `PermissionDenied` whether or not the key exists.
//! - Only the primary version wraps; only `ENABLED` versions unwrap.
//! - A wrapped key that fails in any way (parse, unknown key or version, authentication)
//!   is the one error [`ServiceError::InvalidWrappedKey`]; a known version in the wrong
//!   state is `FailedPrecondition` (checked before any HSM call).
//! - Every wrap is counted against its version's reserved budget before the HSM call, so
//!   the stored `wrap_count` is never below the wraps made.
//! - Key metadata is cached for at most [`KEY_CACHE_TTL`], and dropped at once on a local
//!   change, so a state change elsewhere takes effect within that time.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

mod access;
mod approvals;
mod audit;
mod lifecycle;
mod rbac;
mod seal;

pub use access::{NewToken, TokenInfo};
pub use approvals::{
    ApproveOutcome, MAX_REASON_BYTES, MAX_REQUEST_PAGE, REKEY_NEEDS_LIVE_APPROVER,
};
pub use audit::EngineKeys;
pub use lifecycle::{JobConfig, KeyOptions, LIFECYCLE_LEASE};
pub use rbac::{AccessOutcome, TotpEnrolled, REFRESH as ACCESS_REFRESH};
pub use seal::{CustodianKit, HsmOpener, PinSetter, SealControl, SealStatus};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::authz::policy::Action;
use crate::authz::{AuthError, Authenticator, Principal};
use crate::clock::Clock;
use crate::keys::{
    canonical_context, EncryptionContext, KeyEngine, KeyId, KeyName, KeysError, VersionState,
    WrappedKey,
};
use crate::secret::{BearerToken, Plaintext};
use crate::store::{NewKey, Store, StoreError, TokenRecord, TokenStore};

pub use crate::store::{
    ApprovalEntry, ApprovalRecord, GrantRecord, KeyRecord, RequestResult, ReviewRecord,
    VersionRecord,
};

use crate::quorum::approvals::Operation;
use approvals::{key_params, Commit};

/// How long key metadata is trusted without asking the store again.
pub const KEY_CACHE_TTL: Duration = Duration::from_millis(500);
/// Default number of wraps reserved in the store at a time, per version and node.
pub const DEFAULT_WRAP_RESERVATION: u64 = 1024;
/// Largest page of `ListKeys`.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Errors of the service layer, each a distinct class for the caller. Messages are fixed
/// strings that say what went wrong without revealing internals.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No or bad credentials.
    #[error("unauthenticated")]
    Unauthenticated,
    /// The caller may not do this (or see this key).
    #[error("permission denied")]
    PermissionDenied,
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// A wrapped key that does not parse, names no known key or version, or fails
    /// authentication.
    #[error("invalid wrapped key or encryption context")]
    InvalidWrappedKey,
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// The name is taken (forever).
    #[error("{0}")]
    AlreadyExists(&'static str),
    /// The key or version is in the wrong state.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// A dependency (HSM, database) is unreachable, or the service is sealed.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The audit record of the call could not be made durable: the call fails closed.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// A custodian's submission refused (wrong share, TOTP, lock-out): the message says
    /// which, since the custodian needs to know.
    #[error("{0}")]
    Rejected(&'static str),
    /// The caller is over its rate limit; retry after this long.
    #[error("rate limit exceeded")]
    RateLimited(std::time::Duration),
    /// A race lost (e.g. concurrent rotations); retry.
    #[error("{0}")]
    Aborted(&'static str),
    /// A role that needs MFA without a valid TOTP code (missing, wrong, replayed, or the
    /// principal locked out): the message says which, since the person must act on it.
    #[error("{0}")]
    MfaRequired(&'static str),
    /// A policy that does not load; the message names the file, role or value at fault.
    #[error("{0}")]
    InvalidPolicy(#[source] crate::authz::policy::PolicyError),
    /// A bug or misconfiguration; details go to the log only.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<KeysError> for ServiceError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::InvalidWrappedKey => ServiceError::InvalidWrappedKey,
            KeysError::InvalidKeyName => ServiceError::InvalidArgument("invalid key name"),
            KeysError::InvalidContext(_) => {
                ServiceError::InvalidArgument("invalid encryption context")
            }
            KeysError::InvalidPlaintextLength => {
                ServiceError::InvalidArgument("plaintext must be 16 to 64 bytes")
            }
            KeysError::HsmUnavailable(_) => ServiceError::Unavailable("HSM unavailable"),
            KeysError::HsmObjectMissing => {
                ServiceError::FailedPrecondition("key version destroyed")
            }
            e @ KeysError::Hsm(_) => ServiceError::Internal(Box::new(e)),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ServiceError::NotFound("key not found"),
            StoreError::AlreadyExists => ServiceError::AlreadyExists("key name already used"),
            StoreError::Conflict(_) => {
                ServiceError::FailedPrecondition("illegal key version state transition")
            }
            StoreError::Unavailable(_) => ServiceError::Unavailable("database unavailable"),
            e => ServiceError::Internal(Box::new(e)),
        }
    }
}

impl From<AuthError> for ServiceError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => ServiceError::Unauthenticated,
            AuthError::Store(e) => e.into(),
        }
    }
}

/// Result alias of this layer.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Who is calling, as established by the transport.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The authenticated principal.
    pub principal: Arc<Principal>,
    /// The request id (also on the response as `x-request-id`).
    pub request_id: String,
    /// Where the request came from (address, verified client certificate).
    pub peer: crate::authz::Peer,
    /// The TOTP code the request carries (`x-arca-totp`), for roles that need MFA.
    pub mfa: Option<crate::authz::TotpCode>,
}

impl Caller {
    /// The principal named by the client certificate (URI SAN, else DNS SAN, else CN),
    /// parsed on demand.
    pub fn cert_principal(&self) -> Option<String> {
        crate::authz::cert::principal_from_der(self.peer.cert.as_deref()?)
    }
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

/// Outcome of an administrative call: done now, or (with dual control) waiting for quorum.
pub enum AdminOutcome {
    /// The operation ran; the key as it is now.
    Done(KeyRecord),
    /// The operation waits for K-of-N approval: the request made for it.
    Pending(Box<ApprovalRecord>),
}

/// Tuning of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Wraps reserved in the store at a time.
    pub wrap_reservation: u64,
    /// Per-principal request rate limit (`None`: unlimited).
    pub rate_limit: Option<crate::authz::ratelimit::Limit>,
    /// Whether operations the quorum policy lists wait for K-of-N approval: true with a
    /// real quorum (`--custodians`, production), false in dev mode's 1-of-1, where they
    /// run at once.
    pub quorum_gates: bool,
    /// Which operations need approval, and how long requests live.
    pub quorum_policy: crate::quorum::policy::QuorumPolicy,
    /// Waiting periods, rotation bounds and the usage limit.
    pub lifecycle: crate::keys::policy::LifecyclePolicy,
    /// The access policy read at start (an approved one in the database replaces it).
    pub access_policy: crate::authz::policy::Policy,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            wrap_reservation: DEFAULT_WRAP_RESERVATION,
            rate_limit: None,
            quorum_gates: false,
            quorum_policy: crate::quorum::policy::QuorumPolicy::default(),
            lifecycle: crate::keys::policy::LifecyclePolicy::default(),
            access_policy: crate::authz::policy::Policy::default(),
        }
    }
}

/// The key use cases.
pub struct KeyService {
    store: Arc<dyn Store>,
    quorum: Arc<dyn Store>,
    tokens: Arc<dyn TokenStore>,
    /// `None` while sealed.
    engine: RwLock<Option<Arc<KeyEngine>>>,
    seal: SealControl,
    clock: Arc<dyn Clock>,
    auth: Authenticator,
    limiter: crate::authz::ratelimit::RateLimiter,
    cache: KeyCache,
    budgets: Mutex<HashMap<(KeyId, u32), WrapBudget>>,
    refill: tokio::sync::Mutex<()>,
    rotations: tokio::sync::Mutex<()>,
    access: rbac::AccessControl,
    cfg: ServiceConfig,
    audit: std::sync::OnceLock<Arc<crate::audit::AuditLog>>,
}

/// Tries of a rotation that keeps losing the version-number race to other nodes.
const ROTATION_ATTEMPTS: u32 = 32;

/// A random pause before retry `attempt` (≥ 1) of a lost rotation race: up to 1, 2, 4, 8,
/// then 16 ms.
fn rotation_backoff(attempt: u32) -> Duration {
    let cap_us = 1000u64 << attempt.saturating_sub(1).min(4);
    let mut b = [0u8; 8];
    let r = getrandom::fill(&mut b).map_or(cap_us / 2, |()| u64::from_le_bytes(b));
    Duration::from_micros(r % cap_us + 1)
}

impl KeyService {
    /// Wires the service, sealed: [`KeyService::unseal`] (or, in dev mode,
    /// [`KeyService::unseal_with_shares`] / [`KeyService::open_with_pin`]) opens the HSM.
    pub fn new(
        store: Arc<dyn Store>,
        quorum: Arc<dyn Store>,
        tokens: Arc<dyn TokenStore>,
        seal: SealControl,
        clock: Arc<dyn Clock>,
        cfg: ServiceConfig,
    ) -> Self {
        KeyService {
            auth: Authenticator::new(Arc::clone(&store), Arc::clone(&clock)),
            limiter: crate::authz::ratelimit::RateLimiter::new(cfg.rate_limit),
            store,
            quorum,
            tokens,
            engine: RwLock::new(None),
            seal,
            clock,
            cache: KeyCache::default(),
            budgets: Mutex::new(HashMap::new()),
            refill: tokio::sync::Mutex::new(()),
            rotations: tokio::sync::Mutex::new(()),
            access: rbac::AccessControl::new(cfg.access_policy.clone()),
            cfg,
            audit: std::sync::OnceLock::new(),
        }
    }

    /// The engine, or `Unavailable("sealed")` while sealed.
    pub fn engine(&self) -> Result<Arc<KeyEngine>> {
        self.engine
            .read()
            .ok()
            .and_then(|e| e.clone())
            .ok_or(ServiceError::Unavailable("sealed"))
    }

    /// The store (for health probes).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Authenticates a presented bearer token.
    pub async fn authenticate(
        &self,
        token: Option<BearerToken>,
        peer: &crate::authz::Peer,
    ) -> Result<Arc<Principal>> {
        let principal = self.auth.authenticate(token, peer).await?;
        self.limiter
            .check(&principal.name, Instant::now())
            .map_err(ServiceError::RateLimited)?;
        Ok(principal)
    }

    /// Mints a bearer token for `principal` with `roles`, stores its hash, and returns it
    /// (the only time the token exists outside its holder).
    pub async fn issue_token(&self, principal: &str, roles: &[&str]) -> Result<BearerToken> {
        let secret = crate::quorum::crypto::random::<32>()
            .map_err(|e| ServiceError::Internal(Box::new(e)))?;
        let token = BearerToken::from_random(&secret);
        self.ensure_token(&token, principal, roles).await?;
        Ok(token)
    }

    /// Registers an existing token (e.g. the dev token kept in the data dir) if the store
    /// does not know it.
    pub async fn ensure_token(
        &self,
        token: &BearerToken,
        principal: &str,
        roles: &[&str],
    ) -> Result<()> {
        match self.store.token_by_hash(&token.hash()).await {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => {
                let id = crate::quorum::crypto::random::<8>()
                    .map_err(|e| ServiceError::Internal(Box::new(e)))?;
                self.store
                    .insert_token(&TokenRecord {
                        id: format!("tok_{}", hex::encode(id.as_ref())),
                        hash: token.hash(),
                        principal: principal.to_string(),
                        roles: roles.iter().map(|r| r.to_string()).collect(),
                        created_at: self.clock.now_ms(),
                        expires_at: None,
                        revoked_at: None,
                        key_globs: Vec::new(),
                        cidrs: Vec::new(),
                        bound_principal: None,
                        description: String::new(),
                    })
                    .await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a key and its version 1 in the HSM.
    pub async fn create_key(
        &self,
        caller: &Caller,
        name: &str,
        description: &str,
        opts: KeyOptions,
    ) -> Result<KeyRecord> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        self.authorize(caller, Action::CreateKey, Some(name.as_str()), None)
            .await?;
        self.check_key_options(&opts)?;
        if description.len() > 1024 {
            return Err(ServiceError::InvalidArgument(
                "description longer than 1024 bytes",
            ));
        }
        match self.store.key_by_name(&name).await {
            Ok(_) => return Err(ServiceError::AlreadyExists("key name already used")),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let id = KeyId::from_random(self.engine()?.random().await?);
        let object = self.engine()?.create_version_object(id, 1).await?;
        let result = self
            .store
            .create_key(&NewKey {
                id,
                name,
                description: description.to_string(),
                first_hsm_id: object,
                rotation_period_ms: opts.rotation_period_ms,
                retain_until: opts.retain_until,
                now: self.clock.now_ms(),
            })
            .await;
        match result {
            Ok(rec) => Ok(self.cache.put(rec)),
            Err(e) => {
                // The row never existed, so the object can never be used: remove it.
                if let Err(de) = self.engine()?.destroy_object(object).await {
                    tracing::warn!(error = %de, "could not remove the HSM object of a failed create");
                }
                Err(e.into())
            }
        }
    }

    /// The key named `name`.
    pub async fn get_key(&self, caller: &Caller, name: &str) -> Result<KeyRecord> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        self.authorize(caller, Action::GetKey, Some(name.as_str()), None)
            .await?;
        Ok(self.store.key_by_name(&name).await?)
    }

    /// A page of keys by name; the token is the last name of the previous page.
    pub async fn list_keys(
        &self,
        caller: &Caller,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<KeyRecord>, String)> {
        self.engine()?;
        self.authorize(caller, Action::ListKeys, None, None).await?;
        let size = match page_size {
            0 => 100,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(page_token)?)
        };
        let mut keys = self.store.list_keys(after.as_deref(), size).await?;
        let keys_full = keys.len() == size as usize;
        let last = keys.last().map(|k| k.name.to_string());
        keys.retain(|k| self.may_list(caller, k.name.as_str()));
        let next = match last {
            Some(last) if keys_full => encode_page_token(&last),
            _ => String::new(),
        };
        Ok((keys, next))
    }

    /// Generates a data key under the key's primary version.
    pub async fn generate_data_key(
        self: &Arc<Self>,
        caller: &Caller,
        key_name: &str,
        context: &EncryptionContext,
        without_plaintext: bool,
    ) -> Result<DataKey> {
        // Sealed first: while sealed a caller learns nothing about keys.
        let engine = self.engine()?;
        let ctx = canonical_context(context)?;
        let (key, version, object) = self
            .reserve_primary(caller, key_name, Some((Action::GenerateDataKey, context)))
            .await?;
        let (plaintext, wrapped) = engine
            .generate_data_key(key.id, version, object, ctx)
            .await?;
        Ok(DataKey {
            plaintext: (!without_plaintext).then_some(plaintext),
            wrapped: wrapped.encode(),
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// Wraps caller-supplied key material under the key's primary version.
    pub async fn wrap_key(
        self: &Arc<Self>,
        caller: &Caller,
        key_name: &str,
        plaintext: Plaintext,
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        // Sealed first: while sealed a caller learns nothing about keys.
        let engine = self.engine()?;
        if !(16..=64).contains(&plaintext.len()) {
            return Err(KeysError::InvalidPlaintextLength.into());
        }
        let ctx = canonical_context(context)?;
        let (key, version, object) = self
            .reserve_primary(caller, key_name, Some((Action::WrapKey, context)))
            .await?;
        let wrapped = engine.wrap(key.id, version, object, plaintext, ctx).await?;
        Ok(Wrapped {
            wrapped: wrapped.encode(),
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// Unwraps a wrapped key.
    pub async fn unwrap_key(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<Unwrapped> {
        // Sealed first: while sealed a caller learns nothing about keys.
        let engine = self.engine()?;
        let ctx = canonical_context(context)?;
        let (key, blob, object) = self
            .version_for_unwrap(caller, wrapped, Action::UnwrapKey, context)
            .await?;
        let version = blob.version;
        let plaintext = engine.unwrap(blob, object, ctx).await?;
        Ok(Unwrapped {
            plaintext,
            key_name: key.name.clone(),
            key_version: version,
        })
    }

    /// Moves a wrapped key to its key's primary version, inside the server.
    pub async fn rewrap_key(
        self: &Arc<Self>,
        caller: &Caller,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<Wrapped> {
        // Sealed first: while sealed a caller learns nothing about keys.
        let engine = self.engine()?;
        let ctx = canonical_context(context)?;
        let (key, blob, from_object) = self
            .version_for_unwrap(caller, wrapped, Action::RewrapKey, context)
            .await?;
        let (_, to_version, to_object) = self
            .reserve_primary(caller, key.name.as_str(), None)
            .await?;
        let rewrapped = engine
            .rewrap(blob, from_object, to_version, to_object, ctx)
            .await?;
        Ok(Wrapped {
            wrapped: rewrapped.encode(),
            key_name: key.name.clone(),
            key_version: to_version,
        })
    }

    /// Adds a new version in the HSM and makes it primary.
    pub async fn rotate_key(&self, caller: &Caller, name: &str) -> Result<AdminOutcome> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        self.authorize(caller, Action::RotateKey, Some(name.as_str()), None)
            .await?;
        if self.needs_quorum(Operation::RotateKey) {
            // Refused now rather than after K approvals: the key must exist and live.
            let key = self.store.key_by_name(&name).await?;
            if !lifecycle::has_live_version(&key) {
                return Err(ServiceError::FailedPrecondition(
                    "every version of this key is retired; it cannot be rotated",
                ));
            }
            let params = key_params(&name, None);
            let req = self
                .open_request(caller, Operation::RotateKey, params)
                .await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(
            self.rotate(&name, Commit::Direct).await?,
        ))
    }

    /// Adds the next version in the HSM and makes it primary, committed as `commit` says
    /// (on its own, or with the completion of the approval request that ordered it).
    async fn rotate(&self, name: &KeyName, commit: Commit<'_>) -> Result<KeyRecord> {
        // Local rotations queue here; rotations on other nodes lose the version number
        // race in the database and retry after a random pause that grows with each loss
        // (so that two nodes rotating back to back do not keep colliding).
        let _serial = self.rotations.lock().await;
        for attempt in 0..ROTATION_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(rotation_backoff(attempt)).await;
            }
            let key = self.store.key_by_name(name).await?;
            if !lifecycle::has_live_version(&key) {
                return Err(ServiceError::FailedPrecondition(
                    "every version of this key is retired; it cannot be rotated",
                ));
            }
            let next = key
                .versions
                .last()
                .map(|v| v.version)
                .unwrap_or(0)
                .checked_add(1)
                .ok_or(ServiceError::FailedPrecondition(
                    "key has too many versions",
                ))?;
            let object = self.engine()?.create_version_object(key.id, next).await?;
            let now = self.clock.now_ms();
            let stored = match commit {
                Commit::Direct => self.store.add_version(&key.id, next, &object, now).await,
                Commit::Approved(id, approved) => {
                    self.quorum
                        .complete_add_version(id, approved, &key.id, next, &object, now)
                        .await
                }
            };
            match stored {
                Ok(rec) => {
                    tracing::info!(key = %rec.name, version = next, "key rotated");
                    return Ok(self.cache.put(rec));
                }
                Err(e) => {
                    self.discard_unstored_object(object, &e).await;
                    match e {
                        StoreError::AlreadyExists => continue,
                        e => return Err(e.into()),
                    }
                }
            }
        }
        Err(ServiceError::Aborted("concurrent rotation; retry"))
    }

    /// Destroys the HSM object of a new version whose store write failed, but only when
    /// the failure proves the version was not stored (a lost race, a refused state). After
    /// an ambiguous failure (the connection dropped during the commit) the version may be
    /// committed: its object is kept (an orphan at worst, never a version without its key).
    pub(super) async fn discard_unstored_object(
        &self,
        object: crate::keys::ObjectId,
        e: &StoreError,
    ) {
        let not_stored = matches!(
            e,
            StoreError::AlreadyExists | StoreError::Conflict(_) | StoreError::NotFound
        );
        if !not_stored {
            tracing::warn!(object = %object, "kept the HSM object of a rotation whose commit may have happened");
            return;
        }
        match self.engine() {
            Ok(engine) => {
                if let Err(de) = engine.destroy_object(object).await {
                    tracing::warn!(error = %de, "could not remove the HSM object of a failed rotation");
                }
            }
            Err(_) => {
                tracing::warn!(object = %object, "sealed: the HSM object of a failed rotation stays")
            }
        }
    }

    /// Disables a version (reversible; it stops unwrapping at once).
    pub async fn disable_version(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Result<AdminOutcome> {
        self.set_state(caller, name, version, VersionState::Disabled)
            .await
    }

    /// Re-enables a disabled version.
    pub async fn enable_version(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
    ) -> Result<AdminOutcome> {
        self.set_state(caller, name, version, VersionState::Enabled)
            .await
    }

    async fn set_state(
        &self,
        caller: &Caller,
        name: &str,
        version: u32,
        to: VersionState,
    ) -> Result<AdminOutcome> {
        self.engine()?;
        let name = KeyName::parse(name)?;
        let (op, action) = match to {
            VersionState::Enabled => (Operation::EnableKeyVersion, Action::EnableKeyVersion),
            _ => (Operation::DisableKeyVersion, Action::DisableKeyVersion),
        };
        self.authorize(caller, action, Some(name.as_str()), None)
            .await?;
        if self.needs_quorum(op) {
            // Checked now, so that no request is made for a change that cannot happen.
            let key = self.store.key_by_name(&name).await?;
            let current = key
                .version(version)
                .ok_or(ServiceError::NotFound("key version not found"))?;
            if current.state == to {
                return Ok(AdminOutcome::Done(key));
            }
            transition_sources(current.state, to)?;
            let req = self
                .open_request(caller, op, key_params(&name, Some(version)))
                .await?;
            return Ok(AdminOutcome::Pending(Box::new(req)));
        }
        Ok(AdminOutcome::Done(
            self.change_state(&name, version, to, Commit::Direct)
                .await?,
        ))
    }

    /// Moves a version to `to`, committed as `commit` says. Already in `to`: nothing
    /// changes (an approved request still completes).
    async fn change_state(
        &self,
        name: &KeyName,
        version: u32,
        to: VersionState,
        commit: Commit<'_>,
    ) -> Result<KeyRecord> {
        let key = self.store.key_by_name(name).await?;
        let current = key
            .version(version)
            .ok_or(ServiceError::NotFound("key version not found"))?;
        let from = if current.state == to {
            &[][..]
        } else {
            transition_sources(current.state, to)?
        };
        let now = self.clock.now_ms();
        let rec = match commit {
            Commit::Direct if current.state == to => return Ok(key),
            Commit::Direct => {
                self.store
                    .set_version_state(&key.id, version, from, to, now)
                    .await?
            }
            Commit::Approved(id, approved) => {
                self.quorum
                    .complete_set_version_state(id, approved, &key.id, version, from, to, now)
                    .await?
            }
        };
        tracing::info!(key = %rec.name, version, state = to.as_str(), "key version state changed");
        Ok(self.cache.put(rec))
    }

    /// The key, its primary version and that version's HSM object, if it may wrap.
    /// `check` authorizes the caller for an action with a context first (`None` when the
    /// caller was authorized on this key already, as a rewrap is).
    async fn primary_for_wrap(
        &self,
        caller: &Caller,
        name: &str,
        check: Option<(Action, &EncryptionContext)>,
    ) -> Result<(Arc<KeyRecord>, u32, crate::keys::ObjectId)> {
        let name = KeyName::parse(name)?;
        if let Some((action, ctx)) = check {
            self.authorize(caller, action, Some(name.as_str()), Some(ctx))
                .await?;
        }
        let key = self.cache.by_name(&name, self.store.as_ref()).await?;
        let v = key
            .version(key.primary_version)
            .ok_or(ServiceError::Internal("primary version row missing".into()))?;
        if v.state != VersionState::Enabled {
            return Err(ServiceError::FailedPrecondition(
                "primary key version is not enabled",
            ));
        }
        let (version, object) = (v.version, v.hsm_id);
        Ok((key, version, object))
    }

    /// Parses a wrapped key and finds its version, if the caller may do `action` (unwrap
    /// or rewrap) with `ctx` on its key.
    async fn version_for_unwrap(
        &self,
        caller: &Caller,
        wrapped: &[u8],
        action: Action,
        ctx: &EncryptionContext,
    ) -> Result<(Arc<KeyRecord>, WrappedKey, crate::keys::ObjectId)> {
        // A caller that may do this on no key learns nothing, not even whether the blob
        // names a known key.
        if self.decide(caller, action, None, None).is_none() {
            tracing::info!(
                request_id = %caller.request_id,
                principal = %caller.principal.name,
                action = action.as_str(),
                "permission denied"
            );
            return Err(ServiceError::PermissionDenied);
        }
        let blob = WrappedKey::parse(wrapped)?;
        let key = match self.cache.by_id(&blob.key_id, self.store.as_ref()).await {
            Ok(k) => k,
            Err(ServiceError::NotFound(_)) => return Err(ServiceError::InvalidWrappedKey),
            Err(e) => return Err(e),
        };
        // Authorized first: a caller learns nothing about versions of keys it may not use.
        self.authorize(caller, action, Some(key.name.as_str()), Some(ctx))
            .await?;
        let v = key
            .version(blob.version)
            .ok_or(ServiceError::InvalidWrappedKey)?;
        match v.state {
            VersionState::Enabled => {}
            VersionState::Destroyed => {
                return Err(ServiceError::FailedPrecondition("key version destroyed"))
            }
            VersionState::Disabled => {
                return Err(ServiceError::FailedPrecondition("key version is disabled"))
            }
            VersionState::ScheduledForDestruction => {
                return Err(ServiceError::FailedPrecondition(
                    "key version is scheduled for destruction",
                ))
            }
        }
        let object = v.hsm_id;
        Ok((key, blob, object))
    }

    /// The primary version with one wrap reserved under it. A primary that reached
    /// the usage limit is rotated (once, whichever node notices first) and the wrap
    /// goes to the new primary.
    async fn reserve_primary(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
        check: Option<(Action, &EncryptionContext)>,
    ) -> Result<(Arc<KeyRecord>, u32, crate::keys::ObjectId)> {
        for attempt in 0..3 {
            // Authorized once, before the first lookup.
            let check = if attempt == 0 { check } else { None };
            let (key, version, object) = self.primary_for_wrap(caller, name, check).await?;
            if self.take_wrap(key.id, version).await? {
                return Ok((key, version, object));
            }
            self.rotate_if_primary(&key.id, version, "usage limit")
                .await?;
        }
        Err(ServiceError::Aborted(
            "key version reached its usage limit; retry",
        ))
    }

    /// Counts one wrap against the version's reserved budget: `false` if the version
    /// has reached the usage limit. When the budget runs low a refill is reserved in the
    /// store in the background, so requests rarely wait for it; when it is empty, the
    /// request waits for the refill.
    async fn take_wrap(self: &Arc<Self>, key: KeyId, version: u32) -> Result<bool> {
        let block = self.cfg.wrap_reservation.max(1);
        loop {
            match self.try_take_wrap(key, version, block) {
                Take::Taken => return Ok(true),
                Take::TakenRefill => {
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        if let Err(e) = this.refill_wraps(key, version, block).await {
                            tracing::warn!(error = %e, "background wrap reservation failed");
                        }
                    });
                    return Ok(true);
                }
                Take::Empty => {
                    if !self.refill_wraps(key, version, block).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    fn try_take_wrap(&self, key: KeyId, version: u32, block: u64) -> Take {
        let Ok(mut b) = self.budgets.lock() else {
            return Take::Empty;
        };
        let budget = b.entry((key, version)).or_default();
        if budget.left == 0 {
            return Take::Empty;
        }
        budget.left -= 1;
        if budget.left < block / 2 && !budget.refilling {
            budget.refilling = true;
            Take::TakenRefill
        } else {
            Take::Taken
        }
    }

    /// Reserves up to `block` more wraps in the store, within the usage limit (one refill
    /// at a time per service). `false` when the version has no wraps left at all.
    async fn refill_wraps(&self, key: KeyId, version: u32, block: u64) -> Result<bool> {
        let _one = self.refill.lock().await;
        let low = self
            .budgets
            .lock()
            .map(|b| b.get(&(key, version)).map_or(0, |x| x.left) < block / 2 + 1)
            .unwrap_or(true);
        let result = if low {
            self.store
                .reserve_wraps_within(&key, version, block, self.cfg.lifecycle.usage_limit)
                .await
        } else {
            Ok(block)
        };
        let mut left = 0;
        if let Ok(mut b) = self.budgets.lock() {
            let budget = b.entry((key, version)).or_default();
            budget.refilling = false;
            if let (true, Ok(granted)) = (low, &result) {
                budget.left += granted;
            }
            left = budget.left;
        }
        result?;
        Ok(left > 0)
    }
}

/// The states a version may enter `to` from, if `current` is one of them. Enabling is
/// only the reverse of disabling; a version scheduled for destruction must have its
/// retirement cancelled first.
fn transition_sources(current: VersionState, to: VersionState) -> Result<&'static [VersionState]> {
    let from: &'static [VersionState] = match to {
        VersionState::Enabled => &[VersionState::Disabled],
        VersionState::Disabled => &[VersionState::Enabled],
        _ => VersionState::sources_of(to),
    };
    if from.contains(&current) {
        Ok(from)
    } else {
        Err(ServiceError::FailedPrecondition(match current {
            VersionState::Destroyed => "key version destroyed",
            VersionState::ScheduledForDestruction => "key version is scheduled for destruction",
            _ => "illegal key version state transition",
        }))
    }
}

/// A version's wraps reserved in the store and not yet used, on this node.
#[derive(Default)]
struct WrapBudget {
    left: u64,
    refilling: bool,
}

enum Take {
    Taken,
    TakenRefill,
    Empty,
}

/// Short-lived cache of key metadata for the hot paths (wrap and unwrap).
#[derive(Default)]
struct KeyCache {
    by_id: RwLock<HashMap<KeyId, (Arc<KeyRecord>, Instant)>>,
    names: RwLock<HashMap<KeyName, KeyId>>,
}

impl KeyCache {
    fn put(&self, rec: KeyRecord) -> KeyRecord {
        let arc = Arc::new(rec.clone());
        if let Ok(mut n) = self.names.write() {
            n.insert(rec.name.clone(), rec.id);
        }
        if let Ok(mut m) = self.by_id.write() {
            m.insert(rec.id, (arc, Instant::now()));
        }
        rec
    }

    fn fresh(&self, id: &KeyId) -> Option<Arc<KeyRecord>> {
        let m = self.by_id.read().ok()?;
        let (rec, at) = m.get(id)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| Arc::clone(rec))
    }

    async fn by_id(&self, id: &KeyId, store: &dyn Store) -> Result<Arc<KeyRecord>> {
        if let Some(k) = self.fresh(id) {
            return Ok(k);
        }
        let rec = store.key_by_id(id).await?;
        self.put(rec);
        self.fresh(id)
            .ok_or(ServiceError::Internal("key cache".into()))
    }

    async fn by_name(&self, name: &KeyName, store: &dyn Store) -> Result<Arc<KeyRecord>> {
        let id = self.names.read().ok().and_then(|n| n.get(name).copied());
        if let Some(k) = id.and_then(|id| self.fresh(&id)) {
            return Ok(k);
        }
        let rec = store.key_by_name(name).await?;
        let id = rec.id;
        self.put(rec);
        self.fresh(&id)
            .ok_or(ServiceError::Internal("key cache".into()))
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
