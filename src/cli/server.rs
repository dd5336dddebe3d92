//! `arca server`: wires configuration, HSM, store, engine, service and transport.
//!
//! Dev mode (`--dev`) needs no set-up: it makes a SoftHSM token and a SQLite database under
//! the data dir, listens in plaintext on loopback only, and writes a dev admin token to
//! `DIR/dev-token` (0600). Restarting on the same dir keeps every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::pkcs11::{AuthPin, Pkcs11Config, Pkcs11Hsm};
use clap::Args;
use zeroize::Zeroizing;

use crate::clock::SystemClock;
use crate::config::{HsmSettings, LogFormat, ServerConfig};
use crate::grpc::{serve, ServeOptions};
use crate::keys::{EngineConfig, KeyEngine};
use crate::secret::BearerToken;
use crate::service::{KeyService, ServiceConfig};
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
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads of the async runtime (default: CPU count).
    #[arg(long)]
    runtime_threads: Option<usize>,
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    if !args.dev {
        return Err(
            "only dev mode (--dev) is available: TLS and mutual TLS, required \
                    outside dev mode, are not configured in this build"
                .into(),
        );
    }
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "dev mode listens on loopback only; refusing {}",
            args.listen
        )
        .into());
    }
    make_private_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;

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
    Ok(Prepared::Config(Box::new(ServerConfig {
        listen: args.listen,
        dev: true,
        database: data_dir.join("arca.db"),
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
    })))
}

async fn serve_config(cfg: ServerConfig) -> Result<(), BoxError> {
    let pin = read_pin(&cfg.hsm.pin_file)?;
    let hsm_cfg = Pkcs11Config {
        module: cfg.hsm.module.clone(),
        token_label: cfg.hsm.token_label.clone(),
        pin: AuthPin::from(pin.to_string()),
        sessions: cfg.hsm.sessions,
        session_key_copies: cfg.hsm.session_key_copies,
        reconnect_interval: Duration::from_secs(1),
    };
    drop(pin);
    let hsm = tokio::task::spawn_blocking(move || Pkcs11Hsm::open(hsm_cfg)).await??;
    tracing::info!(module = %cfg.hsm.module.display(), token = %cfg.hsm.token_label, sessions = cfg.hsm.sessions, "HSM session pool open");
    let engine = KeyEngine::start(
        Arc::new(hsm),
        &EngineConfig {
            workers: cfg.hsm.sessions,
            op_timeout: cfg.hsm.op_timeout,
            ..EngineConfig::default()
        },
    )?;
    precreate_private(&cfg.database)?;
    let store = SqlStore::open_sqlite(&cfg.database).await?;
    tracing::info!(database = %cfg.database.display(), "database open");
    let svc = Arc::new(KeyService::new(
        Arc::new(store),
        Arc::new(engine),
        Arc::new(SystemClock),
        ServiceConfig {
            wrap_reservation: cfg.wrap_reservation,
        },
    ));

    let token_path = cfg.data_dir.join("dev-token");
    ensure_dev_token(&svc, &token_path).await?;

    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let prefix: [u8; 6] = svc.engine().random().await?;
    println!("arca dev server listening on http://{addr}");
    println!("dev admin token in {}", token_path.display());
    println!(
        "  export ARCA_ADDR=http://{addr} ARCA_TOKEN=$(cat {})",
        token_path.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "listening (dev mode, plaintext, loopback only)");
    serve(
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        svc,
        cfg.serve.clone(),
        hex::encode(prefix),
        shutdown_signal(),
    )
    .await?;
    tracing::info!("shut down");
    Ok(())
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
            let token = svc.issue_token(DEV_PRINCIPAL, &["admin"], None).await?;
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
