//! `arca server`: wires configuration, HSM, store, engine, service and transport.
//!
//! Dev mode (`--dev`) needs no set-up: it makes a SoftHSM token and a SQLite database under
//! the data dir, listens in plaintext on loopback only, and writes a dev admin token to
//! `DIR/dev-token` (0600). Restarting on the same dir keeps every key.
//!
//! `--database` (or `ARCA_DATABASE_URL`) picks the store: a SQLite file (the default,
//! `DIR/arca.db`) or a PostgreSQL URL, which several nodes may share. The URL may carry a
//! password: it is logged and reported only redacted, never parsed by clap (whose errors
//! quote values) and never shown in `--help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::pkcs11::{AuthPin, Pkcs11Config, Pkcs11Hsm};
use arca_hsm::Hsm;
use clap::Args;
use zeroize::Zeroizing;

use crate::clock::SystemClock;
use crate::config::{Database, DevQuorum, HsmSettings, LogFormat, ServerConfig};
use crate::grpc::tls::{TlsFiles, TlsReloader};
use crate::grpc::{serve, ServeOptions};
use crate::keys::EngineConfig;
use crate::secret::BearerToken;
use crate::service::{HsmOpener, KeyService, PinSetter, SealControl, ServiceConfig};
use crate::store::SqlStore;

/// Label of the dev-mode token.
const DEV_TOKEN_LABEL: &str = "arca-dev";
/// Principal of the dev admin token.
const DEV_PRINCIPAL: &str = "dev-admin";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    #[arg(long, default_value = super::DEFAULT_DEV_ADDR)]
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
    /// Certificate revocation list(s) (PEM) for client certificates.
    #[arg(long, requires = "tls_client_ca")]
    tls_crl: Option<PathBuf>,
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
            match rt.block_on(serve_config(cfg)) {
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
        serve: ServeOptions::default(),
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
    let node = hex::encode(crate::quorum::crypto::random::<4>()?.as_ref());
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
        serve: ServeOptions::default(),
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

async fn serve_config(cfg: ServerConfig) -> Result<(), BoxError> {
    let store = Arc::new(open_store(&cfg.database).await?);
    tracing::info!(database = %cfg.database, backend = ?store.backend(), "database open");
    tracing::info!(policy = %cfg.quorum_policy, "quorum policy");
    tracing::info!(policy = %cfg.lifecycle, "lifecycle policy");

    let (module, label, sessions, copies) = (
        cfg.hsm.module.clone(),
        cfg.hsm.token_label.clone(),
        cfg.hsm.sessions,
        cfg.hsm.session_key_copies,
    );
    let opener: HsmOpener = Arc::new(move |pin: AuthPin| {
        let hsm = Pkcs11Hsm::open(Pkcs11Config {
            module: module.clone(),
            token_label: label.clone(),
            pin,
            sessions,
            session_key_copies: copies,
            reconnect_interval: Duration::from_secs(1),
        })?;
        tracing::info!(module = %module.display(), token = %label, sessions, "HSM session pool open");
        Ok(Arc::new(hsm) as Arc<dyn Hsm>)
    });
    let (module, label) = (cfg.hsm.module.clone(), cfg.hsm.token_label.clone());
    let pin_setter: PinSetter = Arc::new(move |so: &AuthPin, new: &AuthPin| {
        arca_hsm::softhsm::reset_user_pin(&module, &label, so, new)
    });
    let store_for_audit: Arc<dyn crate::store::AuditStore> = store.clone();
    let svc = Arc::new(KeyService::new(
        store.clone(),
        store.clone(),
        store,
        SealControl::new(
            opener,
            pin_setter,
            EngineConfig {
                workers: cfg.hsm.sessions,
                op_timeout: cfg.hsm.op_timeout,
                ..EngineConfig::default()
            },
        ),
        Arc::new(SystemClock),
        ServiceConfig {
            wrap_reservation: cfg.wrap_reservation,
            rate_limit: cfg.rate_limit,
            // A real quorum (custodians): quorum operations wait for approval. Dev
            // mode's 1-of-1 (and a plain PIN file) runs them at once.
            quorum_gates: matches!(
                cfg.dev_quorum,
                DevQuorum::Custodians { .. } | DevQuorum::Sealed
            ),
            quorum_policy: cfg.quorum_policy.clone(),
            lifecycle: cfg.lifecycle.clone(),
            access_policy: cfg.access_policy.0.clone(),
        },
    ));
    tracing::info!(
        digest = svc.policy().digest(),
        dir = ?cfg.access_policy.1,
        "access policy read"
    );
    // An approved policy stored in the database wins over the files, from the start.
    svc.load_access().await;
    if let Some(dir) = cfg.access_policy.1.clone() {
        // Registered before the listening line, so no SIGHUP after it is missed.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => {
                tokio::spawn(reload_policy_on_sighup(Arc::clone(&svc), dir, hup));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the access policy will not reload")
            }
        }
    }

    start_audit(&svc, store_for_audit, &cfg);

    // Dev mode: an admin token for the developer. Outside dev mode: a bootstrap admin
    // token for the init ceremony, written once.
    let token_path = cfg.data_dir.join(if cfg.dev {
        "dev-token"
    } else {
        "bootstrap-token"
    });
    ensure_dev_token(&svc, &token_path).await?;
    dev_unseal(&svc, &cfg).await?;
    if svc.engine().is_ok() {
        svc.audit_job("unseal", true, None, "start-up");
        // The writer makes its HSM keys now, before the listener opens, so the first
        // calls (and health probes) do not queue behind that on the HSM.
        if let Some(log) = svc.audit() {
            let start = std::time::Instant::now();
            while !log.is_ready() && start.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    let tls = match &cfg.tls {
        Some(files) => Some(Arc::new(TlsReloader::load(files.clone())?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let prefix = crate::quorum::crypto::random::<6>()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let who = if cfg.dev {
        "arca dev server"
    } else {
        "arca server"
    };
    println!("{who} listening on {scheme}://{addr}");
    println!("admin token in {}", token_path.display());
    println!(
        "  export ARCA_ADDR={scheme}://{addr} ARCA_TOKEN=$(cat {})",
        token_path.display()
    );
    // After the listening line, which scripts and tests read first.
    start_metrics(&svc, &cfg).await?;
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(node = %cfg.jobs.node, interval = ?cfg.jobs.interval, lease = ?cfg.jobs.lease_ttl, "lifecycle jobs running");
    let jobs = tokio::spawn(Arc::clone(&svc).run_jobs(cfg.jobs.clone()));
    let served = match tls {
        Some(tls) => {
            tracing::info!(%addr, mutual = tls.mutual(), "listening (TLS 1.2/1.3)");
            tokio::spawn(reload_on_sighup(Arc::clone(&tls)));
            serve(
                crate::grpc::tls::incoming(listener, tls),
                svc,
                cfg.serve.clone(),
                hex::encode(prefix.as_ref()),
                shutdown_signal(),
            )
            .await
        }
        None => {
            tracing::info!(%addr, "listening (dev mode, plaintext, loopback only)");
            serve(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                svc,
                cfg.serve.clone(),
                hex::encode(prefix.as_ref()),
                shutdown_signal(),
            )
            .await
        }
    };
    // The jobs hold the service (and through it the HSM): stop them before it goes.
    jobs.abort();
    let _ = jobs.await;
    served?;
    tracing::info!("shut down");
    Ok(())
}

/// Starts the audit writer (unless `--no-audit`) and attaches it to the service, before
/// anything (the start-up unseal included) happens.
fn start_audit(
    svc: &Arc<KeyService>,
    store: Arc<dyn crate::store::AuditStore>,
    cfg: &ServerConfig,
) {
    let a = &cfg.audit;
    if !a.enabled {
        tracing::warn!("running WITHOUT the audit trail (--no-audit, benchmarks only)");
        return;
    }
    let webhook = a
        .webhook
        .as_deref()
        .and_then(|u| crate::audit::alerts::parse_http_url(u).ok())
        .map(crate::audit::alerts::Webhook::start);
    let log = crate::audit::AuditLog::start(
        store,
        crate::service::EngineKeys::for_service(svc),
        Arc::new(SystemClock),
        crate::audit::AuditConfig {
            node: a.node.clone(),
            timeout: a.timeout,
            commit_timeout: a.timeout,
            queue: a.queue,
            checkpoints: Some(a.checkpoints.clone()),
            ..crate::audit::AuditConfig::default()
        },
        crate::audit::alerts::AlertEngine::new(&a.alerts),
        webhook,
    );
    tracing::info!(
        node = %a.node,
        checkpoints = %a.checkpoints.display(),
        rules = a.alerts.rules.len(),
        webhook = a.webhook.is_some(),
        "audit trail on"
    );
    svc.set_audit(log);
    svc.audit_job("server.start", true, None, "");
}

/// Serves Prometheus metrics on `--metrics-listen`, if given.
async fn start_metrics(svc: &Arc<KeyService>, cfg: &ServerConfig) -> Result<(), BoxError> {
    let Some(addr) = cfg.audit.metrics_listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let weak = Arc::downgrade(svc);
    let workers = cfg.hsm.sessions as f64;
    let render = Arc::new(move || {
        let (sealed, hsm, audit) = match weak.upgrade() {
            Some(s) => {
                let engine = s.engine().ok();
                (
                    engine.is_none(),
                    engine.is_some_and(|e| e.is_available()),
                    s.audit().is_none_or(|a| a.is_healthy()),
                )
            }
            None => (true, false, false),
        };
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        crate::metrics::global().render(&[
            ("arca_sealed", "1 while the service is sealed.", b(sealed)),
            (
                "arca_hsm_available",
                "1 while the last HSM call found the HSM reachable.",
                b(hsm),
            ),
            (
                "arca_hsm_sessions",
                "HSM sessions (and worker threads) configured.",
                workers,
            ),
            (
                "arca_hsm_sessions_in_use",
                "HSM sessions in use now (workers running a call).",
                crate::metrics::global()
                    .hsm_sessions_in_use
                    .load(std::sync::atomic::Ordering::Relaxed) as f64,
            ),
            (
                "arca_audit_writable",
                "1 while the audit writer commits.",
                b(audit),
            ),
        ])
    });
    tokio::spawn(crate::metrics::serve(listener, render));
    println!("metrics on http://{bound}/metrics");
    tracing::info!(%bound, "metrics endpoint");
    Ok(())
}

/// Dev mode's way to an unsealed (or, with `--custodians`, a sealed and initialised)
/// service:
/// - an explicit `--hsm-pin-file` opens the HSM with that PIN (no dual control);
/// - `--custodians N --threshold K` runs the init ceremony once with the SO PIN from
///   `DIR/hsm-so-pin` and writes each custodian's kit under `DIR/custodians/NAME/`; the
///   service stays sealed until K custodians unseal it;
/// - otherwise a 1-of-1 quorum seals the dev PIN, its share is kept in `DIR/dev-share`,
///   and the service unseals itself with it at every start.
async fn dev_unseal(svc: &KeyService, cfg: &ServerConfig) -> Result<(), BoxError> {
    let dir = &cfg.data_dir;
    match &cfg.dev_quorum {
        DevQuorum::PinFile(path) => {
            let pin = read_pin(path)?;
            svc.open_with_pin(AuthPin::from(pin.to_string())).await?;
        }
        DevQuorum::Sealed => match svc.quorum_config().await? {
            Some(_) => eprintln!("sealed: custodians unseal with `arca operator unseal`"),
            None => eprintln!(
                "not initialised: run `arca operator init` with the bootstrap token, then unseal"
            ),
        },
        DevQuorum::Custodians {
            custodians,
            threshold,
        } => {
            if svc.quorum_config().await?.is_none() {
                let names: Vec<String> = (1..=*custodians)
                    .map(|i| format!("custodian-{i}"))
                    .collect();
                let so_pin = read_pin(&dir.join("hsm-so-pin"))?;
                let caller = dev_caller();
                let kits = svc
                    .init_quorum(
                        &caller,
                        *threshold,
                        &names,
                        AuthPin::from(so_pin.to_string()),
                        1,
                    )
                    .await?;
                // The user PIN changed and nobody knows it now.
                let _ = std::fs::remove_file(dir.join("hsm-pin"));
                for kit in kits {
                    let kdir = dir.join("custodians").join(&kit.name);
                    make_private_dir(&kdir)?;
                    write_private(&kdir.join("share"), kit.share.as_bytes())?;
                    write_private(&kdir.join("token"), kit.token.expose().as_bytes())?;
                    write_private(&kdir.join("totp-uri"), kit.totp_uri.as_bytes())?;
                }
                eprintln!(
                    "dual control initialised: {threshold} of {custodians} custodians; kits in {}",
                    dir.join("custodians").display()
                );
            }
            eprintln!("sealed: unseal with `arca operator unseal` as {threshold} custodians");
        }
        DevQuorum::OneOfOne => {
            let share_path = dir.join("dev-share");
            let cfg_q = match svc.quorum_config().await? {
                Some(q) => q,
                None => {
                    let pin = read_pin(&cfg.hsm.pin_file)?;
                    let kit = svc.dev_init(pin.as_bytes()).await?;
                    write_private(&share_path, kit.share.as_bytes())?;
                    svc.quorum_config()
                        .await?
                        .ok_or("dual control did not initialise")?
                }
            };
            match std::fs::read_to_string(&share_path) {
                Ok(text) => {
                    let text = Zeroizing::new(text);
                    let share = crate::quorum::shamir::decode(&text)?;
                    svc.unseal_with_shares(&cfg_q, &[share]).await?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("sealed: this data dir has no dev-share; unseal with `arca operator unseal`");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The identity dev-mode wiring acts as.
fn dev_caller() -> crate::service::Caller {
    crate::service::Caller {
        principal: Arc::new(crate::authz::Principal {
            name: DEV_PRINCIPAL.to_string(),
            method: crate::authz::AuthMethod::Token {
                token_id: "dev".into(),
            },
            roles: vec!["admin".into()],
            key_globs: Vec::new(),
        }),
        request_id: "startup".into(),
        peer: crate::authz::Peer::default(),
        mfa: None,
    }
}

/// Opens the store. Errors name the database by its redacted form (`Display` of
/// [`Database`]) and carry the driver's reason, which never quotes the URL.
async fn open_store(database: &Database) -> Result<SqlStore, BoxError> {
    let opened = match database {
        Database::Sqlite(path) => {
            precreate_private(path)?;
            SqlStore::open_sqlite(path).await
        }
        Database::Postgres(url) => {
            let host = url.host();
            if !(host.is_empty()
                || host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()))
            {
                tracing::warn!(
                    database = %url,
                    "this build has no TLS to PostgreSQL: traffic to a non-loopback host \
                     (token hashes and key metadata, never key material) is not encrypted"
                );
            }
            SqlStore::open_postgres(url.expose()).await
        }
    };
    opened.map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            // sqlx's messages often repeat their source's already.
            let text = s.to_string();
            if !reason.contains(&text) {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            source = s.source();
        }
        format!("cannot open the database {database}: {reason}").into()
    })
}

/// Re-reads the TLS files on every SIGHUP; a bad file is refused and the old
/// configuration stays in force.
async fn reload_on_sighup(tls: Arc<TlsReloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; TLS files will not reload");
        return;
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "TLS reload refused; the previous configuration stays")
            }
        }
    }
}

/// Re-reads the access policy files on every SIGHUP; a bad file is refused and the policy
/// in force stays.
async fn reload_policy_on_sighup(
    svc: Arc<KeyService>,
    dir: PathBuf,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        match svc.reload_policy(&dir).await {
            Ok(digest) => tracing::info!(digest, dir = %dir.display(), "access policy reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                "access policy reload refused; the policy in force stays"
            ),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
}

/// Reads the dev token from `path`, or mints one and writes it there (0600).
async fn ensure_dev_token(svc: &KeyService, path: &Path) -> Result<(), BoxError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = BearerToken::new(text.trim().to_string());
            svc.ensure_token(&token, DEV_PRINCIPAL, &["admin"]).await?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = svc.issue_token(DEV_PRINCIPAL, &["admin"]).await?;
            write_private(path, token.expose().as_bytes())?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` with mode 0600 (failing if it exists) and writes `bytes`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Creates `path` empty with mode 0600 if it does not exist, so SQLite (which gives its
/// -wal and -shm files the database file's mode) keeps every file private.
fn precreate_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_pin(path: &Path) -> Result<Zeroizing<String>, BoxError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the PIN file {}: {e}", path.display()))?,
    );
    let pin = Zeroizing::new(text.trim().to_string());
    if pin.is_empty() {
        return Err(format!("the PIN file {} is empty", path.display()).into());
    }
    Ok(pin)
}

/// Reads a PIN file, or makes one with a fresh random PIN (dev mode only).
fn read_or_make_pin(path: &Path) -> Result<Zeroizing<String>, BoxError> {
    if !path.exists() {
        let mut raw = Zeroizing::new([0u8; 16]);
        getrandom::fill(raw.as_mut()).map_err(|e| format!("no OS randomness: {e}"))?;
        let pin = Zeroizing::new(hex::encode(raw.as_ref()));
        write_private(path, pin.as_bytes())?;
    }
    read_pin(path)
}
