//! `grpc.health.v1.Health`: SERVING only while the HSM (unsealed), the database and the
//! audit writer all answer, probed every `health_interval` without traffic.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::service::Context;

/// The service name the key API's status is also published under.
const KEY_SERVICE: &str = "arca.v1.KeyService";

/// Checks the HSM, the database and the audit writer once and publishes the result if it
/// changed from `last`; returns it.
pub async fn probe(health: &HealthReporter, ctx: &Context, last: Option<bool>) -> bool {
    // Sealed counts as not serving: key operations would all fail.
    let hsm_ok = match ctx.engine() {
        Ok(engine) => engine.check().await.is_ok(),
        Err(_) => false,
    };
    let db_ok = ctx.ping().await.is_ok();
    // A failing audit writer fails every call closed: not serving.
    let audit_ok = ctx.audit().is_none_or(|a| a.is_healthy());
    let ok = hsm_ok && db_ok && audit_ok;
    if last != Some(ok) {
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(KEY_SERVICE, status).await;
        if ok {
            tracing::info!("serving");
        } else {
            tracing::error!(
                hsm_ok,
                db_ok,
                audit_ok,
                "not serving: a dependency is unavailable"
            );
        }
    }
    ok
}

/// Keeps the health status in step with the HSM, the database and the audit writer.
pub async fn run(health: HealthReporter, ctx: Arc<Context>, interval: Duration, mut last: bool) {
    loop {
        tokio::time::sleep(interval).await;
        last = probe(&health, &ctx, Some(last)).await;
    }
}
