//! Arca's integration tests: one binary, one module per area. Every test runs the real
//! `arca` binary in dev mode against a real SoftHSM token and a real database (SQLite in
//! its own temporary directory, or a fresh PostgreSQL database) (see
//! [`support::TestArca`]); nothing is mocked. The tests that touch storage run on both
//! back ends (`NAME::sqlite`, `NAME::postgres`); PostgreSQL needs `ARCA_TEST_POSTGRES_URL`
//! (scripts/test starts a throwaway server) and is skipped without it unless
//! `ARCA_REQUIRE_POSTGRES=1`.
//!
//! Plumbing (servers, clients, custodian kits, the CLI runner, database shells) lives in
//! [`support`], once; test modules define none of their own and import nothing from each
//! other.
//!
//! Needs softhsm2, opensc (pkcs11-tool), p11-kit (server and client module) and the
//! PostgreSQL client (psql, pg_dump, pg_restore): `scripts/setup --no-run` installs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod support;

mod access;
mod age;
mod approvals;
mod audit;
mod audit_subjects;
mod backup;
mod cli;
mod cluster;
mod database;
mod datakeys;
mod gates;
mod hsm_objects;
mod lifecycle;
mod limits;
mod load;
mod lockout;
mod outage;
mod people;
mod production;
mod quorum;
mod ratelimit;
mod rbac;
mod secrets_at_rest;
mod shred;
mod shutdown;
mod state;
mod tamper;
mod tls;
mod tokens;
mod validation;
