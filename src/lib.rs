//! # Arca — an HSM-backed key management service
//!
//! Services call Arca to generate, wrap, unwrap and rewrap data keys under envelope
//! encryption. Key-encryption keys live in a PKCS#11 HSM and never leave it.
//!
//! ## Module map and dependency rules
//! Arrows point one way:
//! `grpc → service → {authz, keys} → {secret, clock}`; `keys → arca_hsm::Hsm` (the trait);
//! `service → store::Store` (the trait; the back end is chosen at start-up in `cli::server`).
//!
//! - [`secret`]: secret types (data keys, plaintext, bearer tokens, PINs): zeroized on drop,
//!   no `Debug`/`Clone`/`Serialize`.
//! - [`clock`]: the one place that reads the wall clock.
//! - [`keys`]: names, versions and states, the wrapped-key format v1, the canonical
//!   encryption context, and the [`keys::KeyEngine`] that runs HSM calls off the async
//!   runtime. Knows nothing of gRPC or SQL.
//! - [`store`]: the [`store::Store`] trait and its SQLite back end. The only module that
//!   uses sqlx.
//! - [`authz`]: principals, bearer-token authentication, and the access policy (roles ×
//!   operations × key globs × context conditions, bindings) with its one decision
//!   `authz::policy::Policy::authorize`.
//! - [`audit`]: the audit trail: records, hash chain, group-commit writer, verifier,
//!   alerts. Knows nothing of gRPC or SQL (it speaks `store::AuditStore`).
//! - [`metrics`]: Prometheus counters and histograms, and the admin HTTP endpoint.
//! - [`service`]: the use cases (authenticate → authorize → act → persist), and the
//!   background jobs of the key lifecycle (rotation, retention, destruction). No tonic
//!   types.
//! - [`grpc`]: generated code, proto ↔ domain conversion, the one error → `Status` mapping,
//!   request ids. The only module (with `cli`) that uses tonic/prost.
//! - [`cli`]: the `arca` subcommands; `server` wires everything together, the others are
//!   gRPC clients.
//! - [`config`]: server configuration.
//! - [`fault`]: crash points for the kill -9 tests (debug builds only).
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
