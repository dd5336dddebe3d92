//! The client subcommands of `arca`: each sends one kind of gRPC request to a running
//! server and prints the answer as text or JSON (`--output json`).
//!
//! Every command goes through one path, [`call`]: connect with the shared options
//! ([`args::ClientOpts`]), send the request with the caller's credentials, turn a refusal
//! into [`error::CliError`], render the answer. A command's file states only its
//! arguments, its request and how its answer prints.
//!
//! Files, lowest first: `args` (shared options and parsers), `error`, `input` (secrets
//! and key material read before a call), `call` (the path), `render` (renderings shared
//! by several commands), then one file per family of commands: `keys`, `operator`,
//! `access`, `requests`, `audit`. A command file imports only from the files below it,
//! never from another command file or from this one.
//!
//! Must not import the store, the HSM or the service: a client knows only the wire.

mod access;
mod args;
mod audit;
mod call;
mod error;
mod input;
mod keys;
mod operator;
mod render;
mod requests;

use clap::Subcommand;

use error::CliError;

/// The subcommands that are gRPC clients (flattened into `arca`'s command list).
#[derive(Subcommand)]
pub(super) enum ClientCommand {
    /// Manage keys.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Data keys.
    #[command(subcommand)]
    Datakey(keys::DatakeyCommand),
    /// Wrap key material (base64, 16 to 64 bytes) under a key's primary version.
    Wrap(keys::WrapArgs),
    /// Unwrap a wrapped key (base64).
    Unwrap(keys::UnwrapArgs),
    /// Move a wrapped key (base64) to its key's primary version.
    Rewrap(keys::UnwrapArgs),
    /// Scoped bearer tokens.
    #[command(subcommand)]
    Token(access::TokenCommand),
    /// Dual control: init, unseal, seal, status, rekey.
    #[command(subcommand)]
    Operator(operator::OperatorCommand),
    /// Approval requests of quorum operations: list, show.
    #[command(subcommand)]
    Request(requests::RequestCommand),
    /// Approve a request as a custodian (digest reviewed, share, TOTP code).
    Approve(requests::ApproveArgs),
    /// Reject (cancel) a pending request, as a custodian or its requester.
    Reject(requests::RejectArgs),
    /// Ask for a role for a while (quorum-approved; expires by itself).
    Elevate(access::ElevateArgs),
    /// Take the emergency role at once (listed principals only; alerts; opens a review).
    BreakGlass(access::BreakGlassArgs),
    /// TOTP enrolment for roles that need MFA.
    #[command(subcommand)]
    Totp(access::TotpCommand),
    /// Break-glass reviews: list, close (auditors).
    #[command(subcommand)]
    Review(access::ReviewCommand),
    /// The access policy: update (quorum-approved).
    #[command(subcommand)]
    Policy(access::PolicyCommand),
    /// The audit trail: verify, query, export (auditor role).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// Runs one client command.
pub(super) async fn run(cmd: ClientCommand) -> Result<(), CliError> {
    match cmd {
        ClientCommand::Key(c) => keys::run_key(c).await,
        ClientCommand::Datakey(c) => keys::run_datakey(c).await,
        ClientCommand::Wrap(a) => keys::run_wrap(a).await,
        ClientCommand::Unwrap(a) => keys::run_unwrap(a).await,
        ClientCommand::Rewrap(a) => keys::run_rewrap(a).await,
        ClientCommand::Token(c) => access::run_token(c).await,
        ClientCommand::Operator(c) => operator::run(c).await,
        ClientCommand::Request(c) => requests::run_request(c).await,
        ClientCommand::Approve(a) => requests::run_approve(a).await,
        ClientCommand::Reject(a) => requests::run_reject(a).await,
        ClientCommand::Elevate(a) => access::run_elevate(a).await,
        ClientCommand::BreakGlass(a) => access::run_break_glass(a).await,
        ClientCommand::Totp(c) => access::run_totp(c).await,
        ClientCommand::Review(c) => access::run_review(c).await,
        ClientCommand::Policy(c) => access::run_policy(c).await,
        ClientCommand::Audit(c) => audit::run(c).await,
    }
}
