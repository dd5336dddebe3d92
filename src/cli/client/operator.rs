//! `arca operator init|unseal|rekey|seal|status`: dual control of the seal (DESIGN §2).
//!
//! Secrets (the SO PIN, a share) are read before connecting, from a file or one line of
//! stdin. Custodian kits are shown once, or written to private files, then wiped.
//!
//! Imports only the client's shared files, never another command file.

use clap::Subcommand;
use serde_json::json;

use super::args::{parse_age_recipient, parse_kv, ClientOpts, Output};
use super::call::call;
use super::error::CliError;
use super::input::read_secret;
use super::render::{print_created, wipe_kits, write_kit};
use crate::grpc::pb;

/// `arca operator …`.
#[derive(Subcommand)]
pub(in crate::cli) enum OperatorCommand {
    /// Initialise dual control: K-of-N custodians; prints (or writes) each kit once.
    Init {
        /// N: must equal the number of --custodian names.
        #[arg(long)]
        shares: Option<u32>,
        /// K: custodians needed to unseal or approve.
        #[arg(long)]
        threshold: u32,
        /// Custodian names (repeat).
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
        /// File with the token's SO PIN (default: read one line from stdin).
        #[arg(long)]
        so_pin_file: Option<std::path::PathBuf>,
        /// Write each custodian's kit to DIR/NAME/{share,token,totp-uri} (0600) instead of
        /// printing it.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// NAME=age1…: return NAME's share age-encrypted (ASCII armor) to that X25519
        /// recipient; decrypt with `age -d -i KEY`. Tokens and TOTP URIs stay plain (repeat).
        #[arg(long = "age-recipient", value_parser = parse_age_recipient)]
        age_recipients: Vec<(String, String)>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Submit this custodian's share (authenticated as the custodian).
    Unseal {
        /// File with the share (default: read one line from stdin).
        #[arg(long)]
        share_file: Option<std::path::PathBuf>,
        /// Current TOTP code from the custodian's authenticator.
        #[arg(long, env = "ARCA_TOTP")]
        totp: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Change the custodians, threshold or shares (a quorum operation: prints the
    /// approval request; the approval that executes it receives the new kits).
    Rekey {
        /// New N: must equal the number of --custodian names.
        #[arg(long)]
        shares: Option<u32>,
        /// New K: custodians needed to unseal or approve.
        #[arg(long)]
        threshold: u32,
        /// New custodian names (repeat).
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
        /// Return this new custodian's share encrypted to an age key: NAME=age1… (repeat).
        #[arg(long = "age-recipient", value_parser = parse_kv)]
        age_recipients: Vec<(String, String)>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Seal now: every HSM session closes.
    Seal {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Seal state and unseal progress.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// Runs one `arca operator` command.
pub(super) async fn run(cmd: OperatorCommand) -> Result<(), CliError> {
    let show_status = |out, s: pb::SealStatusResponse| print_seal_status(out, &s);
    match cmd {
        OperatorCommand::Init {
            shares,
            threshold,
            custodians,
            so_pin_file,
            out_dir,
            age_recipients,
            opts,
        } => {
            if shares.is_some_and(|n| n as usize != custodians.len()) {
                return Err(CliError::SharesMismatch);
            }
            let so_pin = read_secret(so_pin_file.as_deref(), "SO PIN")?;
            let req = pb::InitRequest {
                threshold,
                custodians,
                so_pin: so_pin.to_string(),
                age_recipients: age_recipients.into_iter().collect(),
            };
            let show = |_, r: pb::InitResponse| {
                let shown = print_kits(&r, out_dir.as_deref());
                wipe_kits(r.custodians);
                shown
            };
            call(&opts, req, async |c, r| c.quorum.init(r).await, show).await
        }
        OperatorCommand::Unseal {
            share_file,
            totp,
            opts,
        } => {
            let share = read_secret(share_file.as_deref(), "share")?;
            let req = pb::UnsealRequest {
                share: share.to_string(),
                totp,
            };
            call(
                &opts,
                req,
                async |c, r| c.quorum.unseal(r).await,
                show_status,
            )
            .await
        }
        OperatorCommand::Rekey {
            shares,
            threshold,
            custodians,
            age_recipients,
            opts,
        } => {
            if shares.is_some_and(|n| n as usize != custodians.len()) {
                return Err(CliError::SharesMismatch);
            }
            let req = pb::RekeyRequest {
                threshold,
                custodians,
                shares: shares.unwrap_or(0),
                age_recipients: age_recipients.into_iter().collect(),
            };
            let show = |out, r: pb::ApprovalRequest| print_created(out, &r);
            call(&opts, req, async |c, r| c.quorum.rekey(r).await, show).await
        }
        OperatorCommand::Seal { opts } => {
            let req = pb::SealRequest {};
            call(&opts, req, async |c, r| c.quorum.seal(r).await, show_status).await
        }
        OperatorCommand::Status { opts } => {
            let req = pb::SealStatusRequest {};
            call(
                &opts,
                req,
                async |c, r| c.quorum.seal_status(r).await,
                show_status,
            )
            .await
        }
    }
}

/// The kits `operator init` made: written under `out_dir`, or printed once (the same
/// text in either output format: kits are for people).
fn print_kits(r: &pb::InitResponse, out_dir: Option<&std::path::Path>) -> Result<(), CliError> {
    match out_dir {
        Some(dir) => {
            for k in &r.custodians {
                write_kit(dir, k)?;
            }
            println!(
                "initialised {} of {}; kits written under {} — hand each directory to its custodian, then delete it",
                r.threshold,
                r.custodians.len(),
                dir.display()
            );
        }
        None => {
            println!("initialised {} of {}. Each block below is shown once: hand it to its custodian only.", r.threshold, r.custodians.len());
            for k in &r.custodians {
                println!();
                println!("custodian: {}", k.custodian);
                if k.share.contains('\n') {
                    print!("share (age-encrypted):\n{}", k.share);
                } else {
                    println!("share:     {}", k.share);
                }
                println!("token:     {}", k.token);
                println!("totp:      {}", k.totp_uri);
            }
        }
    }
    Ok(())
}

fn print_seal_status(output: Output, s: &pb::SealStatusResponse) {
    match output {
        Output::Json => println!(
            "{}",
            json!({"initialized": s.initialized, "sealed": s.sealed, "threshold": s.threshold,
                   "shares": s.shares, "progress": s.progress,
                   "hsm_logins_refused": s.hsm_logins_refused})
        ),
        Output::Human => {
            println!("initialized: {}", s.initialized);
            println!("sealed:      {}", s.sealed);
            if s.initialized {
                println!("threshold:   {} of {}", s.threshold, s.shares);
            }
            if s.hsm_logins_refused > 0 {
                println!("HSM logins refused (ever): {}", s.hsm_logins_refused);
            }
            if s.sealed && !s.progress.is_empty() {
                println!(
                    "unseal progress: {} of {} ({})",
                    s.progress.len(),
                    s.threshold,
                    s.progress.join(", ")
                );
            }
        }
    }
}
