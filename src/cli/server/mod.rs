//! `arca server`: the server's flags, their validation into a [`ServerConfig`], and the
//! runtime. `wire.rs` wires store, HSM, services, audit and transport; `dev.rs` holds dev
//! mode's token, PIN files and auto-unseal.
//!
//! Dev mode (`--dev`) needs no set-up: it makes a SoftHSM token and a SQLite database under
//! the data dir, listens in plaintext on loopback only, and writes a dev admin token to
//! `DIR/dev-token` (0600). Restarting on the same dir keeps every key.
//!
//! `--database` (or `ARCA_DATABASE_URL`) picks the store: a SQLite file (the default,
//! `DIR/arca.db`) or a PostgreSQL URL, which several nodes may share. The URL may carry a
//! password: it is logged and reported only redacted, never parsed by clap (whose errors
//! quote values) and never shown in `--help`.

mod dev;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use arca_hsm::pkcs11::AuthPin;
use clap::Args;

use crate::config::{Database, DevQuorum, HsmSettings, LogFormat, ServerConfig};
use crate::grpc::tls::TlsFiles;
use crate::grpc::ServeOptions;
use dev::{make_private_dir, read_or_make_pin};

/// Label of the dev-mode token.
const DEV_TOKEN_LABEL: &str = "arca-dev";

/// Default address of a dev server.
pub const DEFAULT_DEV_ADDR: &str = "127.0.0.1:7420";

use dev::BoxError;

#[derive(Args)]
pub(super) struct ServerArgs {
    /// Dev mode: local SoftHSM token and SQLite under --data-dir, plaintext on loopback.
    #[arg(long)]
    dev: bool,
    /// Data directory.
    #[arg(long, default_value = "./arca-dev")]
    data_dir: PathBuf,
    /// Database: `postgres://USER@HOST/DB` (several nodes may share it) or a SQLite file
    /// (`sqlite://PATH` or a path; default DIR/arca.db). Prefer the environment variable
    /// for a URL with a password: a command line is visible to every local user.
    #[arg(
        long,
        env = "ARCA_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database: Option<String>,
    /// Listen address (dev mode: loopback only).
    #[arg(long, default_value = DEFAULT_DEV_ADDR)]
    listen: SocketAddr,
    /// PKCS#11 module (default: the platform's SoftHSM2).
    #[arg(long, env = "ARCA_HSM_MODULE")]
    hsm_module: Option<PathBuf>,
    /// Token label.
    #[arg(long, default_value = DEV_TOKEN_LABEL)]
    hsm_token_label: String,
    /// File with the token's user PIN (default in dev mode: DIR/hsm-pin, made if absent).
    #[arg(long)]
    hsm_pin_file: Option<PathBuf>,
    /// PKCS#11 sessions, and HSM worker threads (SoftHSM is fastest with 1).
    #[arg(long, default_value_t = 1)]
    hsm_sessions: usize,
    /// Use token keys directly instead of non-extractable session copies.
    #[arg(long)]
    no_session_key_copies: bool,
    /// Milliseconds a request waits for the HSM before failing UNAVAILABLE.
    #[arg(long, default_value_t = 5000)]
    hsm_timeout_ms: u64,
    /// Wraps reserved in the database at a time per key version.
    #[arg(long, default_value_t = crate::service::DEFAULT_WRAP_RESERVATION)]
    wrap_reservation: u64,
    /// Dev mode: initialise K-of-N dual control with N custodians (kits written under
    /// DIR/custodians/) and start sealed, instead of 1-of-1 auto-unseal.
    #[arg(long, requires = "threshold")]
    custodians: Option<u8>,
    /// K, with --custodians.
    #[arg(long, requires = "custodians")]
    threshold: Option<u8>,
    /// Server certificate chain (PEM). With --tls-key, serve TLS 1.2/1.3 (required
    /// outside dev mode).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to: mutual TLS (required outside
    /// dev mode).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Certificate revocation list(s) (PEM) for client certificates. Checked at every
    /// handshake and on every request; a CRL past its nextUpdate, or a file that does not
    /// parse, refuses every client certificate (fail closed). Replace it atomically
    /// (write, then rename).
    #[arg(long, requires = "tls_client_ca")]
    tls_crl: Option<PathBuf>,
    /// How often the CRL file is re-read; a changed file is put in force at once (SIGHUP
    /// re-reads it too). E.g. "10s".
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    tls_crl_refresh: Duration,
    /// Requests per second allowed to each principal (token bucket; 0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_limit: f64,
    /// Burst of the per-principal bucket (default: one second's worth).
    #[arg(long)]
    rate_burst: Option<f64>,
    /// Quorum policy (which operations wait for K-of-N approval; request lifetime).
    /// Default: policies/quorum.toml in the working directory if it exists, else the
    /// built-in copy of the shipped file.
    #[arg(long, value_name = "PATH")]
    quorum_policy: Option<PathBuf>,
    /// Lifecycle policy (waiting periods, rotation bounds, usage limit). Default:
    /// policies/lifecycle.toml in the working directory if it exists, else the built-in
    /// copy of the shipped file.
    #[arg(long, value_name = "PATH")]
    lifecycle_policy: Option<PathBuf>,
    /// Time between passes of the lifecycle jobs (rotation, retention, destruction),
    /// e.g. "1s".
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    job_interval: Duration,
    /// How long a node keeps the jobs' lease without renewing it: after a node dies,
    /// another takes the jobs over after this long.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    job_lease: Duration,
    /// Directory of the access policy (every *.toml but quorum.toml, alerts.toml and
    /// lifecycle.toml: roles, bindings, break-glass), re-read on SIGHUP. Default:
    /// policies/ in the working directory if it exists, else the built-in copy of the
    /// shipped files.
    #[arg(long, value_name = "DIR")]
    policy_dir: Option<PathBuf>,
    /// How long a client connection may live before the server closes it (gracefully:
    /// GOAWAY, calls in progress finish) and the client handshakes again. E.g. "10m".
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    max_connection_age: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads of the async runtime (default: CPU count).
    #[arg(long)]
    runtime_threads: Option<usize>,
    /// The audit checkpoint file (sealed heads, JSON lines; ship it to write-once
    /// storage). Default: DIR/audit-checkpoints.jsonl.
    #[arg(long, value_name = "PATH")]
    audit_checkpoints: Option<PathBuf>,
    /// Milliseconds a call waits for its audit record to be durable before failing
    /// UNAVAILABLE.
    #[arg(long, default_value_t = 2000)]
    audit_timeout_ms: u64,
    /// Places for audit records: a call takes one when it starts and frees it when the
    /// writer takes its record, so this bounds calls in progress plus records waiting.
    /// When all are taken, calls are refused UNAVAILABLE before they run (and counted in
    /// audit.records_lost).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    audit_queue: u32,
    /// This node's name in audit records (default: host name and process id).
    #[arg(long)]
    node_name: Option<String>,
    /// Alert rules (default: policies/alerts.toml in the working directory if it exists,
    /// else the built-in copy of the shipped file).
    #[arg(long, value_name = "PATH")]
    alerts_policy: Option<PathBuf>,
    /// POST each alert as JSON to this http:// URL (retried with backoff).
    #[arg(long, value_name = "URL")]
    alert_webhook: Option<String>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// BENCHMARKS ONLY: run without the audit trail, to measure its cost. Dev mode only;
    /// never in production.
    #[arg(long)]
    no_audit: bool,
    /// UPGRADE STEP (ADR 12): at the next unseal, stamp with the HSM every live token,
    /// role grant and the newest access policy that carry no state MAC (rows written
    /// before state MACs). Run once after upgrading, then restart without it. Dev mode
    /// always does this.
    #[arg(long)]
    restamp_unstamped: bool,
}

/// The audit settings from the arguments.
fn audit_settings(
    args: &ServerArgs,
    data_dir: &Path,
) -> Result<crate::config::AuditSettings, BoxError> {
    let alerts = crate::audit::alerts::AlertPolicy::resolve(args.alerts_policy.as_deref())?;
    let webhook = args
        .alert_webhook
        .clone()
        .or_else(|| alerts.webhook.clone());
    if let Some(url) = &webhook {
        crate::audit::alerts::parse_http_url(url)?;
    }
    let node = match &args.node_name {
        Some(n) => n.clone(),
        None => {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            let host = if host.is_empty() {
                "arca".to_string()
            } else {
                host
            };
            format!("{host}:{}", std::process::id())
        }
    };
    Ok(crate::config::AuditSettings {
        enabled: !args.no_audit,
        node,
        checkpoints: args
            .audit_checkpoints
            .clone()
            .unwrap_or_else(|| data_dir.join("audit-checkpoints.jsonl")),
        timeout: Duration::from_millis(args.audit_timeout_ms.max(1)),
        queue: args.audit_queue as usize,
        alerts,
        webhook,
        metrics_listen: args.metrics_listen,
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub(super) fn run(args: ServerArgs) -> ExitCode {
    init_logging(args.log_format);
    match prepare(&args) {
        Ok(Prepared::Reexec(err)) => {
            eprintln!("error: cannot re-execute with SOFTHSM2_CONF set: {err}");
            ExitCode::FAILURE
        }
        Ok(Prepared::Config(cfg)) => {
            let cfg = *cfg;
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(n) = args.runtime_threads {
                rt.worker_threads(n.max(1));
            }
            let rt = match rt.build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(wire::serve_config(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

enum Prepared {
    Config(Box<ServerConfig>),
    Reexec(std::io::Error),
}

/// Validates the arguments and, in dev mode, prepares the data dir and token.
fn prepare(args: &ServerArgs) -> Result<Prepared, BoxError> {
    let tls = args
        .tls_cert
        .as_ref()
        .zip(args.tls_key.as_ref())
        .map(|(cert, key)| TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
            crl: args.tls_crl.clone(),
            crl_refresh: args.tls_crl_refresh,
        });
    if !args.dev {
        return prepare_production(args, tls);
    }
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "dev mode listens on loopback only; refusing {}",
            args.listen
        )
        .into());
    }
    // Checked before anything is made, and without quoting the value.
    let database = match args.database.as_deref() {
        Some(value) => Some(Database::parse(value)?),
        None => None,
    };
    make_private_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let database = database.unwrap_or_else(|| Database::Sqlite(data_dir.join("arca.db")));

    let (module, pin_file) = match &args.hsm_module {
        Some(m) => {
            let pin_file = args
                .hsm_pin_file
                .clone()
                .ok_or("--hsm-module needs --hsm-pin-file")?;
            (m.clone(), pin_file)
        }
        None => {
            let module = arca_hsm::softhsm::default_module_path()
                .ok_or("SoftHSM2 is not installed (no libsofthsm2.so found); run scripts/setup")?;
            // SoftHSM reads SOFTHSM2_CONF at C_Initialize; the process environment must
            // carry it from the start, so re-execute with it set (same PID).
            let conf = arca_hsm::softhsm::write_config(&data_dir)?;
            if std::env::var_os("SOFTHSM2_CONF").as_deref() != Some(conf.as_os_str()) {
                use std::os::unix::process::CommandExt;
                let exe = std::env::current_exe()?;
                let err = std::process::Command::new(exe)
                    .args(std::env::args_os().skip(1))
                    .env("SOFTHSM2_CONF", &conf)
                    .exec();
                return Ok(Prepared::Reexec(err));
            }
            let pin_file = data_dir.join("hsm-pin");
            let so_pin_file = data_dir.join("hsm-so-pin");
            let pin = read_or_make_pin(&pin_file)?;
            let so_pin = read_or_make_pin(&so_pin_file)?;
            if !arca_hsm::softhsm::token_exists(&module, &args.hsm_token_label)? {
                arca_hsm::softhsm::init_token(
                    &module,
                    &args.hsm_token_label,
                    &AuthPin::from(so_pin.to_string()),
                    &AuthPin::from(pin.to_string()),
                )?;
                eprintln!(
                    "initialised SoftHSM token {:?} in {}",
                    args.hsm_token_label,
                    data_dir.join("tokens").display()
                );
            }
            (module, pin_file)
        }
    };
    let dev_quorum = match (
        &args.hsm_module,
        &args.hsm_pin_file,
        args.custodians,
        args.threshold,
    ) {
        (Some(_), _, _, _) | (_, Some(_), _, _) => DevQuorum::PinFile(pin_file.clone()),
        (None, None, Some(n), Some(k)) => DevQuorum::Custodians {
            custodians: n,
            threshold: k,
        },
        _ => DevQuorum::OneOfOne,
    };
    let audit = audit_settings(args, &data_dir)?;
    Ok(Prepared::Config(Box::new(ServerConfig {
        listen: args.listen,
        dev: true,
        restamp_unstamped: true,
        database,
        data_dir,
        hsm: HsmSettings {
            module,
            token_label: args.hsm_token_label.clone(),
            pin_file,
            sessions: args.hsm_sessions.max(1),
            session_key_copies: !args.no_session_key_copies,
            op_timeout: Duration::from_millis(args.hsm_timeout_ms.max(1)),
        },
        wrap_reservation: args.wrap_reservation.max(1),
        serve: ServeOptions {
            max_connection_age: args.max_connection_age,
            ..ServeOptions::default()
        },
        rate_limit: rate_limit(args),
        quorum_policy: quorum_policy(args)?,
        lifecycle: lifecycle_policy(args)?,
        jobs: job_config(args)?,
        access_policy: access_policy(args)?,
        dev_quorum,
        tls,
        audit,
    })))
}

/// The quorum policy, read and validated once (a bad file stops the start).
fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::clock::parse_duration_ms(s)
        .and_then(|ms| u64::try_from(ms).ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {s:?}: use e.g. 250ms, 1s, 30s, 5m"))
}

fn lifecycle_policy(args: &ServerArgs) -> Result<crate::keys::policy::LifecyclePolicy, BoxError> {
    Ok(crate::keys::policy::LifecyclePolicy::resolve(
        args.lifecycle_policy.as_deref(),
    )?)
}

fn job_config(args: &ServerArgs) -> Result<crate::service::JobConfig, BoxError> {
    let node = hex::encode(crate::secret::random::<4>()?.as_ref());
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    Ok(crate::service::JobConfig {
        interval: args.job_interval,
        lease_ttl: args.job_lease.max(args.job_interval * 2),
        node: if host.is_empty() {
            format!("node-{node}")
        } else {
            format!("{host}-{node}")
        },
    })
}

fn quorum_policy(args: &ServerArgs) -> Result<crate::quorum::policy::QuorumPolicy, BoxError> {
    Ok(crate::quorum::policy::QuorumPolicy::resolve(args.quorum_policy.as_deref())?.0)
}

/// The access policy, read and validated once at start (a bad file stops the start).
fn access_policy(
    args: &ServerArgs,
) -> Result<(crate::authz::policy::Policy, Option<PathBuf>), BoxError> {
    Ok(crate::authz::policy::Policy::resolve(
        args.policy_dir.as_deref(),
    )?)
}

fn rate_limit(args: &ServerArgs) -> Option<crate::authz::ratelimit::Limit> {
    (args.rate_limit > 0.0).then(|| crate::authz::ratelimit::Limit {
        per_second: args.rate_limit,
        burst: args.rate_burst.unwrap_or(args.rate_limit).max(1.0),
    })
}

/// Outside dev mode: mutual TLS is required, there are no PIN files and no auto-unseal;
/// the service starts sealed and custodians unseal it (after `arca operator init`).
fn prepare_production(args: &ServerArgs, tls: Option<TlsFiles>) -> Result<Prepared, BoxError> {
    let tls =
        tls.ok_or("outside dev mode TLS is required: --tls-cert, --tls-key and --tls-client-ca")?;
    if tls.client_ca.is_none() {
        return Err("outside dev mode mutual TLS is required: --tls-client-ca".into());
    }
    if args.no_audit {
        return Err("--no-audit is for dev-mode benchmarks only".into());
    }
    if args.hsm_pin_file.is_some() || args.custodians.is_some() {
        return Err("--hsm-pin-file and --custodians are dev-mode options".into());
    }
    let database = match args.database.as_deref() {
        Some(value) => Some(Database::parse(value)?),
        None => None,
    };
    make_private_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let database = database.unwrap_or_else(|| Database::Sqlite(data_dir.join("arca.db")));
    let module = match &args.hsm_module {
        Some(m) => m.clone(),
        None => arca_hsm::softhsm::default_module_path()
            .ok_or("no --hsm-module given and no SoftHSM2 installed")?,
    };
    let audit = audit_settings(args, &data_dir)?;
    Ok(Prepared::Config(Box::new(ServerConfig {
        listen: args.listen,
        dev: false,
        restamp_unstamped: args.restamp_unstamped,
        database,
        hsm: HsmSettings {
            module,
            token_label: args.hsm_token_label.clone(),
            pin_file: PathBuf::new(),
            sessions: args.hsm_sessions.max(1),
            session_key_copies: !args.no_session_key_copies,
            op_timeout: Duration::from_millis(args.hsm_timeout_ms.max(1)),
        },
        data_dir,
        wrap_reservation: args.wrap_reservation.max(1),
        serve: ServeOptions {
            max_connection_age: args.max_connection_age,
            ..ServeOptions::default()
        },
        rate_limit: rate_limit(args),
        quorum_policy: quorum_policy(args)?,
        lifecycle: lifecycle_policy(args)?,
        jobs: job_config(args)?,
        access_policy: access_policy(args)?,
        dev_quorum: DevQuorum::Sealed,
        tls: Some(tls),
        audit,
    })))
}
