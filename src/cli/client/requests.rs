//! `arca request list|show`, `arca approve`, `arca reject`: approval requests of quorum
//! operations (DESIGN §2).
//!
//! `show` recomputes the digest from the operation and parameters it received and says
//! whether it matches the one the server reports: a custodian approves the digest of what
//! they read, and the server checks it against the request.
//!
//! Imports only the client's shared files, never another command file.

use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::args::{ClientOpts, Output};
use super::call::call;
use super::error::CliError;
use super::input::read_secret;
use super::render::{print_request, request_json, sorted_params, wipe_kits, write_kit};
use crate::grpc::pb;

/// `arca request …`.
#[derive(Subcommand)]
pub(in crate::cli) enum RequestCommand {
    /// List approval requests, newest first.
    List {
        /// Only requests in this state (pending, executed, rejected, expired, failed).
        #[arg(long)]
        state: Option<String>,
        /// Requests per page.
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// Continue from a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show one request: what would run, its digest, approvals and outcome.
    Show {
        /// Request id (req_…).
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `arca approve ID …`.
#[derive(Args)]
pub(in crate::cli) struct ApproveArgs {
    /// Request id (req_…).
    id: String,
    /// The digest you reviewed with `arca request show ID`.
    #[arg(long)]
    digest: String,
    /// File with your share (default: read one line from stdin).
    #[arg(long)]
    share_file: Option<std::path::PathBuf>,
    /// Current TOTP code from your authenticator.
    #[arg(long, env = "ARCA_TOTP")]
    totp: String,
    /// If this approval executes a rekey: write each new custodian's kit to
    /// DIR/NAME/{share,token,totp-uri} (0600) instead of printing it.
    #[arg(long)]
    out_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    opts: ClientOpts,
}

/// `arca reject ID --reason …`.
#[derive(Args)]
pub(in crate::cli) struct RejectArgs {
    /// Request id (req_…).
    id: String,
    /// Why (recorded on the request).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Runs one `arca request` command.
pub(super) async fn run_request(cmd: RequestCommand) -> Result<(), CliError> {
    match cmd {
        RequestCommand::List {
            state,
            page_size,
            page_token,
            opts,
        } => {
            let req = pb::ListRequestsRequest {
                state: state.unwrap_or_default(),
                page_size,
                page_token,
            };
            call(
                &opts,
                req,
                async |c, r| c.quorum.list_requests(r).await,
                print_requests,
            )
            .await
        }
        RequestCommand::Show { id, opts } => {
            let req = pb::GetRequestRequest { id };
            let show = |out, r: pb::ApprovalRequest| print_request(out, &r);
            call(&opts, req, async |c, r| c.quorum.get_request(r).await, show).await
        }
    }
}

/// Runs `arca approve` (the share is read before connecting).
pub(super) async fn run_approve(a: ApproveArgs) -> Result<(), CliError> {
    let share = read_secret(a.share_file.as_deref(), "share")?;
    let totp = Zeroizing::new(a.totp);
    let req = pb::ApproveRequest {
        id: a.id,
        digest: a.digest,
        share: share.to_string(),
        totp: totp.to_string(),
    };
    let out_dir = a.out_dir;
    let show = |output, mut r: pb::ApprovalRequest| {
        let kits = std::mem::take(&mut r.new_kits);
        let shown = print_approved(output, &r, &kits, out_dir.as_deref());
        wipe_kits(kits);
        shown
    };
    call(&a.opts, req, async |c, r| c.quorum.approve(r).await, show).await
}

/// Runs `arca reject`.
pub(super) async fn run_reject(a: RejectArgs) -> Result<(), CliError> {
    let req = pb::RejectRequest {
        id: a.id,
        reason: a.reason,
    };
    let show = |out, r: pb::ApprovalRequest| print_request(out, &r);
    call(&a.opts, req, async |c, r| c.quorum.reject(r).await, show).await
}

fn print_requests(output: Output, r: pb::ListRequestsResponse) {
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "requests": r.requests.iter().map(request_json).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            })
        ),
        Output::Human => {
            println!(
                "{:<36} {:<18} {:<9} {:>9}  {:<24} PARAMETERS",
                "ID", "OPERATION", "STATE", "APPROVALS", "EXPIRES"
            );
            for q in &r.requests {
                let params: Vec<String> = sorted_params(q)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<36} {:<18} {:<9} {:>9}  {:<24} {}",
                    q.id,
                    q.operation,
                    q.state,
                    format!("{}/{}", q.approvals.len(), q.threshold),
                    q.expires_at,
                    params.join(" ")
                );
            }
            if !r.next_page_token.is_empty() {
                println!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
}

/// The approval's outcome, then the request, then (if it executed a rekey) the new kits.
fn print_approved(
    output: Output,
    r: &pb::ApprovalRequest,
    kits: &[pb::CustodianKit],
    out_dir: Option<&std::path::Path>,
) -> Result<(), CliError> {
    if output == Output::Human {
        match r.state.as_str() {
            "EXECUTED" => println!("approved: the request had its quorum and was executed"),
            _ => println!(
                "approved: {} of {} approvals",
                r.approvals.len(),
                r.threshold
            ),
        }
    }
    match (output, out_dir) {
        (Output::Json, None) if !kits.is_empty() => {
            let mut v = request_json(r);
            v["new_kits"] = json!(kits
                .iter()
                .map(|k| json!({
                    "custodian": k.custodian,
                    "share": k.share,
                    "token": k.token,
                    "totp_uri": k.totp_uri,
                }))
                .collect::<Vec<_>>());
            println!("{v}");
            Ok(())
        }
        (output, out_dir) => {
            print_request(output, r);
            deliver_kits(kits, out_dir)
        }
    }
}

/// The new kits of an executed rekey: printed once, or written under `out_dir`.
fn deliver_kits(
    kits: &[pb::CustodianKit],
    out_dir: Option<&std::path::Path>,
) -> Result<(), CliError> {
    if kits.is_empty() {
        if out_dir.is_some() {
            eprintln!("note: this approval executed no rekey; nothing written");
        }
        return Ok(());
    }
    match out_dir {
        Some(dir) => {
            for k in kits {
                write_kit(dir, k)?;
            }
            eprintln!(
                "rekeyed: {} new kits written under {} — they exist nowhere else: hand each \
                 directory to its custodian, then delete it",
                kits.len(),
                dir.display()
            );
        }
        None => {
            println!();
            println!(
                "rekeyed. The {} kits below exist nowhere else and are shown once: hand each \
                 block to its custodian only.",
                kits.len()
            );
            for k in kits {
                println!();
                println!("custodian: {}", k.custodian);
                println!("share:     {}", k.share);
                println!("token:     {}", k.token);
                println!("totp:      {}", k.totp_uri);
            }
        }
    }
    Ok(())
}
