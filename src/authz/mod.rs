//! Principals and authentication.
//!
//! A request is authenticated once, here, into a [`Principal`]. Today the credential is a
//! bearer token (`authorization: Bearer arca_…`): Arca hashes it (SHA-256) and looks the
//! hash up; only hashes are stored. Client certificates join as a second method with
//! mutual TLS.
//!
//! Invariants:
//! - A token that is unknown, revoked or expired authenticates nobody, and every such
//!   failure is the same [`AuthError::Unauthenticated`] (the caller learns nothing more).
//! - A revocation takes effect within [`TOKEN_CACHE_TTL`] on every node.
//! - Token text never reaches a log, an error or a record.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

pub mod cert;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::secret::{BearerToken, TokenHash};
use crate::store::{Store, StoreError};

/// How long a verified token is trusted without asking the store again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(1);

/// How a principal proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer token, by its public id.
    Token {
        /// The token's id (not the secret).
        token_id: String,
    },
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Stable name (`dev-admin`, `svc:billing`, a certificate's SAN...).
    pub name: String,
    /// How it authenticated.
    pub method: AuthMethod,
    /// Roles granted to it.
    pub roles: Vec<String>,
}

/// Authentication failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one that proves nothing. One variant for every reason.
    #[error("unauthenticated")]
    Unauthenticated,
    /// The token store could not be consulted.
    #[error("token store unavailable")]
    Store(#[source] StoreError),
}

/// A verified token, as cached.
struct Verified {
    hash: TokenHash,
    expires_at: Option<i64>,
    principal: Arc<Principal>,
    checked: Instant,
}

/// Verifies bearer tokens against the store, with a short cache.
pub struct Authenticator {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

impl Authenticator {
    /// A new authenticator over `store`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Authenticator {
            store,
            clock,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Authenticates a presented bearer token (`None` when the request had none).
    pub async fn authenticate(
        &self,
        token: Option<BearerToken>,
    ) -> Result<Arc<Principal>, AuthError> {
        let token = token.ok_or(AuthError::Unauthenticated)?;
        if !token.expose().starts_with(BearerToken::PREFIX) {
            return Err(AuthError::Unauthenticated);
        }
        let hash = token.hash();
        let now = self.clock.now_ms();
        if let Some(p) = self.cached(&hash, now) {
            return Ok(p);
        }
        let record = match self.store.token_by_hash(&hash).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(AuthError::Unauthenticated),
            Err(e) => return Err(AuthError::Store(e)),
        };
        // The store matched the hash; compare again in constant time before trusting it.
        if record.hash != hash || record.revoked_at.is_some() {
            return Err(AuthError::Unauthenticated);
        }
        if record.expires_at.is_some_and(|exp| exp <= now) {
            return Err(AuthError::Unauthenticated);
        }
        let principal = Arc::new(Principal {
            name: record.principal,
            method: AuthMethod::Token {
                token_id: record.id,
            },
            roles: record.roles,
        });
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(
                hash.0,
                Verified {
                    hash,
                    expires_at: record.expires_at,
                    principal: Arc::clone(&principal),
                    checked: Instant::now(),
                },
            );
        }
        Ok(principal)
    }

    fn cached(&self, hash: &TokenHash, now: i64) -> Option<Arc<Principal>> {
        let c = self.cache.lock().ok()?;
        let v = c.get(&hash.0)?;
        let fresh = v.checked.elapsed() < TOKEN_CACHE_TTL
            && v.hash == *hash
            && v.expires_at.is_none_or(|exp| exp > now);
        fresh.then(|| Arc::clone(&v.principal))
    }
}
