//! `arca elevate`, `arca break-glass`, `arca totp enroll`, `arca review list|close`,
//! `arca policy update`: the access-control use cases (DESIGN §5).
//!
//! Roles with MFA need a TOTP code: `--mfa` prompts for it, `ARCA_TOTP` supplies it to
//! scripts; it travels in the `x-arca-totp` header.

use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::requests::print_created;
use super::{call_error, BoxError, Client};
use crate::cli::{parse_duration_secs, ClientOpts, Output};
use crate::grpc::pb;

/// `arca elevate ROLE …`.
#[derive(Args)]
pub(in crate::cli) struct ElevateArgs {
    /// The role asked for.
    role: String,
    /// How long: 90s, 15m, 1h (default: the role's max_elevation).
    #[arg(long, value_parser = parse_duration_secs)]
    duration: Option<u64>,
    /// Why (custodians read it before approving).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    opts: ClientOpts,
}

/// `arca break-glass --reason …`.
#[derive(Args)]
pub(in crate::cli) struct BreakGlassArgs {
    /// Why (recorded on the review; an alert goes out at once).
    #[arg(long)]
    reason: String,
    /// How long: 90s, 15m, 1h (default: the policy's maximum, at most 1 h).
    #[arg(long, value_parser = parse_duration_secs)]
    duration: Option<u64>,
    #[command(flatten)]
    opts: ClientOpts,
}

/// `arca totp …`.
#[derive(Subcommand)]
pub(in crate::cli) enum TotpCommand {
    /// Enrol for TOTP: prints an otpauth:// URI once (re-enrolment needs --mfa).
    Enroll {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `arca review …`.
#[derive(Subcommand)]
pub(in crate::cli) enum ReviewCommand {
    /// List break-glass reviews (open ones only unless --all).
    List {
        /// Closed reviews too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Close a review with a note (auditors; never your own break-glass).
    Close {
        /// Review id (rev_…).
        id: String,
        /// What the review found.
        #[arg(long)]
        note: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `arca policy …`.
#[derive(Subcommand)]
pub(in crate::cli) enum PolicyCommand {
    /// Replace the access policy with one TOML document (a quorum operation).
    Update {
        /// The policy file.
        file: std::path::PathBuf,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn print_change(output: Output, r: &pb::AccessChangeResponse) {
    match &r.approval_request {
        Some(req) => print_created(output, req),
        None => match output {
            Output::Json => println!("{}", json!({ "outcome": r.outcome })),
            Output::Human => println!("{}", r.outcome),
        },
    }
}

fn review_json(r: &pb::Review) -> serde_json::Value {
    json!({
        "id": r.id, "grant_id": r.grant_id, "principal": r.principal, "reason": r.reason,
        "opened_at": r.opened_at, "closed_at": r.closed_at, "closed_by": r.closed_by,
        "note": r.note,
    })
}

pub(in crate::cli) async fn run_elevate(a: ElevateArgs) -> Result<(), BoxError> {
    let mut c = Client::connect(&a.opts).await?;
    let r = c
        .access
        .elevate(c.req(pb::ElevateRequest {
            role: a.role,
            duration_seconds: a.duration.unwrap_or(0),
            reason: a.reason,
        }))
        .await
        .map_err(call_error)?
        .into_inner();
    print_change(c.output, &r);
    Ok(())
}

pub(in crate::cli) async fn run_break_glass(a: BreakGlassArgs) -> Result<(), BoxError> {
    let mut c = Client::connect(&a.opts).await?;
    let r = c
        .access
        .break_glass(c.req(pb::BreakGlassRequest {
            reason: a.reason,
            duration_seconds: a.duration.unwrap_or(0),
        }))
        .await
        .map_err(call_error)?
        .into_inner();
    let review = r.review.unwrap_or_default();
    match c.output {
        Output::Json => println!(
            "{}",
            json!({"grant_id": r.grant_id, "role": r.role, "expires_at": r.expires_at,
                   "review": review_json(&review)})
        ),
        Output::Human => {
            println!(
                "break-glass: you hold role {} until {}",
                r.role, r.expires_at
            );
            println!("review {} is open until an auditor closes it", review.id);
        }
    }
    Ok(())
}

pub(in crate::cli) async fn run_totp(cmd: TotpCommand) -> Result<(), BoxError> {
    match cmd {
        TotpCommand::Enroll { opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .enroll_totp(c.req(pb::EnrollTotpRequest {}))
                .await
                .map_err(call_error)?
                .into_inner();
            let uri = Zeroizing::new(r.totp_uri);
            match c.output {
                Output::Json => println!("{}", json!({ "totp_uri": uri.as_str() })),
                Output::Human => {
                    println!("add to your authenticator (shown once):");
                    println!("{}", uri.as_str());
                }
            }
        }
    }
    Ok(())
}

pub(in crate::cli) async fn run_review(cmd: ReviewCommand) -> Result<(), BoxError> {
    match cmd {
        ReviewCommand::List { all, opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .list_reviews(c.req(pb::ListReviewsRequest { open_only: !all }))
                .await
                .map_err(call_error)?
                .into_inner();
            match c.output {
                Output::Json => println!(
                    "{}",
                    json!({"reviews": r.reviews.iter().map(review_json).collect::<Vec<_>>()})
                ),
                Output::Human => {
                    println!(
                        "{:<36} {:<24} {:<26} {:<8} REASON",
                        "ID", "PRINCIPAL", "OPENED", "STATE"
                    );
                    for v in &r.reviews {
                        let state = if v.closed_at.is_empty() {
                            "open"
                        } else {
                            "closed"
                        };
                        println!(
                            "{:<36} {:<24} {:<26} {:<8} {}",
                            v.id, v.principal, v.opened_at, state, v.reason
                        );
                    }
                }
            }
        }
        ReviewCommand::Close { id, note, opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .close_review(c.req(pb::CloseReviewRequest { id, note }))
                .await
                .map_err(call_error)?
                .into_inner();
            match c.output {
                Output::Json => println!("{}", review_json(&r)),
                Output::Human => println!("closed {} ({})", r.id, r.closed_at),
            }
        }
    }
    Ok(())
}

pub(in crate::cli) async fn run_policy(cmd: PolicyCommand) -> Result<(), BoxError> {
    match cmd {
        PolicyCommand::Update { file, opts } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .update_policy(c.req(pb::UpdatePolicyRequest { policy: text }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_change(c.output, &r);
        }
    }
    Ok(())
}
