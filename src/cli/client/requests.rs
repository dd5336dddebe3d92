//! `arca request list|show`, `arca approve`, `arca reject`: approval requests of quorum
//! operations (DESIGN §2).
//!
//! `show` recomputes the digest from the operation and parameters it received and says
//! whether it matches the one the server reports: a custodian approves the digest of what
//! they read, and the server checks it against the request.

use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::{call_error, key_json, print_key, read_secret, write_private, BoxError, Client};
use crate::cli::{ClientOpts, Output};
use crate::grpc::pb;
use crate::quorum::approvals::{digest, Operation, Parameters};

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

/// Whether the reported digest is the digest of the reported operation and parameters.
fn digest_verified(r: &pb::ApprovalRequest) -> bool {
    let params: Parameters = r
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Operation::parse(&r.operation).is_some_and(|op| digest(op, &params) == r.digest)
}

fn sorted_params(r: &pb::ApprovalRequest) -> Vec<(&String, &String)> {
    let mut p: Vec<_> = r.parameters.iter().collect();
    p.sort();
    p
}

fn request_json(r: &pb::ApprovalRequest) -> serde_json::Value {
    let params: serde_json::Map<String, serde_json::Value> = sorted_params(r)
        .into_iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "id": r.id,
        "operation": r.operation,
        "parameters": params,
        "digest": r.digest,
        "digest_verified": digest_verified(r),
        "requester": r.requester,
        "threshold": r.threshold,
        "approvals": r.approvals.iter().map(|a| json!({
            "custodian": a.custodian,
            "approved_at": a.approved_at,
        })).collect::<Vec<_>>(),
        "state": r.state,
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "decided_at": r.decided_at,
        "rejected_by": r.rejected_by,
        "reason": r.reason,
        "result": r.result.as_ref().map(key_json),
        "outcome": r.outcome,
    })
}

/// Prints one request in full.
pub(super) fn print_request(output: Output, r: &pb::ApprovalRequest) {
    match output {
        Output::Json => println!("{}", request_json(r)),
        Output::Human => {
            println!("request:    {}", r.id);
            println!("operation:  {}", r.operation);
            println!("parameters:");
            for (k, v) in sorted_params(r) {
                println!("  {k} = {v}");
            }
            println!("requester:  {}", r.requester);
            println!("created:    {}", r.created_at);
            println!("expires:    {}", r.expires_at);
            let who: Vec<&str> = r.approvals.iter().map(|a| a.custodian.as_str()).collect();
            println!(
                "state:      {} ({} of {} approvals{}{})",
                r.state,
                r.approvals.len(),
                r.threshold,
                if who.is_empty() { "" } else { ": " },
                who.join(", ")
            );
            if !r.rejected_by.is_empty() {
                println!("rejected by {}", r.rejected_by);
            }
            if !r.reason.is_empty() {
                println!("reason:     {}", r.reason);
            }
            if digest_verified(r) {
                println!(
                    "digest:     {} (the digest of the operation and parameters above)",
                    r.digest
                );
            } else {
                println!("digest:     {}", r.digest);
                println!(
                    "WARNING: this digest is NOT the digest of the operation and parameters \
                     shown: do not approve"
                );
            }
            if !r.outcome.is_empty() {
                println!("outcome:    {}", r.outcome);
            }
            if let Some(k) = &r.result {
                println!("result:");
                print_key(Output::Human, k);
            }
        }
    }
}

/// Prints the request an administrative call made.
pub(super) fn print_created(output: Output, r: &pb::ApprovalRequest) {
    match output {
        Output::Json => println!("{}", json!({ "approval_request": request_json(r) })),
        Output::Human => {
            println!(
                "approval required: {} custodians must approve request {}",
                r.threshold, r.id
            );
            print_request(output, r);
            println!();
            println!("custodians: review with `arca request show {}`, then", r.id);
            println!(
                "  arca approve {} --digest {} --share-file SHARE --totp CODE",
                r.id, r.digest
            );
        }
    }
}

pub(in crate::cli) async fn run_request(cmd: RequestCommand) -> Result<(), BoxError> {
    match cmd {
        RequestCommand::List {
            state,
            page_size,
            page_token,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .quorum
                .list_requests(c.req(pb::ListRequestsRequest {
                    state: state.unwrap_or_default(),
                    page_size,
                    page_token,
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            match c.output {
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
        RequestCommand::Show { id, opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .quorum
                .get_request(c.req(pb::GetRequestRequest { id }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_request(c.output, &r);
        }
    }
    Ok(())
}

pub(in crate::cli) async fn run_approve(a: ApproveArgs) -> Result<(), BoxError> {
    let share = read_secret(a.share_file.as_deref(), "share")?;
    let totp = Zeroizing::new(a.totp);
    let mut c = Client::connect(&a.opts).await?;
    let mut r = c
        .quorum
        .approve(c.req(pb::ApproveRequest {
            id: a.id,
            digest: a.digest,
            share: share.to_string(),
            totp: totp.to_string(),
        }))
        .await
        .map_err(call_error)?
        .into_inner();
    let kits = std::mem::take(&mut r.new_kits);
    if c.output == Output::Human {
        match r.state.as_str() {
            "EXECUTED" => println!("approved: the request had its quorum and was executed"),
            _ => println!(
                "approved: {} of {} approvals",
                r.approvals.len(),
                r.threshold
            ),
        }
    }
    let written = match (c.output, a.out_dir.as_deref()) {
        (Output::Json, None) if !kits.is_empty() => {
            let mut v = request_json(&r);
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
            print_request(output, &r);
            deliver_kits(&kits, out_dir)
        }
    };
    for k in kits {
        drop(Zeroizing::new(k.share));
        drop(Zeroizing::new(k.token));
        drop(Zeroizing::new(k.totp_uri));
    }
    written
}

/// The new kits of an executed rekey: printed once, or written under `out_dir`.
fn deliver_kits(
    kits: &[pb::CustodianKit],
    out_dir: Option<&std::path::Path>,
) -> Result<(), BoxError> {
    if kits.is_empty() {
        if out_dir.is_some() {
            eprintln!("note: this approval executed no rekey; nothing written");
        }
        return Ok(());
    }
    match out_dir {
        Some(dir) => {
            for k in kits {
                let d = dir.join(&k.custodian);
                std::fs::create_dir_all(&d)?;
                write_private(&d.join("share"), k.share.as_bytes())?;
                write_private(&d.join("token"), k.token.as_bytes())?;
                write_private(&d.join("totp-uri"), k.totp_uri.as_bytes())?;
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

pub(in crate::cli) async fn run_reject(a: RejectArgs) -> Result<(), BoxError> {
    let mut c = Client::connect(&a.opts).await?;
    let r = c
        .quorum
        .reject(c.req(pb::RejectRequest {
            id: a.id,
            reason: a.reason,
        }))
        .await
        .map_err(call_error)?
        .into_inner();
    print_request(c.output, &r);
    Ok(())
}
