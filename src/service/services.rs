//! [`Services`]: every service, built once over one [`Context`], in dependency order.
//! The server (`cli::server`) and the unit tests build the service layer only here.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::sync::Arc;

use super::access::Guard;
use super::admin::{Grants, Policies, Tokens, Totp};
use super::audit::AuditQueries;
use super::context::Context;
use super::gate::Gate;
use super::jobs::Jobs;
use super::keys::Keys;
use super::lifecycle::Lifecycle;
use super::quorum::{Approvals, Ceremony, Custodians, Executors, Sealing};
use super::rotation::Rotation;
use crate::keys::HsmAccess;

/// The service layer of one node.
pub struct Services {
    /// What they share.
    pub ctx: Arc<Context>,
    /// Authentication and authorization.
    pub guard: Arc<Guard>,
    /// Data plane and key CRUD.
    pub keys: Arc<Keys>,
    /// `RotateKey` and every rotation.
    pub rotation: Arc<Rotation>,
    /// Disable, enable, retire, cancel, retention.
    pub lifecycle: Arc<Lifecycle>,
    /// The background lifecycle jobs.
    pub jobs: Arc<Jobs>,
    /// Approval requests.
    pub approvals: Arc<Approvals>,
    /// `Init` and `Rekey`.
    pub ceremony: Arc<Ceremony>,
    /// `Unseal`, `Seal`, `SealStatus`.
    pub sealing: Arc<Sealing>,
    /// Token administration.
    pub tokens: Arc<Tokens>,
    /// Elevation, break-glass, reviews.
    pub grants: Arc<Grants>,
    /// Policy changes.
    pub policies: Arc<Policies>,
    /// TOTP enrolment.
    pub totp: Arc<Totp>,
    /// `QueryAudit`, `VerifyAudit`.
    pub audit: Arc<AuditQueries>,
}

impl Services {
    /// Builds every service over `ctx`, sealed; `hsm` opens the HSM at unseal and sets
    /// the user PIN at init.
    pub fn new(ctx: Arc<Context>, hsm: HsmAccess) -> Self {
        let guard = Arc::new(Guard::new(Arc::clone(&ctx)));
        let gate = Arc::new(Gate::new(Arc::clone(&ctx)));
        let rotation = Arc::new(Rotation::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
        ));
        let keys = Arc::new(Keys::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&rotation),
        ));
        let lifecycle = Arc::new(Lifecycle::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
        ));
        let jobs = Arc::new(Jobs::new(Arc::clone(&ctx), Arc::clone(&rotation)));
        let tokens = Arc::new(Tokens::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
        ));
        let grants = Arc::new(Grants::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
        ));
        let policies = Arc::new(Policies::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
        ));
        let totp = Arc::new(Totp::new(Arc::clone(&ctx), Arc::clone(&guard)));
        let custodians = Arc::new(Custodians::new(Arc::clone(&ctx)));
        let ceremony = Arc::new(Ceremony::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&gate),
            Arc::clone(&custodians),
            hsm.clone(),
        ));
        let approvals = Arc::new(Approvals::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            Arc::clone(&custodians),
            Executors {
                ceremony: Arc::clone(&ceremony),
                rotation: Arc::clone(&rotation),
                lifecycle: Arc::clone(&lifecycle),
                grants: Arc::clone(&grants),
                policies: Arc::clone(&policies),
                tokens: Arc::clone(&tokens),
            },
        ));
        let sealing = Arc::new(Sealing::new(
            Arc::clone(&ctx),
            Arc::clone(&guard),
            custodians,
            Arc::clone(&approvals),
            hsm,
        ));
        let audit = Arc::new(AuditQueries::new(Arc::clone(&ctx), Arc::clone(&guard)));
        Services {
            ctx,
            guard,
            keys,
            rotation,
            lifecycle,
            jobs,
            approvals,
            ceremony,
            sealing,
            tokens,
            grants,
            policies,
            totp,
            audit,
        }
    }
}
