//! `arca key …`, `arca datakey generate`, `arca wrap|unwrap|rewrap`: keys, their
//! versions and lifecycle, and the data plane (DESIGN §1, §3).
//!
//! Key material is read and printed base64-encoded; plaintext answers are wiped once
//! printed. Administrative calls print the key, or the approval request the call made
//! when it needs a quorum.
//!
//! Imports only the client's shared files, never another command file.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::args::{parse_kv, parse_seconds, ClientOpts, Output};
use super::call::{call, Session};
use super::error::CliError;
use super::input::{context, decode_b64, read_arg_or_stdin};
use super::render::{key_json, print_created, print_key, state_name};
use crate::grpc::pb;

/// `arca key …`.
#[derive(Subcommand)]
pub(in crate::cli) enum KeyCommand {
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

/// `arca datakey …`.
#[derive(Subcommand)]
pub(in crate::cli) enum DatakeyCommand {
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

/// `arca wrap NAME [PLAINTEXT]`.
#[derive(Args)]
pub(in crate::cli) struct WrapArgs {
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

/// `arca unwrap|rewrap [WRAPPED]`.
#[derive(Args)]
pub(in crate::cli) struct UnwrapArgs {
    /// Wrapped key, base64 (read from stdin when absent).
    wrapped: Option<String>,
    /// Encryption context entry, k=v (repeatable).
    #[arg(long = "context", value_parser = parse_kv)]
    context: Vec<(String, String)>,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Runs one `arca key` command.
pub(super) async fn run_key(cmd: KeyCommand) -> Result<(), CliError> {
    let show_key = |out, k: pb::Key| print_key(out, &k);
    let show_admin = |out, r: pb::AdminResponse| print_admin(out, &r);
    match cmd {
        KeyCommand::Create {
            name,
            description,
            rotate_every,
            retain_until,
            opts,
        } => {
            let req = pb::CreateKeyRequest {
                name,
                description,
                rotation_period_seconds: rotate_every.unwrap_or(0),
                retain_until: retain_until.unwrap_or_default(),
            };
            call(
                &opts,
                req,
                async |c, r| c.keys.create_key(r).await,
                show_key,
            )
            .await
        }
        KeyCommand::Versions { name, opts } => {
            let req = pb::GetKeyRequest { name };
            let show = |out, k: pb::Key| print_versions(out, &k);
            call(&opts, req, async |c, r| c.keys.get_key(r).await, show).await
        }
        KeyCommand::Retire {
            name,
            version,
            waiting_period,
            opts,
        } => {
            let waiting_period_seconds = waiting_period.unwrap_or(0);
            match version {
                Some(version) => {
                    let req = pb::RetireKeyVersionRequest {
                        name,
                        version,
                        waiting_period_seconds,
                    };
                    call(
                        &opts,
                        req,
                        async |c, r| c.keys.retire_key_version(r).await,
                        show_admin,
                    )
                    .await
                }
                None => {
                    let req = pb::RetireKeyRequest {
                        name,
                        waiting_period_seconds,
                    };
                    call(
                        &opts,
                        req,
                        async |c, r| c.keys.retire_key(r).await,
                        show_admin,
                    )
                    .await
                }
            }
        }
        KeyCommand::CancelRetirement {
            name,
            version,
            opts,
        } => {
            let req = pb::CancelRetirementRequest {
                name,
                version: version.unwrap_or(0),
            };
            call(
                &opts,
                req,
                async |c, r| c.keys.cancel_retirement(r).await,
                show_admin,
            )
            .await
        }
        KeyCommand::SetRetention {
            name,
            until,
            clear,
            opts,
        } => {
            let retain_until = if clear {
                String::new()
            } else {
                until.unwrap_or_default()
            };
            let req = pb::SetRetentionRequest { name, retain_until };
            call(
                &opts,
                req,
                async |c, r| c.keys.set_retention(r).await,
                show_admin,
            )
            .await
        }
        KeyCommand::Get { name, opts } => {
            let req = pb::GetKeyRequest { name };
            call(&opts, req, async |c, r| c.keys.get_key(r).await, show_key).await
        }
        KeyCommand::List {
            page_size,
            page_token,
            opts,
        } => {
            let req = pb::ListKeysRequest {
                page_size,
                page_token,
            };
            call(
                &opts,
                req,
                async |c, r| c.keys.list_keys(r).await,
                print_keys,
            )
            .await
        }
        KeyCommand::Rotate { name, opts } => {
            let req = pb::RotateKeyRequest { name };
            call(
                &opts,
                req,
                async |c, r| c.keys.rotate_key(r).await,
                show_admin,
            )
            .await
        }
        KeyCommand::Disable {
            name,
            version,
            opts,
        } => {
            let req = pb::KeyVersionRequest { name, version };
            call(
                &opts,
                req,
                async |c, r| c.keys.disable_key_version(r).await,
                show_admin,
            )
            .await
        }
        KeyCommand::Enable {
            name,
            version,
            opts,
        } => {
            let req = pb::KeyVersionRequest { name, version };
            call(
                &opts,
                req,
                async |c, r| c.keys.enable_key_version(r).await,
                show_admin,
            )
            .await
        }
    }
}

/// Runs `arca datakey generate`.
pub(super) async fn run_datakey(cmd: DatakeyCommand) -> Result<(), CliError> {
    let DatakeyCommand::Generate {
        name,
        context: pairs,
        without_plaintext,
        opts,
    } = cmd;
    let req = pb::GenerateDataKeyRequest {
        key_name: name,
        context: context(pairs),
        without_plaintext,
    };
    let show = |output, r: pb::GenerateDataKeyResponse| {
        let plaintext = Zeroizing::new(B64.encode(&r.plaintext));
        match output {
            Output::Json => {
                let mut v = json!({
                    "wrapped_key": B64.encode(&r.wrapped_key),
                    "key_name": r.key_name,
                    "key_version": r.key_version,
                });
                if !without_plaintext {
                    v["plaintext"] = json!(plaintext.as_str());
                }
                println!("{v}");
            }
            Output::Human => {
                println!("key:       {} v{}", r.key_name, r.key_version);
                if !without_plaintext {
                    println!("plaintext: {}", plaintext.as_str());
                }
                println!("wrapped:   {}", B64.encode(&r.wrapped_key));
            }
        }
        drop(Zeroizing::new(r.plaintext));
    };
    call(
        &opts,
        req,
        async |c, r| c.keys.generate_data_key(r).await,
        show,
    )
    .await
}

/// Runs `arca wrap` (the key material is read after connecting).
pub(super) async fn run_wrap(a: WrapArgs) -> Result<(), CliError> {
    let session = Session::connect(&a.opts).await?;
    let text = read_arg_or_stdin(a.plaintext)?;
    let mut plaintext = decode_b64(&text, "plaintext")?;
    let req = pb::WrapKeyRequest {
        key_name: a.name,
        plaintext: std::mem::take(&mut *plaintext),
        context: context(a.context),
    };
    let show = |out, r: pb::WrapKeyResponse| {
        print_wrapped(out, &r.wrapped_key, &r.key_name, r.key_version)
    };
    session
        .call(req, async |c, r| c.keys.wrap_key(r).await, show)
        .await
}

/// Runs `arca unwrap` (the wrapped key is read after connecting).
pub(super) async fn run_unwrap(a: UnwrapArgs) -> Result<(), CliError> {
    let session = Session::connect(&a.opts).await?;
    let text = read_arg_or_stdin(a.wrapped)?;
    let wrapped = decode_b64(&text, "wrapped key")?;
    let req = pb::UnwrapKeyRequest {
        wrapped_key: wrapped.to_vec(),
        context: context(a.context),
    };
    let show = |output, r: pb::UnwrapKeyResponse| {
        let plaintext = Zeroizing::new(B64.encode(&r.plaintext));
        match output {
            Output::Json => println!(
                "{}",
                json!({"plaintext": plaintext.as_str(), "key_name": r.key_name, "key_version": r.key_version})
            ),
            Output::Human => {
                println!("key:       {} v{}", r.key_name, r.key_version);
                println!("plaintext: {}", plaintext.as_str());
            }
        }
        drop(Zeroizing::new(r.plaintext));
    };
    session
        .call(req, async |c, r| c.keys.unwrap_key(r).await, show)
        .await
}

/// Runs `arca rewrap` (the wrapped key is read after connecting).
pub(super) async fn run_rewrap(a: UnwrapArgs) -> Result<(), CliError> {
    let session = Session::connect(&a.opts).await?;
    let text = read_arg_or_stdin(a.wrapped)?;
    let wrapped = decode_b64(&text, "wrapped key")?;
    let req = pb::RewrapKeyRequest {
        wrapped_key: wrapped.to_vec(),
        context: context(a.context),
    };
    let show = |out, r: pb::RewrapKeyResponse| {
        print_wrapped(out, &r.wrapped_key, &r.key_name, r.key_version)
    };
    session
        .call(req, async |c, r| c.keys.rewrap_key(r).await, show)
        .await
}

fn print_versions(output: Output, k: &pb::Key) {
    match output {
        Output::Json => println!("{}", key_json(k)),
        Output::Human => {
            println!(
                "{:<8} {:<26} {:<25} {:>12}  SCHEDULE",
                "VERSION", "STATE", "CREATED", "WRAPS<="
            );
            for v in &k.versions {
                let primary = if v.version == k.primary_version {
                    "*"
                } else {
                    ""
                };
                let schedule = match (v.destroyed_at.as_str(), v.destroy_at.as_str()) {
                    ("", "") => String::new(),
                    ("", at) => format!("destroy at {at}"),
                    (at, _) => format!("destroyed {at} (tombstone)"),
                };
                let by = if v.retire_request.is_empty() {
                    String::new()
                } else {
                    format!(" by {}", v.retire_request)
                };
                println!(
                    "{:<8} {:<26} {:<25} {:>12}  {schedule}{by}",
                    format!("v{}{primary}", v.version),
                    state_name(v.state),
                    v.created_at,
                    v.wrap_count
                );
            }
        }
    }
}

fn print_keys(output: Output, r: pb::ListKeysResponse) {
    match output {
        Output::Json => println!(
            "{}",
            json!({"keys": r.keys.iter().map(key_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token})
        ),
        Output::Human => {
            println!(
                "{:<40} {:>8} {:>9}  {:<25} RETAIN UNTIL",
                "NAME", "PRIMARY", "VERSIONS", "CREATED"
            );
            for k in &r.keys {
                println!(
                    "{:<40} {:>8} {:>9}  {:<25} {}",
                    k.name,
                    format!("v{}", k.primary_version),
                    k.versions.len(),
                    k.created_at,
                    if k.retain_until.is_empty() {
                        "-"
                    } else {
                        &k.retain_until
                    }
                );
            }
            if !r.next_page_token.is_empty() {
                println!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
}

/// The key an administrative call changed, or the approval request it made.
fn print_admin(output: Output, r: &pb::AdminResponse) {
    match (&r.key, &r.approval_request) {
        (Some(k), _) => print_key(output, k),
        (None, Some(a)) => print_created(output, a),
        (None, None) => println!("done"),
    }
}

fn print_wrapped(output: Output, wrapped: &[u8], name: &str, version: u32) {
    match output {
        Output::Json => println!(
            "{}",
            json!({"wrapped_key": B64.encode(wrapped), "key_name": name, "key_version": version})
        ),
        Output::Human => {
            println!("key:     {name} v{version}");
            println!("wrapped: {}", B64.encode(wrapped));
        }
    }
}
