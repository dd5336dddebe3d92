//! Principals, authentication and authorization.
//!
//! A request is authenticated once, here ([`Authenticator::authenticate`]), into a
//! [`Principal`], by one of two methods ([`AuthMethod`]):
//! - **Bearer token** (`authorization: Bearer arca_…`): Arca hashes it (SHA-256) and looks
//!   the hash up (a verified token is cached for [`TOKEN_CACHE_TTL`]); only hashes are
//!   stored. A token carries its principal, the roles it narrows to, key-name globs, an
//!   optional expiry, an optional CIDR allow-list and an optional binding to a
//!   certificate principal; the last two are checked on every request, cached or not.
//! - **Client certificate** under mutual TLS, when no token is presented: the principal
//!   is the name the verified certificate carries ([`cert`]: URI SAN, else DNS SAN, else
//!   CN), with no narrowing; names reserved for tokens (`custodian:`) are refused.
//!
//! Either way the roles a principal holds come from the access policy's bindings
//! ([`policy::Policy::roles_of`]), narrowed by a token's roles. Authorization is
//! [`policy::Policy::authorize`], the one decision over roles, bindings and key globs from
//! `policies/*.toml` (default deny); [`ratelimit`] holds the per-principal and per-role
//! rate limits.
//!
//! Invariants:
//! - A token that is unknown, revoked or expired, used from outside its networks or
//!   without its bound certificate, and a request with neither a token nor a usable
//!   certificate, all fail with the same [`AuthError::Unauthenticated`] (the caller
//!   learns nothing more).
//! - A revocation takes effect within [`TOKEN_CACHE_TTL`] on every node (at once on the
//!   node that revoked, [`Authenticator::forget_token`]).
//! - Token text never reaches a log, an error or a record.
//! - Unsealed, a token row counts only if its state MAC verifies under the HSM
//!   ([`stamp`], ADR 12): a row inserted or changed by a database writer is refused.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

pub mod cert;
pub mod policy;
pub mod ratelimit;
pub mod stamp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::keys::state::Unverified;
use crate::keys::KeyEngine;
use crate::secret::{BearerToken, TokenHash};
use crate::store::{Store, StoreError};
use stamp::{Checked, Stamps};

/// How long a verified token is trusted without asking the store again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_millis(500);

/// How a principal proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer token, by its public id.
    Token {
        /// The token's id (not the secret).
        token_id: String,
    },
    /// A client certificate verified by mutual TLS, with no bearer token.
    Certificate,
}

/// Principal-name prefix of custodian identities.
pub const CUSTODIAN_PREFIX: &str = "custodian:";

/// Principal names a certificate can never carry: custodian identities exist only as the
/// tokens minted at init and rekey.
const RESERVED_PREFIXES: &[&str] = &[CUSTODIAN_PREFIX];

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Stable name (`dev-admin`, `svc:billing`, a certificate's SAN...).
    pub name: String,
    /// How it authenticated.
    pub method: AuthMethod,
    /// The roles its token narrows it to (empty: no narrowing, as for a certificate).
    /// The roles it holds are the policy's bindings for `name` narrowed by these.
    pub roles: Vec<String>,
    /// Key-name globs its credential is scoped to; empty = no scope limit.
    pub key_globs: Vec<String>,
}

impl Principal {
    /// Whether the credential's scope covers the key `name`.
    pub fn may_use_key(&self, name: &str) -> bool {
        self.key_globs.is_empty() || self.key_globs.iter().any(|g| glob_match(g, name))
    }
}

/// A TOTP code a request carries (`x-arca-totp`) as its second factor. Short-lived and
/// single-use, but still never printed: `Debug` shows `[REDACTED]`. `Clone` because the
/// [`Caller`](crate::service::Caller) that carries it is cloned per request.
#[derive(Clone)]
pub struct TotpCode(zeroize::Zeroizing<String>);

impl TotpCode {
    /// Wraps a presented code.
    pub fn new(code: String) -> Self {
        TotpCode(zeroize::Zeroizing::new(code))
    }

    /// The code, for verification only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TotpCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpCode([REDACTED])")
    }
}

/// Where a request came from, as the transport saw it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Source address.
    pub ip: Option<std::net::IpAddr>,
    /// Verified client certificate (DER) under mutual TLS.
    pub cert: Option<Arc<[u8]>>,
}

/// `*` matches any run of characters (including `/`); everything else is literal.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether some name matches both globs `a` and `b` (`*` as in [`glob_match`]): the two
/// patterns are walked together, a `*` on either side taking any run of the other's
/// characters (and stars).
pub fn globs_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (la, lb) = (a.len(), b.len());
    // ok[i][j]: a[i..] and b[j..] have a common match. Filled from the ends backwards.
    let mut ok = vec![vec![false; lb + 1]; la + 1];
    for i in (0..=la).rev() {
        for j in (0..=lb).rev() {
            ok[i][j] = if i == la && j == lb {
                true
            } else if i < la && a[i] == b'*' {
                ok[i + 1][j] || (j < lb && ok[i][j + 1])
            } else if j < lb && b[j] == b'*' {
                ok[i][j + 1] || (i < la && ok[i + 1][j])
            } else {
                i < la && j < lb && a[i] == b[j] && ok[i + 1][j + 1]
            };
        }
    }
    ok[0][0]
}

/// A network in CIDR notation (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `addr/bits` or a bare address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let net: std::net::IpAddr = addr.parse().ok()?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { net, bits })
    }

    /// Whether `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
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
    /// The token's row is not authenticated by the HSM (ADR 12): refused. `first`: the
    /// first time this row was refused on this node (alert once).
    #[error("token row refused: {why}")]
    Forged {
        /// Why.
        why: Unverified,
        /// First refusal of this row here.
        first: bool,
        /// The row's token id (public).
        token_id: String,
    },
    /// The HSM could not check the row.
    #[error("state check failed")]
    Check(#[source] crate::keys::KeysError),
}

/// A verified token, as cached.
struct Verified {
    hash: TokenHash,
    expires_at: Option<i64>,
    cidrs: Vec<Cidr>,
    bound_principal: Option<String>,
    principal: Arc<Principal>,
    checked: Instant,
    /// Whether the row's state MAC was verified (false only while sealed, when no HSM
    /// can check it; such an entry is never used once unsealed).
    stamped: bool,
}

impl Verified {
    /// Source-address and certificate-binding checks, on every request.
    fn allows(&self, peer: &Peer) -> bool {
        let from_ok = self.cidrs.is_empty()
            || peer
                .ip
                .is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(ip)));
        let bound_ok = match &self.bound_principal {
            None => true,
            Some(want) => peer
                .cert
                .as_deref()
                .and_then(cert::principal_from_der)
                .is_some_and(|got| crate::secret::ct_eq(got.as_bytes(), want.as_bytes())),
        };
        from_ok && bound_ok
    }
}

/// Verifies bearer tokens against the store, with a short cache.
pub struct Authenticator {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    stamps: Arc<Stamps>,
}

impl Authenticator {
    /// Without a bearer token: the principal named by the client certificate that mutual
    /// TLS verified (URI SAN, else DNS SAN, else CN), with the roles the policy binds to
    /// that name and no token narrowing. No certificate (or one naming nothing usable, or
    /// a reserved name): unauthenticated.
    fn certificate_principal(peer: &Peer) -> Result<Arc<Principal>, AuthError> {
        let name = peer
            .cert
            .as_deref()
            .and_then(cert::principal_from_der)
            .ok_or(AuthError::Unauthenticated)?;
        if name.is_empty()
            || name.len() > 256
            || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            return Err(AuthError::Unauthenticated);
        }
        Ok(Arc::new(Principal {
            name,
            method: AuthMethod::Certificate,
            roles: Vec::new(),
            key_globs: Vec::new(),
        }))
    }

    /// A new authenticator over `store`, remembering verified rows in `stamps`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, stamps: Arc<Stamps>) -> Self {
        Authenticator {
            store,
            clock,
            cache: Mutex::new(HashMap::new()),
            stamps,
        }
    }

    /// Authenticates a presented bearer token (`None` when the request had none), from
    /// `peer`. A token limited to networks or bound to a certificate principal works only
    /// from there. With `engine` (unsealed), the token's row must carry a valid state MAC
    /// (ADR 12); without (sealed), the row is taken as stored, for the calls a sealed
    /// node serves (seal status, unseal, init), and that answer is never reused unsealed.
    pub async fn authenticate(
        &self,
        token: Option<BearerToken>,
        peer: &Peer,
        engine: Option<&KeyEngine>,
    ) -> Result<Arc<Principal>, AuthError> {
        let Some(token) = token else {
            return Self::certificate_principal(peer);
        };
        if !token.expose().starts_with(BearerToken::PREFIX) {
            return Err(AuthError::Unauthenticated);
        }
        let hash = token.hash();
        let now = self.clock.now_ms();
        if let Some(v) = self.cached(&hash, now, peer, engine.is_some()) {
            return v;
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
        if let Some(engine) = engine {
            let row = stamp::token_row(&record);
            match self
                .stamps
                .check(engine, row, record.mac.as_deref())
                .await
                .map_err(AuthError::Check)?
            {
                Checked::Good => {}
                Checked::Refused { why, first } => {
                    return Err(AuthError::Forged {
                        why,
                        first,
                        token_id: record.id,
                    })
                }
            }
        }
        let verified = Verified {
            hash,
            expires_at: record.expires_at,
            // A stored CIDR that does not parse matches nothing (fail closed).
            cidrs: record
                .cidrs
                .iter()
                .map(|c| {
                    Cidr::parse(c).unwrap_or(Cidr {
                        net: std::net::Ipv4Addr::UNSPECIFIED.into(),
                        bits: 255,
                    })
                })
                .collect(),
            bound_principal: record.bound_principal,
            principal: Arc::new(Principal {
                name: record.principal,
                method: AuthMethod::Token {
                    token_id: record.id,
                },
                roles: record.roles,
                key_globs: record.key_globs,
            }),
            checked: Instant::now(),
            stamped: engine.is_some(),
        };
        let result = if verified.allows(peer) {
            Ok(Arc::clone(&verified.principal))
        } else {
            Err(AuthError::Unauthenticated)
        };
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(hash.0, verified);
        }
        result
    }

    /// Drops a token from this node's cache (after revocation here, so it stops working
    /// at once on this node; other nodes see it within [`TOKEN_CACHE_TTL`]).
    pub fn forget_token(&self, token_id: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|_, v| match &v.principal.method {
                AuthMethod::Token { token_id: id } => id != token_id,
                AuthMethod::Certificate => true,
            });
        }
    }

    fn cached(
        &self,
        hash: &TokenHash,
        now: i64,
        peer: &Peer,
        unsealed: bool,
    ) -> Option<Result<Arc<Principal>, AuthError>> {
        let c = self.cache.lock().ok()?;
        let v = c.get(&hash.0)?;
        let fresh = v.checked.elapsed() < TOKEN_CACHE_TTL
            && (v.stamped || !unsealed)
            && v.hash == *hash
            && v.expires_at.is_none_or(|exp| exp > now);
        if !fresh {
            return None;
        }
        Some(if v.allows(peer) {
            Ok(Arc::clone(&v.principal))
        } else {
            Err(AuthError::Unauthenticated)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, ok) in [
            ("billing/*", "billing/ssn", true),
            ("billing/*", "billing/a/b", true),
            ("billing/*", "patients/x", false),
            ("billing/*", "billing", false),
            ("*", "anything", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, n), ok, "{p} ~ {n}");
        }
    }

    #[test]
    fn glob_overlaps() {
        for (a, b, ok) in [
            ("custodian:*", "svc:*", false),
            ("custodian:*", "*", true),
            ("custodian:*", "custodian:alice", true),
            ("custodian:alice", "custodian:bob", false),
            ("*:alice", "custodian:*", true),
            ("a*b", "*c", false),
            ("a*c", "*c", true),
            ("dev-admin", "custodian:*", false),
            ("*x*", "*y*", true),
            ("x", "x*", true),
            ("x", "xy*", false),
            ("", "*", true),
            ("", "a", false),
        ] {
            assert_eq!(globs_overlap(a, b), ok, "{a} ∩ {b}");
            assert_eq!(globs_overlap(b, a), ok, "{b} ∩ {a}");
        }
    }

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
        let c = Cidr::parse("10.0.0.0/8");
        assert!(c.is_some_and(
            |c| c.contains(ip("10.1.2.3").unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()))
        ));
        assert!(c.is_some_and(
            |c| !c.contains(ip("11.0.0.1").unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()))
        ));
        let l = Cidr::parse("127.0.0.1");
        assert!(l.is_some_and(|c| c
            .contains(ip("::ffff:127.0.0.1").unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()))));
        assert!(Cidr::parse("::1/128").is_some_and(
            |c| c.contains(ip("::1").unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()))
        ));
        assert!(Cidr::parse("0.0.0.0/0").is_some_and(
            |c| c.contains(ip("8.8.8.8").unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()))
        ));
        for bad in ["10.0.0.0/33", "x", "::/129", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }
}
