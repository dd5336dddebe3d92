//! Token administration: create (the token is shown once), list (never the token),
//! revoke (effective on every node within the authentication cache TTL, 1 s). Token
//! administration answers only while unsealed (DESIGN §2), to principals the access
//! policy allows.

use super::{Caller, KeyService, Result, ServiceError};
use crate::authz::policy::Action;
use crate::authz::Cidr;
use crate::quorum::crypto;
use crate::secret::BearerToken;
use crate::store::{StoreError, TokenRecord};

/// Longest token lifetime (one year).
pub const MAX_TTL_MS: i64 = 365 * 24 * 3600 * 1000;

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

impl KeyService {
    /// Mints a scoped token; returns its id and the token (shown once).
    pub async fn create_token(
        &self,
        caller: &Caller,
        t: NewToken,
    ) -> Result<(String, BearerToken)> {
        self.engine()?;
        self.authorize(caller, Action::CreateToken, None, None)
            .await?;
        if !valid_name(&t.principal) || t.roles.iter().any(|r| !valid_name(r)) {
            return Err(ServiceError::InvalidArgument(
                "invalid principal or role name",
            ));
        }
        // Custodian identities are issued only by the init ceremony: an admin must not be
        // able to mint one (the identity half of dual control).
        if t.principal.starts_with(super::seal::CUSTODIAN_PREFIX)
            || t.roles.iter().any(|r| r == "custodian")
        {
            return Err(ServiceError::InvalidArgument(
                "custodian identities come only from the init ceremony",
            ));
        }
        if t.key_globs.iter().any(|g| !valid_glob(g)) {
            return Err(ServiceError::InvalidArgument(
                "key globs are 1-128 of [a-z0-9_/-] and *",
            ));
        }
        if t.cidrs.iter().any(|c| Cidr::parse(c).is_none()) {
            return Err(ServiceError::InvalidArgument("invalid CIDR"));
        }
        if t.bound_principal.as_deref().is_some_and(|p| !valid_name(p)) {
            return Err(ServiceError::InvalidArgument("invalid bound principal"));
        }
        if !(0..=MAX_TTL_MS).contains(&t.ttl_ms) {
            return Err(ServiceError::InvalidArgument(
                "ttl must be 0 (none) to 365 days",
            ));
        }
        if t.description.len() > 1024 {
            return Err(ServiceError::InvalidArgument(
                "description longer than 1024 bytes",
            ));
        }
        let internal = |e| ServiceError::Internal(Box::new(e));
        let secret = crypto::random::<32>().map_err(internal)?;
        let id = crypto::random::<8>().map_err(internal)?;
        let token = BearerToken::from_random(&secret);
        let now = self.clock.now_ms();
        let id = format!("tok_{}", hex::encode(id.as_ref()));
        self.store
            .insert_token(&TokenRecord {
                id: id.clone(),
                hash: token.hash(),
                principal: t.principal,
                roles: t.roles,
                created_at: now,
                expires_at: (t.ttl_ms > 0).then_some(now + t.ttl_ms),
                revoked_at: None,
                key_globs: t.key_globs,
                cidrs: t.cidrs,
                bound_principal: t.bound_principal,
                description: t.description,
            })
            .await?;
        tracing::info!(token_id = %id, by = %caller.principal.name, "token created");
        Ok((id, token))
    }

    /// Revokes a token at once.
    pub async fn revoke_token(&self, caller: &Caller, id: &str) -> Result<()> {
        self.engine()?;
        self.authorize(caller, Action::RevokeToken, None, None)
            .await?;
        match self.tokens.revoke_token(id, self.clock.now_ms()).await {
            Ok(()) => {
                self.auth.forget_token(id);
                tracing::info!(token_id = id, by = %caller.principal.name, "token revoked");
                Ok(())
            }
            Err(StoreError::NotFound) => Err(ServiceError::NotFound("token not found")),
            Err(StoreError::Conflict(_)) => {
                Err(ServiceError::FailedPrecondition("token already revoked"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every token (hashes only).
    pub async fn list_tokens(&self, caller: &Caller) -> Result<Vec<TokenInfo>> {
        self.engine()?;
        self.authorize(caller, Action::ListTokens, None, None)
            .await?;
        Ok(self
            .tokens
            .list_tokens()
            .await?
            .into_iter()
            .map(|record| TokenInfo { record })
            .collect())
    }
}
