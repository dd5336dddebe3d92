//! Server configuration, validated once at start-up. Secrets (the HSM PIN) are referenced
//! by file, never given inline, and the `Debug` of every type here prints no secret: a
//! database URL (which may carry a password) prints with the password redacted, and
//! errors about it never quote it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

/// Where the HSM is and how to use it.
#[derive(Clone, Debug)]
pub struct HsmSettings {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token holding Arca's keys.
    pub token_label: String,
    /// File holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    /// PKCS#11 sessions kept open (and worker threads using them).
    pub sessions: usize,
    /// Copy token keys into session objects for speed (they stay non-extractable).
    pub session_key_copies: bool,
    /// How long a request waits for the HSM.
    pub op_timeout: Duration,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything `arca server` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Dev mode: plaintext on loopback, local SoftHSM token, auto-setup.
    pub dev: bool,
    /// Stamp rows without a state MAC at unseal (`--restamp-unstamped`; dev mode).
    pub restamp_unstamped: bool,
    /// Data directory (default SQLite file, dev token, SoftHSM token in dev mode).
    pub data_dir: PathBuf,
    /// Where the state lives.
    pub database: Database,
    /// HSM settings.
    pub hsm: HsmSettings,
    /// Wraps reserved in the database at a time per version.
    pub wrap_reservation: u64,
    /// Request limits.
    pub serve: crate::grpc::ServeOptions,
    /// Per-principal rate limit.
    pub rate_limit: Option<crate::authz::ratelimit::Limit>,
    /// Which operations wait for K-of-N approval (`policies/quorum.toml`).
    pub quorum_policy: crate::quorum::policy::QuorumPolicy,
    /// Waiting periods, rotation bounds, usage limit (`policies/lifecycle.toml`).
    pub lifecycle: crate::keys::policy::LifecyclePolicy,
    /// How the lifecycle jobs run.
    pub jobs: crate::service::JobConfig,
    /// The access policy read at start, and the directory it came from (re-read on
    /// SIGHUP); `None` for the built-in copy of the shipped files.
    pub access_policy: (crate::authz::policy::Policy, Option<PathBuf>),
    /// How dev mode reaches an unsealed service.
    pub dev_quorum: DevQuorum,
    /// TLS files (required outside dev mode, with a client CA).
    pub tls: Option<crate::grpc::tls::TlsFiles>,
    /// The audit trail, alerts and metrics.
    pub audit: AuditSettings,
}

/// Audit trail, alert and metrics settings.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// False only with `--no-audit` (dev-mode benchmarks).
    pub enabled: bool,
    /// This node's name in records.
    pub node: String,
    /// The checkpoint file (JSON lines).
    pub checkpoints: PathBuf,
    /// How long a call waits for its record to be durable.
    pub timeout: Duration,
    /// Places for audit records (calls in progress plus records waiting for the writer).
    pub queue: usize,
    /// Alert rules.
    pub alerts: crate::audit::alerts::AlertPolicy,
    /// Webhook for alerts (`http://` only).
    pub webhook: Option<String>,
    /// Admin HTTP address of the Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

/// Dev mode's dual-control set-up.
#[derive(Clone, Debug)]
pub enum DevQuorum {
    /// 1-of-1, share kept in the data dir, auto-unseal at start.
    OneOfOne,
    /// K-of-N custodians with kits written under the data dir; starts sealed.
    Custodians {
        /// N.
        custodians: u8,
        /// K.
        threshold: u8,
    },
    /// No dual control: open the HSM with the PIN in this file (an external token).
    PinFile(PathBuf),
    /// Outside dev mode: start sealed; custodians unseal (after `arca operator init`).
    Sealed,
}

/// The database of a node: one SQLite file (a single node), or a PostgreSQL server that
/// several nodes share.
#[derive(Clone)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://…`), possibly with a password.
    Postgres(DatabaseUrl),
}

/// Why a `--database` value was refused. The messages never quote the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatabaseError {
    /// Empty value.
    #[error("the database URL is empty")]
    Empty,
    /// A URL scheme other than postgres, postgresql or sqlite.
    #[error("unsupported database URL scheme {0:?} (use postgres://… or sqlite://…)")]
    UnsupportedScheme(String),
    /// `sqlite://PATH?…`: Arca sets the SQLite options itself.
    #[error("a SQLite database URL takes no parameters (Arca sets them)")]
    SqliteParameters,
    /// `sqlite::memory:` and friends: state must survive a restart.
    #[error("an in-memory SQLite database is not supported")]
    SqliteInMemory,
    /// A PostgreSQL host off this machine without `sslmode=verify-full`.
    #[error(
        "PostgreSQL on another host needs sslmode=verify-full (with sslrootcert=CA-FILE) in \
         the database URL; sslmode={0} would not check the server's certificate"
    )]
    UnverifiedTls(String),
}

impl Database {
    /// Parses a `--database` value: `postgres://…` or `postgresql://…` is PostgreSQL;
    /// `sqlite://PATH`, `sqlite:PATH` or a plain path is a SQLite file.
    pub fn parse(s: &str) -> Result<Self, DatabaseError> {
        if s.is_empty() {
            return Err(DatabaseError::Empty);
        }
        match url_scheme(s) {
            Some(scheme)
                if scheme.eq_ignore_ascii_case("postgres")
                    || scheme.eq_ignore_ascii_case("postgresql") =>
            {
                Ok(Database::Postgres(DatabaseUrl(Zeroizing::new(
                    s.to_string(),
                ))))
            }
            Some(scheme) if scheme.eq_ignore_ascii_case("sqlite") => {
                let rest = &s[scheme.len() + 1..];
                sqlite_path(rest.strip_prefix("//").unwrap_or(rest))
            }
            Some(scheme) => Err(DatabaseError::UnsupportedScheme(scheme.to_string())),
            None => sqlite_path(s),
        }
    }
}

fn sqlite_path(path: &str) -> Result<Database, DatabaseError> {
    if path.is_empty() {
        return Err(DatabaseError::Empty);
    }
    if path.contains(':') && path.contains("memory") {
        return Err(DatabaseError::SqliteInMemory);
    }
    if path.contains('?') {
        return Err(DatabaseError::SqliteParameters);
    }
    Ok(Database::Sqlite(PathBuf::from(path)))
}

/// The scheme of `scheme:…` if `s` starts with a valid one (RFC 3986: a letter, then
/// letters, digits, `+`, `-`, `.`) followed by `://`, or is `sqlite:…`. A plain path
/// (even one holding a colon) has none.
fn url_scheme(s: &str) -> Option<&str> {
    let colon = s.find(':')?;
    let scheme = &s[..colon];
    let valid = scheme
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'));
    let url_like = s[colon..].starts_with("://") || scheme.eq_ignore_ascii_case("sqlite");
    (valid && url_like).then_some(scheme)
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Database::Postgres(url) => fmt::Display::fmt(url, f),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A database URL that may carry a password. `Display` and `Debug` redact the password
/// (in the user-info part and in a `password=` parameter); [`DatabaseUrl::expose`] is for
/// the driver only. Zeroized on drop.
#[derive(Clone)]
pub struct DatabaseUrl(Zeroizing<String>);

impl DatabaseUrl {
    /// The URL, password included: hand it to the database driver and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The host named in the URL (`""` when it names none, e.g. a unix socket given by a
    /// `host=` parameter).
    pub fn host(&self) -> &str {
        let rest = self.0.split_once("://").map_or("", |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some(v6) = authority.strip_prefix('[') {
            return v6.split(']').next().unwrap_or("");
        }
        authority.split(':').next().unwrap_or("")
    }

    /// Whether the URL names a host on this machine: no host (a unix socket), `localhost`
    /// or a loopback address.
    pub fn is_local(&self) -> bool {
        // A `host=` (or `hostaddr=`) parameter overrides the URL's host for the driver.
        let host = self
            .param("hostaddr")
            .or_else(|| self.param("host"))
            .unwrap_or_else(|| self.host());
        host.is_empty()
            || host.starts_with('/')
            || host.starts_with("%2F")
            || host.starts_with("%2f")
            || host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The value of the query parameter `name` (the last one, as the driver reads it;
    /// compared without case), undecoded.
    fn param(&self, name: &str) -> Option<&str> {
        let query = self.0.split_once('?')?.1;
        let query = query.split('#').next().unwrap_or(query);
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .next_back()
    }

    /// Refuses a URL that would carry Arca's state in the clear, or over TLS without
    /// checking who answers, to a host off this machine: such a URL must say
    /// `sslmode=verify-full` (the server's certificate chains to a trusted CA, by default
    /// the file in `sslrootcert`, and names the host). A local URL may say anything.
    pub fn check_transport(&self) -> Result<(), DatabaseError> {
        if self.is_local() {
            return Ok(());
        }
        match self.param("sslmode") {
            Some(mode) if mode.eq_ignore_ascii_case("verify-full") => Ok(()),
            Some(mode) => Err(DatabaseError::UnverifiedTls(mode.to_string())),
            None => Err(DatabaseError::UnverifiedTls("prefer".to_string())),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", redact_url(&self.0))
    }
}

const REDACTED: &str = "[REDACTED]";

/// `scheme://user:PASSWORD@host/db?password=PASSWORD&…` with both passwords replaced.
/// Errs on the side of hiding: everything up to the *last* `@` counts as user info (a
/// password with an unescaped `@` or `/` is still hidden), and every parameter whose name
/// mentions "password" is hidden.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return REDACTED.to_string();
    };
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        match u.split_once(':') {
            Some((user, _password)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            }
            None => out.push_str(u),
        }
        out.push('@');
    }
    match hostpart.split_once('?') {
        None => out.push_str(hostpart),
        Some((base, query)) => {
            out.push_str(base);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}={REDACTED}")
                    }
                    _ => p.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn pg(s: &str) -> DatabaseUrl {
        match Database::parse(s).unwrap() {
            Database::Postgres(u) => u,
            other => panic!("{s} parsed as {other}"),
        }
    }

    #[test]
    fn database_values_choose_the_back_end() {
        for (s, path) in [
            ("sqlite:///var/lib/arca/arca.db", "/var/lib/arca/arca.db"),
            ("sqlite://rel.db", "rel.db"),
            ("sqlite:rel.db", "rel.db"),
            ("/var/lib/arca/arca.db", "/var/lib/arca/arca.db"),
            ("data/arca.db", "data/arca.db"),
            ("odd:name.db", "odd:name.db"),
        ] {
            match Database::parse(s).unwrap() {
                Database::Sqlite(p) => assert_eq!(p, PathBuf::from(path), "{s}"),
                other => panic!("{s} parsed as {other}"),
            }
        }
        assert_eq!(pg("postgres://h/db").expose(), "postgres://h/db");
        assert_eq!(pg("PostgreSQL://h/db").expose(), "PostgreSQL://h/db");
        assert_eq!(
            Database::parse("mysql://u:pw@h/db").unwrap_err(),
            DatabaseError::UnsupportedScheme("mysql".into())
        );
        assert_eq!(Database::parse("").unwrap_err(), DatabaseError::Empty);
        assert_eq!(
            Database::parse("sqlite://").unwrap_err(),
            DatabaseError::Empty
        );
        assert_eq!(
            Database::parse("sqlite://a.db?mode=ro").unwrap_err(),
            DatabaseError::SqliteParameters
        );
        assert_eq!(
            Database::parse("sqlite::memory:").unwrap_err(),
            DatabaseError::SqliteInMemory
        );
    }

    #[test]
    fn a_remote_database_needs_verified_tls() {
        for url in [
            "postgres://arca@db.example/arca?sslmode=verify-full&sslrootcert=/etc/arca/db-ca.pem",
            "postgres://arca@10.0.0.5:5432/arca?SSLMODE=verify-full",
            "postgres://arca@127.0.0.1/arca",
            "postgres://arca@localhost/arca?sslmode=disable",
            "postgres://arca@[::1]:5432/arca",
            "postgresql:///arca?host=/run/postgresql",
        ] {
            assert_eq!(pg(url).check_transport(), Ok(()), "{url}");
        }
        for (url, mode) in [
            ("postgres://arca@db.example/arca", "prefer"),
            ("postgres://arca@db.example/arca?sslmode=require", "require"),
            (
                "postgres://arca@db.example/arca?sslmode=verify-ca",
                "verify-ca",
            ),
            (
                "postgres://arca@db.example/arca?sslmode=verify-full&sslmode=disable",
                "disable",
            ),
            ("postgres://arca@127.0.0.1/arca?host=db.example", "prefer"),
            ("postgresql:///arca?hostaddr=10.1.2.3", "prefer"),
        ] {
            assert_eq!(
                pg(url).check_transport(),
                Err(DatabaseError::UnverifiedTls(mode.to_string())),
                "{url}"
            );
        }
    }

    #[test]
    fn passwords_never_print() {
        for (url, shown) in [
            (
                "postgres://arca:s3cret@db.example:5432/arca",
                "postgres://arca:[REDACTED]@db.example:5432/arca",
            ),
            (
                "postgres://arca:p@ss/w:rd@db/arca?sslmode=disable",
                "postgres://arca:[REDACTED]@db/arca?sslmode=disable",
            ),
            (
                "postgres://arca@db/arca?password=s3cret&application_name=x",
                "postgres://arca@db/arca?password=[REDACTED]&application_name=x",
            ),
            (
                "postgresql:///arca?host=/run/postgresql&PassWord=s3cret",
                "postgresql:///arca?host=/run/postgresql&PassWord=[REDACTED]",
            ),
            ("postgres://db/arca", "postgres://db/arca"),
        ] {
            let u = pg(url);
            assert_eq!(u.to_string(), shown);
            assert_eq!(format!("{u:?}"), format!("DatabaseUrl({shown})"));
            let d = Database::parse(url).unwrap();
            assert_eq!(d.to_string(), shown);
            assert_eq!(format!("{d:?}"), shown);
            for secret in ["s3cret", "p@ss", "w:rd"] {
                assert!(!shown.contains(secret));
            }
        }
        // An unsupported scheme's error names the scheme only.
        let e = Database::parse("mysql://u:s3cret@h/db").unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn hosts() {
        for (url, host) in [
            ("postgres://u:pw@127.0.0.1:5432/db", "127.0.0.1"),
            ("postgres://localhost/db", "localhost"),
            ("postgres://u@[::1]:5432/db", "::1"),
            ("postgres://u:p@ss@db.example/db", "db.example"),
            ("postgres:///db?host=/run/postgresql", ""),
        ] {
            assert_eq!(pg(url).host(), host, "{url}");
        }
    }
}
