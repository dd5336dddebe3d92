//! Server configuration, validated once at start-up. Secrets (the HSM PIN) are referenced
//! by file, never given inline, and the `Debug` of every type here prints no secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the HSM is and how to use it.
#[derive(Clone, Debug)]
pub struct HsmSettings {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token holding Arca's keys.
    pub token_label: String,
    /// File holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    /// PKCS#11 sessions kept open (and worker threads using them).
    pub sessions: usize,
    /// Copy token keys into session objects for speed (they stay non-extractable).
    pub session_key_copies: bool,
    /// How long a request waits for the HSM.
    pub op_timeout: Duration,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything `arca server` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Dev mode: plaintext on loopback, local SoftHSM token, auto-setup.
    pub dev: bool,
    /// Data directory (SQLite file, dev token, SoftHSM token in dev mode).
    pub data_dir: PathBuf,
    /// SQLite database file.
    pub database: PathBuf,
    /// HSM settings.
    pub hsm: HsmSettings,
    /// Wraps reserved in the database at a time per version.
    pub wrap_reservation: u64,
    /// Request limits.
    pub serve: crate::grpc::ServeOptions,
}
