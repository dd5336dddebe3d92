//! # Arca — an HSM-backed key management service
//!
//! Services call Arca to generate, wrap, unwrap and rewrap data keys under envelope
//! encryption. Key-encryption keys live in a PKCS#11 HSM and never leave it.
//!
//! ## Module map and dependency rules
//! Layers, lowest first (`scripts/check-layering` holds this list and refuses an import
//! from a higher layer and any import cycle between modules or files):
//! `{secret, clock, fault, metrics}` → `{keys, quorum}` → `store` → `{authz, audit}` →
//! `service` → `grpc` → `config` → `cli`. `keys` alone names the HSM crate's types
//! (`arca_hsm::Hsm` behind the [`keys::KeyEngine`] and [`keys::HsmAccess`]); the store is
//! chosen at start-up in `cli::server`.
//!
//! - [`secret`]: secret types (data keys, plaintext, bearer tokens, shares, the quorum
//!   secret): zeroized on drop, no `Debug`/`Clone`/`Serialize`; the one OS RNG.
//! - [`clock`]: the one place that reads the wall clock.
//! - [`fault`]: crash points for the kill -9 tests (debug builds only).
//! - [`metrics`]: Prometheus counters and histograms, and the admin HTTP endpoint.
//! - [`keys`]: names, versions and states, the wrapped-key format v1, the canonical
//!   encryption context, HSM object ids, and the [`keys::KeyEngine`] that runs HSM calls
//!   off the async runtime. Knows nothing of gRPC or SQL.
//! - [`quorum`]: Shamir, commitments, the verifier and sealed PIN, TOTP, approval rules
//!   and digests, and the `QuorumApproved` proof.
//! - [`store`]: one trait and file per table family, [`store::Store`] over them all, and
//!   [`store::SqlStore`] on SQLite and PostgreSQL. The only module that uses sqlx.
//! - [`authz`]: principals, bearer-token and certificate authentication, the access
//!   policy with its one decision `authz::policy::Policy::authorize`, rate limits.
//! - [`audit`]: the audit trail: records, hash chain, group-commit writer, verifier,
//!   alerts. Knows nothing of gRPC or SQL (it speaks `store::AuditStore`).
//! - [`service`]: the use cases, one service each over one `service::Context`; a decision
//!   is a proof value (`service::Authorized`) that store access requires. No tonic types.
//! - [`grpc`]: generated code, proto ↔ domain conversion, the one error → `Status`
//!   mapping, and the request-id, audit and authentication layers applied once.
//! - [`config`]: server configuration.
//! - [`cli`]: the `arca` subcommands; `server` wires everything together, the others are
//!   gRPC clients.
//!
//! Vendor crates stay in their rooms: cryptoki only in `arca-hsm`, sqlx only in `store`,
//! tonic/prost only in `grpc` and `cli` (checked by `scripts/check-layering`).

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod cli;
pub mod clock;
pub mod config;
pub mod fault;
pub mod grpc;
pub mod keys;
pub mod metrics;
pub mod quorum;
pub mod secret;
pub mod service;
pub mod store;
