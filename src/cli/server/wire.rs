//! Wiring of one server: the store, the HSM access, the services over one context, the
//! audit writer, metrics, the lifecycle jobs, the listener and the signals.
//!
//! Invariant: the audit writer is attached before anything acts (the start-up unseal
//! included); the jobs stop before the services (and the HSM) go.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arca_hsm::pkcs11::{AuthPin, Pkcs11Config, Pkcs11Hsm};
use arca_hsm::Hsm;

use super::dev::{dev_unseal, ensure_dev_token, precreate_private, BoxError};
use crate::clock::SystemClock;
use crate::config::{Database, DevQuorum, ServerConfig};
use crate::grpc::serve;
use crate::grpc::tls::{CrlRefresh, TlsError, TlsReloader};
use crate::keys::{EngineConfig, HsmAccess, HsmOpener, PinSetter};
use crate::service::{Context, EngineKeys, ServiceConfig, Services};
use crate::store::SqlStore;

/// The HSM access of `cfg`: the PKCS#11 module and token, and SoftHSM's PIN reset.
fn hsm_access(cfg: &ServerConfig) -> HsmAccess {
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
        Ok(Arc::new(hsm) as Arc<dyn Hsm>)
    });
    let (module, label) = (cfg.hsm.module.clone(), cfg.hsm.token_label.clone());
    let pin_setter: PinSetter = Arc::new(move |so: &AuthPin, new: &AuthPin| {
        arca_hsm::softhsm::reset_user_pin(&module, &label, so, new)
    });
    HsmAccess::new(
        opener,
        pin_setter,
        EngineConfig {
            workers: cfg.hsm.sessions,
            op_timeout: cfg.hsm.op_timeout,
            ..EngineConfig::default()
        },
    )
}

pub(super) async fn serve_config(cfg: ServerConfig) -> Result<(), BoxError> {
    let store = Arc::new(open_store(&cfg.database).await?);
    tracing::info!(database = %cfg.database, backend = ?store.backend(), "database open");
    tracing::info!(policy = %cfg.quorum_policy, "quorum policy");
    tracing::info!(policy = %cfg.lifecycle, "lifecycle policy");
    if cfg.restamp_unstamped && !cfg.dev {
        tracing::warn!(
            "--restamp-unstamped: rows without a state MAC will be stamped at the next unseal, \
             trusting the database as it is then; run it once after the upgrade and restart \
             without it (docs/operations.md, \"Upgrading to state MACs\")"
        );
    }

    let ctx = Arc::new(Context::new(
        store.clone(),
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
            restamp_unstamped: cfg.restamp_unstamped,
        },
    ));
    let svc = Services::new(Arc::clone(&ctx), hsm_access(&cfg));
    tracing::info!(
        digest = svc.guard.policy().digest(),
        dir = ?cfg.access_policy.1,
        "access policy read"
    );
    // An approved policy stored in the database wins over the files, from the start.
    svc.guard.refresh(true).await;
    if let Some(dir) = cfg.access_policy.1.clone() {
        // Registered before the listening line, so no SIGHUP after it is missed.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => {
                tokio::spawn(reload_policy_on_sighup(Arc::clone(&svc.policies), dir, hup));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the access policy will not reload")
            }
        }
    }

    start_audit(&ctx, store, &cfg);

    // Dev mode: an admin token for the developer. Outside dev mode: a bootstrap admin
    // token for the init ceremony, written once.
    let token_path = cfg.data_dir.join(if cfg.dev {
        "dev-token"
    } else {
        "bootstrap-token"
    });
    ensure_dev_token(&svc, &token_path, cfg.dev).await?;
    dev_unseal(&svc, &cfg).await?;
    if ctx.engine.is_open() {
        ctx.record_job("unseal", true, None, "start-up");
        // The writer makes its HSM keys now, before the listener opens, so the first
        // calls (and health probes) do not queue behind that on the HSM.
        if let Some(log) = ctx.audit() {
            let start = std::time::Instant::now();
            while !log.is_ready() && start.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    let tls = match &cfg.tls {
        Some(files) => Some(Arc::new(TlsReloader::load(
            files.clone(),
            Arc::new(SystemClock),
        )?)),
        None => None,
    };
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let prefix = hex::encode(crate::secret::random::<6>()?.as_ref());
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
    start_metrics(&ctx, &cfg).await?;
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(node = %cfg.jobs.node, interval = ?cfg.jobs.interval, lease = ?cfg.jobs.lease_ttl, "lifecycle jobs running");
    let jobs = tokio::spawn(Arc::clone(&svc.jobs).run(cfg.jobs.clone()));
    let served = match tls {
        Some(tls) => {
            tracing::info!(%addr, mutual = tls.mutual(), "listening (TLS 1.2/1.3)");
            tokio::spawn(reload_on_sighup(Arc::clone(&tls), Arc::clone(&ctx)));
            if let Some(every) = tls.crl_refresh() {
                tokio::spawn(watch_crl(Arc::clone(&tls), Arc::clone(&ctx), every));
            }
            let certs = tls.client_check();
            let incoming = crate::grpc::tls::incoming(listener, tls);
            serve(incoming, &svc, certs, cfg.serve.clone(), prefix, shutdown).await
        }
        None => {
            tracing::info!(%addr, "listening (dev mode, plaintext, loopback only)");
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            serve(incoming, &svc, None, cfg.serve.clone(), prefix, shutdown).await
        }
    };
    // The jobs hold the services (and through them the HSM): stop them before they go.
    jobs.abort();
    let _ = jobs.await;
    // The audit writer's thread holds the HSM while it writes: let it finish and join it,
    // so the engine is dropped (its workers joined, the module finalized) on this side
    // before the process exits, never under a running PKCS#11 call.
    if let Some(log) = ctx.audit() {
        let log = Arc::clone(log);
        let _ = tokio::task::spawn_blocking(move || log.stop(Duration::from_secs(5))).await;
    }
    served?;
    tracing::info!("shut down");
    Ok(())
}

/// Starts the audit writer (unless `--no-audit`) and attaches it to the context, before
/// anything (the start-up unseal included) happens.
fn start_audit(ctx: &Arc<Context>, store: Arc<SqlStore>, cfg: &ServerConfig) {
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
        EngineKeys::for_context(ctx),
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
    ctx.set_audit(log);
    ctx.record_job("server.start", true, None, "");
}

/// Serves Prometheus metrics on `--metrics-listen`, if given.
async fn start_metrics(ctx: &Arc<Context>, cfg: &ServerConfig) -> Result<(), BoxError> {
    let Some(addr) = cfg.audit.metrics_listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let weak = Arc::downgrade(ctx);
    let workers = cfg.hsm.sessions as f64;
    let render = Arc::new(move || {
        let (sealed, hsm, audit) = match weak.upgrade() {
            Some(c) => {
                let engine = c.engine().ok();
                (
                    engine.is_none(),
                    engine.is_some_and(|e| e.is_available()),
                    c.audit().is_none_or(|a| a.is_healthy()),
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

/// Opens the store. Errors name the database by its redacted form (`Display` of
/// [`Database`]) and carry the driver's reason, which never quotes the URL.
async fn open_store(database: &Database) -> Result<SqlStore, BoxError> {
    let opened = match database {
        Database::Sqlite(path) => {
            precreate_private(path)?;
            SqlStore::open_sqlite(path).await
        }
        Database::Postgres(url) => {
            url.check_transport()
                .map_err(|e| format!("database {url}: {e}"))?;
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

/// Re-reads the TLS files on every SIGHUP; a bad certificate, key or CA file is refused
/// and the old configuration stays in force; a bad CRL fails closed ([`crl_unusable`]).
async fn reload_on_sighup(tls: Arc<TlsReloader>, ctx: Arc<Context>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; TLS files will not reload");
        return;
    };
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS configuration reloaded"),
            Err(TlsError::Crl(e)) => crl_unusable(&ctx, &e),
            Err(e) => {
                tracing::error!(error = %e, "TLS reload refused; the previous configuration stays")
            }
        }
    }
}

/// A CRL that cannot be used: an ERROR line and a `tls.crl_unusable` record (which the
/// shipped alert rule `crl_unusable` turns into an alert).
fn crl_unusable(ctx: &Context, error: &str) {
    tracing::error!(
        error,
        "the CRL is unusable: every mutual-TLS client is refused until a usable CRL is written"
    );
    ctx.record_job("tls.crl_unusable", false, None, "");
}

/// Re-reads the CRL file every `every` and puts it in force when it changed; says so once
/// (ERROR, an audit record and the alert on it) when the CRL in force passes its
/// nextUpdate, from when every mutual-TLS client is refused.
async fn watch_crl(tls: Arc<TlsReloader>, ctx: Arc<Context>, every: Duration) {
    let Some(check) = tls.client_check() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The nextUpdate of the expired CRL last reported (a CRL put in force by SIGHUP is
    // reported too).
    let mut reported: Option<u64> = None;
    loop {
        tick.tick().await;
        // File reading, hashing and parsing off the async workers.
        let t = Arc::clone(&tls);
        let Ok(refresh) = tokio::task::spawn_blocking(move || t.refresh_crl()).await else {
            continue;
        };
        let next_update = check.crl_next_update().map(|s| {
            crate::clock::rfc3339(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000))
        });
        match refresh {
            CrlRefresh::Unchanged => {}
            CrlRefresh::Loaded => {
                tracing::info!(next_update, "CRL reloaded");
                ctx.record_job("tls.crl_loaded", true, None, "");
            }
            CrlRefresh::Unusable(e) => crl_unusable(&ctx, &e.to_string()),
        }
        if check.crl_expired() && reported != check.crl_next_update() {
            reported = check.crl_next_update();
            tracing::error!(
                next_update,
                "the CRL in force is past its nextUpdate: every mutual-TLS client is refused \
                 (CRL_EXPIRED) until a fresh CRL is written"
            );
            ctx.record_job("tls.crl_expired", false, None, "");
        }
    }
}

/// Re-reads the access policy files on every SIGHUP; a bad file is refused and the policy
/// in force stays.
async fn reload_policy_on_sighup(
    policies: Arc<crate::service::Policies>,
    dir: PathBuf,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        match policies.reload(&dir).await {
            Ok(digest) => tracing::info!(digest, dir = %dir.display(), "access policy reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                "access policy reload refused; the policy in force stays"
            ),
        }
    }
}

/// SIGTERM or Ctrl-C, registered at once (before the listening line is printed, so that a
/// SIGTERM sent right after it stops the server cleanly rather than killing it).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
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
}
