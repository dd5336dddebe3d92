//! Token administration: create (the token is shown once), list (never the token),
//! revoke (effective on every node within the authentication cache TTL). Token
//! administration answers only while unsealed (DESIGN §2), to principals the access
//! policy allows.
//!
//! `CreateToken` may be quorum-gated (`policies/quorum.toml`). Then the requester makes
//! the token (`arca_` + 64 hex digits from a CSPRNG) and sends only its SHA-256
//! (`token_sha256`); the request's parameters carry that hash, so the custodians approve
//! exactly this token, and the approved run stores the hash. The token never reaches the
//! server, the database or the approving custodian; nothing secret waits in a request.
//!
//! Invariants:
//! - Only the token's SHA-256 is stored; the token exists outside its holder only in the
//!   one answer that creates it (or never, when the requester made it).
//! - Custodian identities come only from the init and rekey ceremonies.
//! - Every token made here expires: a lifetime of 0 is the access policy's default
//!   (`[tokens] default_ttl`), one above `[tokens] max_ttl` is refused; an approved token
//!   is checked again against the policy in force when it runs, and its lifetime starts
//!   then.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use crate::authz::stamp::token_row;
use std::sync::Arc;

use crate::authz::{Cidr, CUSTODIAN_PREFIX};
use crate::quorum::approvals::{Operation, Parameters, QuorumApproved};
use crate::secret::{BearerToken, TokenHash};
use crate::service::access::{act, Guard, Scope};
use crate::service::context::{Context, Permit};
use crate::service::error::{Conflict, Result, ServiceError};
use crate::service::gate::{request_conflict, Gate};
use crate::service::Caller;
use crate::store::{ApprovalRecord, StoreError, TokenRecord};

/// Lifetime of the bootstrap admin token (24 hours): long enough for the init ceremony.
pub const BOOTSTRAP_TTL_MS: i64 = 24 * 3600 * 1000;
/// The description that marks the bootstrap admin token.
const BOOTSTRAP_DESCRIPTION: &str = "bootstrap admin token (init ceremony)";

/// Longest token lifetime any policy may allow (one year).
pub const MAX_TTL_MS: i64 = crate::authz::policy::MAX_TOKEN_TTL_MS;

/// Parameter of `CreateToken`: the principal the token authenticates.
pub const PARAM_TOKEN_PRINCIPAL: &str = "principal";
/// Parameter of `CreateToken`: its roles, comma-separated.
pub const PARAM_TOKEN_ROLES: &str = "roles";
/// Parameter of `CreateToken`: its key globs, comma-separated ("" = any key).
pub const PARAM_TOKEN_KEYS: &str = "key_globs";
/// Parameter of `CreateToken`: its source networks, comma-separated ("" = anywhere).
pub const PARAM_TOKEN_CIDRS: &str = "cidrs";
/// Parameter of `CreateToken`: the certificate principal it is bound to ("" = none).
pub const PARAM_TOKEN_BOUND: &str = "bound_principal";
/// Parameter of `CreateToken`: its description.
pub const PARAM_TOKEN_DESCRIPTION: &str = "description";
/// Parameter of `CreateToken`: its lifetime in seconds, from the approval.
pub const PARAM_TOKEN_TTL: &str = "ttl_seconds";
/// Parameter of `CreateToken`: hex SHA-256 of the token the requester made.
pub const PARAM_TOKEN_SHA256: &str = "token_sha256";

/// What a new token may do.
#[derive(Clone, Debug, Default)]
pub struct NewToken {
    /// Principal the token authenticates (e.g. `svc:billing`).
    pub principal: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Key-name globs; empty = unrestricted.
    pub key_globs: Vec<String>,
    /// Lifetime in ms; 0 = no expiry.
    pub ttl_ms: i64,
    /// Allowed source networks; empty = anywhere.
    pub cidrs: Vec<String>,
    /// Certificate principal the token is bound to.
    pub bound_principal: Option<String>,
    /// Free text.
    pub description: String,
    /// Hex SHA-256 of a token the caller made itself (required where `CreateToken` is
    /// quorum-gated); the server then mints none.
    pub token_sha256: Option<String>,
}

/// What `CreateToken` answers.
pub enum TokenOutcome {
    /// Made now: the record and the token, unless the caller made it (then `None`).
    Done(Box<TokenRecord>, Option<BearerToken>),
    /// Waiting for K-of-N approval: the request made for it.
    Pending(Box<ApprovalRecord>),
}

/// A token as listed (never the secret).
#[derive(Clone, Debug)]
pub struct TokenInfo {
    /// The stored record (hash only).
    pub record: TokenRecord,
}

fn valid_glob(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 128
        && g.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_/-*".contains(&b))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 256 && !n.chars().any(|c| c.is_control() || c == ',')
}

/// A token id: `tok_` + 16 hex digits.
fn token_id() -> Result<String> {
    let id = crate::secret::random::<8>().map_err(ServiceError::internal)?;
    Ok(format!("tok_{}", hex::encode(id.as_ref())))
}

/// Whether `t` still reads as the bootstrap token was issued: unscoped, admin only, and
/// expiring within [`BOOTSTRAP_TTL_MS`] of its creation. The init ceremony vouches for
/// nothing else (a row widened by a database writer before init is not stamped).
pub(crate) fn is_bootstrap_as_issued(t: &TokenRecord) -> bool {
    t.description == BOOTSTRAP_DESCRIPTION
        && t.roles == ["admin"]
        && t.key_globs.is_empty()
        && t.cidrs.is_empty()
        && t.bound_principal.is_none()
        && t.revoked_at.is_none()
        && t.expires_at
            .is_some_and(|e| e > t.created_at && e <= t.created_at + BOOTSTRAP_TTL_MS)
}

/// The stored form of a token `t` with hash `hash`, made at `now`, living `ttl_ms`
/// (not stamped yet).
fn new_record(t: NewToken, hash: TokenHash, now: i64, ttl_ms: i64) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: token_id()?,
        hash,
        principal: t.principal,
        roles: t.roles,
        created_at: now,
        expires_at: Some(now + ttl_ms),
        revoked_at: None,
        key_globs: t.key_globs,
        cidrs: t.cidrs,
        bound_principal: t.bound_principal,
        description: t.description,
        state_seq: 1,
        mac: None,
    })
}

/// The stored form of an unscoped, unexpiring token for `principal` with `roles` (the
/// start-up admin token, custodian tokens), made at `now`.
pub(crate) fn unscoped_record(
    token: &BearerToken,
    principal: String,
    roles: Vec<String>,
    now: i64,
) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: token_id()?,
        hash: token.hash(),
        principal,
        roles,
        created_at: now,
        expires_at: None,
        revoked_at: None,
        key_globs: Vec::new(),
        cidrs: Vec::new(),
        bound_principal: None,
        description: String::new(),
        state_seq: 1,
        mac: None,
    })
}

/// A token hash as sent by a client: 64 hex digits (either case), as stored (lower).
fn parse_sha256(h: &str) -> Result<TokenHash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.trim(), &mut out).map_err(|_| {
        ServiceError::InvalidArgument("token_sha256 must be 64 hex digits (SHA-256 of the token)")
    })?;
    Ok(TokenHash(out))
}

fn join(items: &[String]) -> String {
    items.join(",")
}

fn split(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::to_string).collect()
    }
}

/// Checks what a new token may do (also when an approved request runs: its parameters
/// are checked again).
fn check_new(t: &NewToken) -> Result<()> {
    if !valid_name(&t.principal) || t.roles.iter().any(|r| !valid_name(r)) {
        return Err(ServiceError::InvalidArgument(
            "invalid principal or role name",
        ));
    }
    // Custodian identities are issued only by the init ceremony: an admin must not be
    // able to mint one (the identity half of dual control).
    if t.principal.starts_with(CUSTODIAN_PREFIX) || t.roles.iter().any(|r| r == "custodian") {
        return Err(ServiceError::InvalidArgument(
            "custodian identities come only from the init ceremony",
        ));
    }
    if t.key_globs.iter().any(|g| !valid_glob(g)) {
        return Err(ServiceError::InvalidArgument(
            "key globs are 1-128 of [a-z0-9_/-] and *",
        ));
    }
    if t.cidrs
        .iter()
        .any(|c| Cidr::parse(c).is_none() || c.contains(','))
    {
        return Err(ServiceError::InvalidArgument("invalid CIDR"));
    }
    if t.bound_principal.as_deref().is_some_and(|p| !valid_name(p)) {
        return Err(ServiceError::InvalidArgument("invalid bound principal"));
    }
    if t.description.len() > 1024 {
        return Err(ServiceError::InvalidArgument(
            "description longer than 1024 bytes",
        ));
    }
    Ok(())
}

/// The token service.
pub struct Tokens {
    ctx: Arc<Context>,
    guard: Arc<Guard>,
    gate: Arc<Gate>,
}

impl Tokens {
    /// The token service over `ctx`.
    pub fn new(ctx: Arc<Context>, guard: Arc<Guard>, gate: Arc<Gate>) -> Self {
        Tokens { ctx, guard, gate }
    }

    /// The lifetime a token asked for with `ttl_ms` gets under the policy in force: 0 is
    /// the default; above the maximum (or negative) is refused.
    fn lifetime(&self, ttl_ms: i64) -> Result<i64> {
        let l = self.guard.policy().token_lifetimes();
        match ttl_ms {
            0 => Ok(l.default_ms),
            t if (1..=l.max_ms).contains(&t) => Ok(t),
            _ => Err(ServiceError::InvalidArgument(
                "ttl exceeds the longest token lifetime the access policy allows ([tokens] max_ttl)",
            )),
        }
    }

    /// `CreateToken`: a scoped token; its id, expiry and the token (shown once). Where
    /// the quorum policy gates `CreateToken`, the approval request made for it instead
    /// (the caller must then send the hash of a token it made: `token_sha256`).
    pub async fn create_token(&self, caller: &Caller, t: NewToken) -> Result<TokenOutcome> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::CreateToken>(caller, Scope::none())
            .await?;
        check_new(&t)?;
        let ttl_ms = self.lifetime(t.ttl_ms)?;
        let supplied = t.token_sha256.as_deref().map(parse_sha256).transpose()?;
        if self.gate.needs_quorum(Operation::CreateToken) {
            let Some(hash) = supplied else {
                return Err(ServiceError::InvalidArgument(
                    "CreateToken waits for quorum approval on this server: make the token \
                     yourself (arca_ + 64 random hex digits) and send only its SHA-256 in \
                     token_sha256 (`arca token create` does this)",
                ));
            };
            let mut p = Parameters::new();
            p.insert(PARAM_TOKEN_PRINCIPAL.into(), t.principal);
            p.insert(PARAM_TOKEN_ROLES.into(), join(&t.roles));
            p.insert(PARAM_TOKEN_KEYS.into(), join(&t.key_globs));
            p.insert(PARAM_TOKEN_CIDRS.into(), join(&t.cidrs));
            p.insert(
                PARAM_TOKEN_BOUND.into(),
                t.bound_principal.unwrap_or_default(),
            );
            p.insert(PARAM_TOKEN_DESCRIPTION.into(), t.description);
            p.insert(PARAM_TOKEN_TTL.into(), (ttl_ms / 1000).max(1).to_string());
            p.insert(PARAM_TOKEN_SHA256.into(), hash.to_hex());
            let req = self.gate.open(&proof, Operation::CreateToken, p).await?;
            return Ok(TokenOutcome::Pending(Box::new(req)));
        }
        let (hash, token) = match supplied {
            Some(h) => (h, None),
            None => {
                let secret = crate::secret::random::<32>().map_err(ServiceError::internal)?;
                let token = BearerToken::from_random(&secret);
                (token.hash(), Some(token))
            }
        };
        let now = self.ctx.clock.now_ms();
        let record = self.stamped(new_record(t, hash, now, ttl_ms)?).await?;
        match self.ctx.db(&proof).insert_token(&record).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists) => {
                return Err(ServiceError::AlreadyExists("a token with this hash exists"))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(token_id = %record.id, by = %caller.principal.name, "token created");
        Ok(TokenOutcome::Done(Box::new(record), token))
    }

    /// Runs an approved `CreateToken`: stores the requester's token hash, stamped (ADR
    /// 12), with the request's `EXECUTED` mark; its lifetime starts now and is checked
    /// against the access policy in force.
    pub async fn run_create_token(
        &self,
        req: &ApprovalRecord,
        ok: &QuorumApproved,
    ) -> Result<String> {
        const BAD: ServiceError = ServiceError::InvalidArgument("invalid request parameters");
        let p = &req.parameters;
        let get = |k: &str| p.get(k).map(String::as_str).ok_or(BAD);
        let t = NewToken {
            principal: get(PARAM_TOKEN_PRINCIPAL)?.to_string(),
            roles: split(get(PARAM_TOKEN_ROLES)?),
            key_globs: split(get(PARAM_TOKEN_KEYS)?),
            ttl_ms: 0,
            cidrs: split(get(PARAM_TOKEN_CIDRS)?),
            bound_principal: Some(get(PARAM_TOKEN_BOUND)?.to_string()).filter(|b| !b.is_empty()),
            description: get(PARAM_TOKEN_DESCRIPTION)?.to_string(),
            token_sha256: None,
        };
        check_new(&t)?;
        let secs: i64 = get(PARAM_TOKEN_TTL)?.parse().map_err(|_| BAD)?;
        let ttl_ms = secs.checked_mul(1000).ok_or(BAD)?;
        if ttl_ms <= 0 || ttl_ms > self.guard.policy().token_lifetimes().max_ms {
            return Err(ServiceError::FailedPrecondition(
                "the token lifetime exceeds the access policy's max_ttl in force",
            ));
        }
        let hash = parse_sha256(get(PARAM_TOKEN_SHA256)?)?;
        let now = self.ctx.clock.now_ms();
        let record = self.stamped(new_record(t, hash, now, ttl_ms)?).await?;
        self.ctx
            .db(ok)
            .complete_create_token(&req.id, ok, &record, now)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => {
                    ServiceError::AlreadyExists("a token with this hash exists")
                }
                e => request_conflict(e),
            })?;
        tracing::warn!(
            request = %req.id,
            token_id = %record.id,
            principal = %record.principal,
            requester = %req.requester,
            "token created on approval"
        );
        Ok(format!(
            "token {} for {} (requested by {}) valid until {}",
            record.id,
            record.principal,
            req.requester,
            crate::clock::rfc3339(now + ttl_ms)
        ))
    }
}

impl Tokens {
    /// `record` with its state MAC (ADR 12) while unsealed; as it is while sealed (the
    /// bootstrap token, made before init: the init ceremony vouches for it).
    async fn stamped(&self, mut record: TokenRecord) -> Result<TokenRecord> {
        record.mac = None;
        if self.ctx.engine.is_open() {
            record.mac = Some(self.ctx.stamp(token_row(&record)).await?);
        }
        Ok(record)
    }

    /// `RevokeToken`: revoked at once here, within the authentication cache's lifetime on
    /// other nodes.
    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<()> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::RevokeToken>(caller, Scope::none())
            .await?;
        let now = self.ctx.clock.now_ms();
        match self.ctx.db(&proof).revoke_token(id, now).await {
            Ok(()) => {
                self.ctx.auth.forget_token(id);
                tracing::info!(token_id = id, by = %caller.principal.name, "token revoked");
                Ok(())
            }
            Err(StoreError::NotFound) => Err(ServiceError::NotFound("token not found")),
            Err(StoreError::Conflict(_)) => Err(ServiceError::Conflict(Conflict::TokenRevoked)),
            Err(e) => Err(e.into()),
        }
    }

    /// `ListTokens`: every token (hashes only).
    pub async fn list_tokens(&self, caller: &Caller) -> Result<Vec<TokenInfo>> {
        self.ctx.engine()?;
        let proof = self
            .guard
            .authorize::<act::ListTokens>(caller, Scope::none())
            .await?;
        Ok(self
            .ctx
            .db(&proof)
            .list_tokens()
            .await?
            .into_iter()
            .map(|record| TokenInfo { record })
            .collect())
    }

    /// Start-up wiring: mints a bearer token for `principal` with `roles`, stores its
    /// hash, and returns it (the only time the token exists outside its holder).
    pub async fn issue(
        &self,
        permit: &impl Permit,
        principal: &str,
        roles: &[&str],
    ) -> Result<BearerToken> {
        let secret = crate::secret::random::<32>().map_err(ServiceError::internal)?;
        let token = BearerToken::from_random(&secret);
        self.ensure(permit, &token, principal, roles).await?;
        Ok(token)
    }

    /// Start-up wiring outside dev mode: mints the bootstrap admin token (for the init
    /// ceremony), once in the life of the database, valid for [`BOOTSTRAP_TTL_MS`].
    /// Refused (`FailedPrecondition`) when one was issued already: it is never minted
    /// again, so a deleted token file and a restart give nobody a new admin token.
    /// Recorded in the audit trail.
    pub async fn issue_bootstrap(
        &self,
        permit: &impl Permit,
        principal: &str,
        roles: &[&str],
    ) -> Result<(TokenRecord, BearerToken)> {
        let db = self.ctx.db(permit);
        if let Some(earlier) = db
            .list_tokens()
            .await?
            .into_iter()
            .find(|t| t.description == BOOTSTRAP_DESCRIPTION)
        {
            return Err(ServiceError::FailedPrecondition(
                if earlier.revoked_at.is_some() {
                    "the bootstrap token was issued once and revoked; it is not minted again"
                } else {
                    "the bootstrap token was issued once already; it is not minted again"
                },
            ));
        }
        let secret = crate::secret::random::<32>().map_err(ServiceError::internal)?;
        let token = BearerToken::from_random(&secret);
        let roles = roles.iter().map(|r| r.to_string()).collect();
        let now = self.ctx.clock.now_ms();
        let mut record = unscoped_record(&token, principal.to_string(), roles, now)?;
        record.expires_at = Some(now + BOOTSTRAP_TTL_MS);
        record.description = BOOTSTRAP_DESCRIPTION.to_string();
        let record = self.stamped(record).await?;
        db.insert_token(&record).await?;
        self.ctx.record_job(
            "token.bootstrap_issued",
            true,
            None,
            &format!(
                "token_id={} expires_at_ms={}",
                record.id,
                now + BOOTSTRAP_TTL_MS
            ),
        );
        tracing::warn!(token_id = %record.id, "bootstrap admin token issued (once; it expires in 24 h)");
        Ok((record, token))
    }

    /// Start-up wiring: registers an existing token (e.g. the dev token kept in the data
    /// dir) if the store does not know it.
    pub async fn ensure(
        &self,
        permit: &impl Permit,
        token: &BearerToken,
        principal: &str,
        roles: &[&str],
    ) -> Result<()> {
        let db = self.ctx.db(permit);
        match db.token_by_hash(&token.hash()).await {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => {
                let roles = roles.iter().map(|r| r.to_string()).collect();
                let now = self.ctx.clock.now_ms();
                let record = unscoped_record(token, principal.to_string(), roles, now)?;
                db.insert_token(&self.stamped(record).await?).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
