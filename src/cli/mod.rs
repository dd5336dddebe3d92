//! The `arca` command line: `arca server` wires and runs the service; every other
//! subcommand is a gRPC client of a running server (it never touches the store or HSM).
//!
//! The address and token come from `--addr`/`--token` or `ARCA_ADDR`/`ARCA_TOKEN`, as
//! Vault's CLI does. Output is human-readable, or JSON with `--output json`. Key material
//! is read and written base64-encoded.

mod client;
mod server;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default address of a dev server.
pub const DEFAULT_DEV_ADDR: &str = "127.0.0.1:7420";

#[derive(Parser)]
#[command(
    name = "arca",
    version,
    about = "Arca: HSM-backed key management service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Server(Box<server::ServerArgs>),
    /// Manage keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Data keys.
    #[command(subcommand)]
    Datakey(DatakeyCommand),
    /// Wrap key material (base64, 16 to 64 bytes) under a key's primary version.
    Wrap(WrapArgs),
    /// Unwrap a wrapped key (base64).
    Unwrap(UnwrapArgs),
    /// Move a wrapped key (base64) to its key's primary version.
    Rewrap(UnwrapArgs),
    /// Scoped bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Dual control: init, unseal, seal, status, rekey.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Approval requests of quorum operations: list, show.
    #[command(subcommand)]
    Request(client::RequestCommand),
    /// Approve a request as a custodian (digest reviewed, share, TOTP code).
    Approve(client::ApproveArgs),
    /// Reject (cancel) a pending request, as a custodian or its requester.
    Reject(client::RejectArgs),
    /// Ask for a role for a while (quorum-approved; expires by itself).
    Elevate(client::ElevateArgs),
    /// Take the emergency role at once (listed principals only; alerts; opens a review).
    BreakGlass(client::BreakGlassArgs),
    /// TOTP enrolment for roles that need MFA.
    #[command(subcommand)]
    Totp(client::TotpCommand),
    /// Break-glass reviews: list, close (auditors).
    #[command(subcommand)]
    Review(client::ReviewCommand),
    /// The access policy: update (quorum-approved).
    #[command(subcommand)]
    Policy(client::PolicyCommand),
    /// The audit trail: verify, query, export (auditor role).
    #[command(subcommand)]
    Audit(client::AuditCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
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

/// `90s`, `15m`, `12h`, `30d` or plain seconds.
pub(crate) fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} too large"))
}

#[derive(Subcommand)]
enum OperatorCommand {
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

/// Connection and output options shared by the client commands.
#[derive(Args, Clone)]
pub struct ClientOpts {
    /// Server address (http://host:port).
    #[arg(
        long,
        env = "ARCA_ADDR",
        default_value = "http://127.0.0.1:7420",
        global = true
    )]
    addr: String,
    /// Bearer token (prefer ARCA_TOKEN: flags show in process lists).
    #[arg(long, env = "ARCA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    output: Output,
    /// CA certificate (PEM) that the server's certificate chains to (https:// addresses).
    #[arg(long, env = "ARCA_CACERT", global = true)]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "ARCA_CLIENT_CERT", global = true, requires = "client_key")]
    client_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "ARCA_CLIENT_KEY", global = true, requires = "client_cert")]
    client_key: Option<std::path::PathBuf>,
    /// Prompt for a TOTP code and send it as x-arca-totp (roles with MFA). Scripts set
    /// ARCA_TOTP instead, which is sent whenever it is set.
    #[arg(long, global = true)]
    mfa: bool,
}

/// Output format of client commands.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text.
    Human,
    /// One JSON document.
    Json,
}

/// `90d`, `12h`, `1d12h`, `30s` → seconds.
fn parse_seconds(s: &str) -> Result<u64, String> {
    crate::clock::parse_duration_ms(s)
        .filter(|ms| *ms >= 1000 && ms % 1000 == 0)
        .and_then(|ms| u64::try_from(ms / 1000).ok())
        .ok_or_else(|| format!("invalid duration {s:?}: use e.g. 90d, 12h, 1d12h, 30s"))
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key (its version 1 is generated in the HSM).
    Create {
        /// Key name: [a-z0-9][a-z0-9_/-]{0,127}.
        name: String,
        /// Free-text description.
        #[arg(long, default_value = "")]
        description: String,
        /// Scheduled rotation: a new primary version this often (e.g. 90d).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        rotate_every: Option<u64>,
        /// Retention date (RFC 3339 or YYYY-MM-DD): then the whole key is retired with
        /// the policy's default waiting period, and destroyed after it.
        #[arg(long, value_name = "TIME")]
        retain_until: Option<String>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show a key's versions: state, wraps, destruction schedule and tombstones.
    Versions {
        /// Key name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Retire a key version (or with no --version, every version of the key): after the
    /// waiting period its HSM object is destroyed and everything wrapped under it is
    /// unrecoverable. A quorum operation.
    Retire {
        /// Key name.
        name: String,
        /// Version to retire (default: the whole key).
        #[arg(long)]
        version: Option<u32>,
        /// Time before destruction (default: the policy's, 7d as shipped).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        waiting_period: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Cancel a retirement before destruction starts: the version(s) become DISABLED
    /// (then `arca key enable`). A quorum operation.
    CancelRetirement {
        /// Key name.
        name: String,
        /// Version (default: every version scheduled for destruction).
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Set or clear a key's retention date. A quorum operation.
    SetRetention {
        /// Key name.
        name: String,
        /// Retention date (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_name = "TIME", required_unless_present = "clear")]
        until: Option<String>,
        /// Remove the retention date.
        #[arg(long, conflicts_with = "until")]
        clear: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show a key and its versions.
    Get {
        /// Key name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List keys.
    List {
        /// Keys per page.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Continue from a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Rotate a key: a new version becomes primary.
    Rotate {
        /// Key name.
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Disable a key version (it stops unwrapping; reversible).
    Disable {
        /// Key name.
        name: String,
        /// Version number.
        version: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Re-enable a disabled key version.
    Enable {
        /// Key name.
        name: String,
        /// Version number.
        version: u32,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Subcommand)]
enum DatakeyCommand {
    /// Generate a data key: its plaintext (use once, then forget) and wrapped form.
    Generate {
        /// Key name.
        name: String,
        /// Encryption context entry, k=v (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Return only the wrapped form.
        #[arg(long)]
        without_plaintext: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Args)]
struct WrapArgs {
    /// Key name.
    name: String,
    /// Key material, base64 (read from stdin when absent).
    plaintext: Option<String>,
    /// Encryption context entry, k=v (repeatable).
    #[arg(long = "context", value_parser = parse_kv)]
    context: Vec<(String, String)>,
    #[command(flatten)]
    opts: ClientOpts,
}

#[derive(Args)]
struct UnwrapArgs {
    /// Wrapped key, base64 (read from stdin when absent).
    wrapped: Option<String>,
    /// Encryption context entry, k=v (repeatable).
    #[arg(long = "context", value_parser = parse_kv)]
    context: Vec<(String, String)>,
    #[command(flatten)]
    opts: ClientOpts,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected k=v, got {s:?}"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => server::run(*args),
        other => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(client::run(other)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `NAME=age1…` of `operator init --age-recipient` (the server checks the recipient).
fn parse_age_recipient(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, r)) if !name.is_empty() && r.starts_with("age1") => {
            Ok((name.to_string(), r.to_string()))
        }
        _ => Err("expected NAME=age1…".to_string()),
    }
}
