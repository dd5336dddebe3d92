//! The `arca` command line as a client of a running server: [`Cli`] runs it with
//! `ARCA_ADDR` and `ARCA_TOKEN` (and, over TLS, the CA and client certificate), off the
//! async runtime, to completion. `ARCA_TOTP` comes only from [`Cli::env`], never from the
//! caller's environment. Imports only [`super::server`].

use std::ffi::OsString;

use super::server::{arca_command, output_of, TestArca};

/// What one `arca` run printed.
#[derive(Debug)]
pub struct CliOutput {
    /// It exited 0.
    pub ok: bool,
    /// Its stdout.
    pub out: String,
    /// Its stderr.
    pub err: String,
}

/// `arca` as one principal of one server.
#[derive(Clone)]
pub struct Cli {
    env: Vec<(OsString, OsString)>,
}

impl Cli {
    /// The CLI against the server at `addr` (`http://…` or `https://…`) as `token`.
    pub fn new(addr: &str, token: &str) -> Cli {
        Cli {
            env: vec![
                ("ARCA_ADDR".into(), addr.into()),
                ("ARCA_TOKEN".into(), token.into()),
            ],
        }
    }

    /// With one more environment variable (`ARCA_TOTP`, `ARCA_CACERT`, …).
    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Cli {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs `arca ARGS`.
    pub async fn run(&self, args: &[&str]) -> CliOutput {
        let mut cmd = arca_command();
        cmd.args(args)
            .env_remove("ARCA_TOTP")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = output_of(cmd).await;
        CliOutput {
            ok: out.status.success(),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `arca ARGS --output json`, which must succeed, and parses what it printed.
    pub async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let r = self.run(&all).await;
        assert!(r.ok, "arca {args:?} failed: {}", r.err);
        serde_json::from_str(&r.out).unwrap_or_else(|e| panic!("arca {args:?}: {e}: {}", r.out))
    }
}

impl TestArca {
    /// The CLI against this server as `token`.
    pub fn cli(&self, token: &str) -> Cli {
        Cli::new(&self.url(), token)
    }
}
