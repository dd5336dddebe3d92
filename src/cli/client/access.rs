//! `arca token create|revoke|list`, `arca elevate`, `arca break-glass`, `arca totp
//! enroll`, `arca review list|close`, `arca policy update`: the access-control use cases
//! (DESIGN §5).
//!
//! Roles with MFA need a TOTP code: `--mfa` prompts for it, `ARCA_TOTP` supplies it to
//! scripts; it travels in the `x-arca-totp` header. A token and a TOTP URI are shown
//! once, then wiped.
//!
//! Imports only the client's shared files, never another command file.

use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::args::{parse_duration_secs, ClientOpts, Output};
use super::call::call;
use super::error::CliError;
use super::render::print_created;
use crate::grpc::pb;

/// `arca token …`.
#[derive(Subcommand)]
pub(in crate::cli) enum TokenCommand {
    /// Mint a token (printed once).
    Create {
        /// Principal the token authenticates, e.g. svc:billing.
        #[arg(long)]
        principal: String,
        /// Role (repeat).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Key-name glob the token is limited to, e.g. 'billing/*' (repeat).
        #[arg(long = "key-glob")]
        key_globs: Vec<String>,
        /// Lifetime: 90s, 15m, 12h, 30d (default: no expiry).
        #[arg(long, value_parser = parse_duration_secs)]
        ttl: Option<u64>,
        /// Source network allowed, e.g. 10.0.0.0/8 (repeat).
        #[arg(long = "cidr")]
        cidrs: Vec<String>,
        /// Works only over mTLS with a client certificate naming this principal.
        #[arg(long)]
        bound_principal: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Revoke a token by id (effective at once).
    Revoke {
        /// Token id (tok_…).
        id: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List tokens (never shows a token).
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

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

/// Runs one `arca token` command.
pub(super) async fn run_token(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create {
            principal,
            roles,
            key_globs,
            ttl,
            cidrs,
            bound_principal,
            description,
            opts,
        } => {
            // The token is made here and only its SHA-256 goes to the server: it works
            // the same whether CreateToken runs at once or waits for quorum approval
            // (then it works once K custodians approved it), and it is never on the wire.
            let secret = crate::secret::random::<32>().map_err(|_| {
                std::io::Error::other("no randomness from the operating system for the token")
            })?;
            let token = crate::secret::BearerToken::from_random(&secret);
            let req = pb::CreateTokenRequest {
                principal,
                roles,
                key_globs,
                ttl_seconds: ttl.unwrap_or(0),
                cidrs,
                bound_principal: bound_principal.unwrap_or_default(),
                description,
                token_sha256: token.hash().to_hex(),
            };
            let show = |output, r: pb::CreateTokenResponse| {
                let token = Zeroizing::new(if r.token.is_empty() {
                    token.expose().to_string()
                } else {
                    r.token
                });
                if let Some(req) = &r.approval_request {
                    print_created(output, req);
                    match output {
                        Output::Json => println!("{}", json!({"token": token.as_str()})),
                        Output::Human => println!(
                            "token:   {}  (shown once; it works once the request is approved)",
                            token.as_str()
                        ),
                    }
                    return;
                }
                match output {
                    Output::Json => println!(
                        "{}",
                        json!({"id": r.id, "token": token.as_str(), "expires_at": r.expires_at})
                    ),
                    Output::Human => {
                        println!("id:      {}", r.id);
                        println!("token:   {}  (shown once)", token.as_str());
                        if !r.expires_at.is_empty() {
                            println!("expires: {}", r.expires_at);
                        }
                    }
                }
            };
            call(
                &opts,
                req,
                async |c, r| c.access.create_token(r).await,
                show,
            )
            .await
        }
        TokenCommand::Revoke { id, opts } => {
            let req = pb::RevokeTokenRequest { id: id.clone() };
            let show = |_, _| println!("revoked {id}");
            call(
                &opts,
                req,
                async |c, r| c.access.revoke_token(r).await,
                show,
            )
            .await
        }
        TokenCommand::List { opts } => {
            let req = pb::ListTokensRequest {};
            call(
                &opts,
                req,
                async |c, r| c.access.list_tokens(r).await,
                print_tokens,
            )
            .await
        }
    }
}

/// Runs `arca elevate`.
pub(super) async fn run_elevate(a: ElevateArgs) -> Result<(), CliError> {
    let req = pb::ElevateRequest {
        role: a.role,
        duration_seconds: a.duration.unwrap_or(0),
        reason: a.reason,
    };
    call(
        &a.opts,
        req,
        async |c, r| c.access.elevate(r).await,
        print_change,
    )
    .await
}

/// Runs `arca break-glass`.
pub(super) async fn run_break_glass(a: BreakGlassArgs) -> Result<(), CliError> {
    let req = pb::BreakGlassRequest {
        reason: a.reason,
        duration_seconds: a.duration.unwrap_or(0),
    };
    let show = |output, r: pb::BreakGlassResponse| {
        let review = r.review.unwrap_or_default();
        match output {
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
    };
    call(
        &a.opts,
        req,
        async |c, r| c.access.break_glass(r).await,
        show,
    )
    .await
}

/// Runs `arca totp enroll`.
pub(super) async fn run_totp(cmd: TotpCommand) -> Result<(), CliError> {
    let TotpCommand::Enroll { opts } = cmd;
    let show = |output, r: pb::EnrollTotpResponse| {
        let uri = Zeroizing::new(r.totp_uri);
        match output {
            Output::Json => println!("{}", json!({ "totp_uri": uri.as_str() })),
            Output::Human => {
                println!("add to your authenticator (shown once):");
                println!("{}", uri.as_str());
            }
        }
    };
    let req = pb::EnrollTotpRequest {};
    call(&opts, req, async |c, r| c.access.enroll_totp(r).await, show).await
}

/// Runs one `arca review` command.
pub(super) async fn run_review(cmd: ReviewCommand) -> Result<(), CliError> {
    match cmd {
        ReviewCommand::List { all, opts } => {
            let req = pb::ListReviewsRequest { open_only: !all };
            call(
                &opts,
                req,
                async |c, r| c.access.list_reviews(r).await,
                print_reviews,
            )
            .await
        }
        ReviewCommand::Close { id, note, opts } => {
            let req = pb::CloseReviewRequest { id, note };
            let show = |output, r: pb::Review| match output {
                Output::Json => println!("{}", review_json(&r)),
                Output::Human => println!("closed {} ({})", r.id, r.closed_at),
            };
            call(
                &opts,
                req,
                async |c, r| c.access.close_review(r).await,
                show,
            )
            .await
        }
    }
}

/// Runs `arca policy update` (the file is read before connecting).
pub(super) async fn run_policy(cmd: PolicyCommand) -> Result<(), CliError> {
    let PolicyCommand::Update { file, opts } = cmd;
    let text = std::fs::read_to_string(&file).map_err(|source| CliError::Read {
        what: file.display().to_string(),
        source,
    })?;
    let req = pb::UpdatePolicyRequest { policy: text };
    call(
        &opts,
        req,
        async |c, r| c.access.update_policy(r).await,
        print_change,
    )
    .await
}

fn print_tokens(output: Output, r: pb::ListTokensResponse) {
    match output {
        Output::Json => println!(
            "{}",
            json!({"tokens": r.tokens.iter().map(|t| json!({
                "id": t.id, "principal": t.principal, "roles": t.roles,
                "key_globs": t.key_globs, "cidrs": t.cidrs,
                "bound_principal": t.bound_principal, "created_at": t.created_at,
                "expires_at": t.expires_at, "revoked_at": t.revoked_at,
            })).collect::<Vec<_>>()})
        ),
        Output::Human => {
            println!(
                "{:<22} {:<28} {:<20} {:<24} STATE",
                "ID", "PRINCIPAL", "ROLES", "KEYS"
            );
            for t in &r.tokens {
                let state = if !t.revoked_at.is_empty() {
                    "revoked"
                } else if !t.expires_at.is_empty() {
                    "expires"
                } else {
                    "active"
                };
                println!(
                    "{:<22} {:<28} {:<20} {:<24} {state}",
                    t.id,
                    t.principal,
                    t.roles.join(","),
                    if t.key_globs.is_empty() {
                        "*".to_string()
                    } else {
                        t.key_globs.join(",")
                    }
                );
            }
        }
    }
}

/// The outcome of an access change, or the approval request it made.
fn print_change(output: Output, r: pb::AccessChangeResponse) {
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

fn print_reviews(output: Output, r: pb::ListReviewsResponse) {
    match output {
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
