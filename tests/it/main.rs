//! Arca's integration tests: one binary, one module per area. Every test runs the real
//! `arca` binary in dev mode against a real SoftHSM token and a real SQLite database in
//! its own temporary directory (see [`support::TestArca`]); nothing is mocked.
//!
//! Needs softhsm2, opensc (pkcs11-tool) and p11-kit (server and client module):
//! `scripts/setup --no-run` installs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod access;
mod cli;
mod datakeys;
mod hsm_objects;
mod lifecycle;
mod load;
mod outage;
mod secrets_at_rest;
mod tamper;
mod validation;
