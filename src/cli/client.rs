//! Client subcommands: one gRPC call each, human or JSON output.

use std::collections::HashMap;
use std::io::Read;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;
use zeroize::Zeroizing;

use super::{
    ClientOpts, Command, DatakeyCommand, KeyCommand, OperatorCommand, Output, TokenCommand,
};
use crate::grpc::pb;
use crate::grpc::pb::access_service_client::AccessServiceClient;
use crate::grpc::pb::key_service_client::KeyServiceClient;
use crate::grpc::pb::quorum_service_client::QuorumServiceClient;

mod access;
mod audit;
mod requests;

pub(super) use access::{BreakGlassArgs, ElevateArgs, PolicyCommand, ReviewCommand, TotpCommand};
pub(super) use audit::AuditCommand;
pub(super) use requests::{ApproveArgs, RejectArgs, RequestCommand};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed call, shown as `CODE: message (request id …)`.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {message}{suffix}")]
struct CallError {
    code: tonic::Code,
    message: String,
    suffix: String,
}

fn call_error(s: tonic::Status) -> BoxError {
    let request_id = s
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Internal errors already name the request id in their message.
    let suffix = match request_id {
        Some(r) if !s.message().contains(&r) => format!(" (request id {r})"),
        _ => String::new(),
    };
    Box::new(CallError {
        code: s.code(),
        message: s.message().to_string(),
        suffix,
    })
}

struct Client {
    inner: KeyServiceClient<Channel>,
    quorum: QuorumServiceClient<Channel>,
    access: AccessServiceClient<Channel>,
    audit: pb::audit_service_client::AuditServiceClient<Channel>,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    totp: Option<MetadataValue<tonic::metadata::Ascii>>,
    output: Output,
}

impl Client {
    async fn connect(opts: &ClientOpts) -> Result<Self, BoxError> {
        let addr = if opts.addr.contains("://") {
            opts.addr.clone()
        } else {
            format!("http://{}", opts.addr)
        };
        let mut endpoint =
            Endpoint::from_shared(addr.clone())?.connect_timeout(std::time::Duration::from_secs(5));
        if addr.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &opts.cacert {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read the CA certificate {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&opts.client_cert, &opts.client_key) {
                let cert_pem = std::fs::read(cert).map_err(|e| {
                    format!("cannot read the client certificate {}: {e}", cert.display())
                })?;
                let key_pem =
                    Zeroizing::new(std::fs::read(key).map_err(|e| {
                        format!("cannot read the client key {}: {e}", key.display())
                    })?);
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    cert_pem,
                    key_pem.as_slice(),
                ));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", opts.addr))?;
        let auth = match &opts.token {
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| "the token is not a valid header value")?,
            ),
            None => None,
        };
        // A TOTP code for roles with MFA: ARCA_TOTP (scripts), or a prompt with --mfa.
        let code = match std::env::var("ARCA_TOTP") {
            Ok(v) if !v.trim().is_empty() => Some(Zeroizing::new(v.trim().to_string())),
            _ if opts.mfa => Some(read_secret(None, "TOTP code")?),
            _ => None,
        };
        let totp = match code {
            Some(c) => Some(
                c.parse()
                    .map_err(|_| "the TOTP code is not a valid header value")?,
            ),
            None => None,
        };
        Ok(Client {
            inner: KeyServiceClient::new(channel.clone()),
            quorum: QuorumServiceClient::new(channel.clone()),
            audit: pb::audit_service_client::AuditServiceClient::new(channel.clone()),
            access: AccessServiceClient::new(channel),
            auth,
            totp,
            output: opts.output,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        if let Some(t) = &self.totp {
            r.metadata_mut().insert("x-arca-totp", t.clone());
        }
        r
    }
}

fn read_arg_or_stdin(arg: Option<String>) -> Result<Zeroizing<String>, BoxError> {
    match arg {
        Some(a) => Ok(Zeroizing::new(a)),
        None => {
            let mut s = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        }
    }
}

fn decode_b64(s: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, BoxError> {
    B64.decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|_| format!("{what} is not valid base64").into())
}

fn ctx(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}

fn state_name(s: i32) -> &'static str {
    pb::KeyVersionState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn key_json(k: &pb::Key) -> serde_json::Value {
    json!({
        "name": k.name,
        "id": k.id,
        "description": k.description,
        "primary_version": k.primary_version,
        "created_at": k.created_at,
        "versions": k.versions.iter().map(|v| json!({
            "version": v.version,
            "state": state_name(v.state),
            "created_at": v.created_at,
            "wrap_count": v.wrap_count,
            "destroy_at": v.destroy_at,
            "destroyed_at": v.destroyed_at,
            "retire_request": v.retire_request,
        })).collect::<Vec<_>>(),
        "rotation_period_seconds": k.rotation_period_seconds,
        "retain_until": k.retain_until,
    })
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

fn print_key(output: Output, k: &pb::Key) {
    match output {
        Output::Json => println!("{}", key_json(k)),
        Output::Human => {
            println!("name:            {}", k.name);
            println!("id:              {}", k.id);
            if !k.description.is_empty() {
                println!("description:     {}", k.description);
            }
            println!("primary version: {}", k.primary_version);
            println!("created:         {}", k.created_at);
            if k.rotation_period_seconds > 0 {
                println!("rotate every:    {}s", k.rotation_period_seconds);
            }
            if !k.retain_until.is_empty() {
                println!("retain until:    {}", k.retain_until);
            }
            println!("versions:");
            for v in &k.versions {
                println!(
                    "  v{:<4} {:<26} created {}  wraps<= {}",
                    v.version,
                    state_name(v.state),
                    v.created_at,
                    v.wrap_count
                );
            }
        }
    }
}

fn print_admin(output: Output, r: &pb::AdminResponse) {
    match (&r.key, &r.approval_request) {
        (Some(k), _) => print_key(output, k),
        (None, Some(a)) => requests::print_created(output, a),
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

/// Runs one client command.
pub(super) async fn run(cmd: Command) -> Result<(), BoxError> {
    match cmd {
        Command::Server(_) => Err("not a client command".into()),
        Command::Key(k) => run_key(k).await,
        Command::Operator(o) => run_operator(o).await,
        Command::Token(t) => run_token(t).await,
        Command::Request(r) => requests::run_request(r).await,
        Command::Approve(a) => requests::run_approve(a).await,
        Command::Reject(a) => requests::run_reject(a).await,
        Command::Elevate(a) => access::run_elevate(a).await,
        Command::BreakGlass(a) => access::run_break_glass(a).await,
        Command::Totp(t) => access::run_totp(t).await,
        Command::Review(r) => access::run_review(r).await,
        Command::Policy(p) => access::run_policy(p).await,
        Command::Audit(a) => audit::run(a).await,
        Command::Datakey(DatakeyCommand::Generate {
            name,
            context,
            without_plaintext,
            opts,
        }) => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .generate_data_key(c.req(pb::GenerateDataKeyRequest {
                    key_name: name,
                    context: ctx(context),
                    without_plaintext,
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            let plaintext = Zeroizing::new(B64.encode(&r.plaintext));
            match c.output {
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
            Ok(())
        }
        Command::Wrap(a) => {
            let mut c = Client::connect(&a.opts).await?;
            let text = read_arg_or_stdin(a.plaintext)?;
            let mut plaintext = decode_b64(&text, "plaintext")?;
            let r = c
                .inner
                .wrap_key(c.req(pb::WrapKeyRequest {
                    key_name: a.name,
                    plaintext: std::mem::take(&mut *plaintext),
                    context: ctx(a.context),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_wrapped(c.output, &r.wrapped_key, &r.key_name, r.key_version);
            Ok(())
        }
        Command::Unwrap(a) => {
            let mut c = Client::connect(&a.opts).await?;
            let text = read_arg_or_stdin(a.wrapped)?;
            let wrapped = decode_b64(&text, "wrapped key")?;
            let r = c
                .inner
                .unwrap_key(c.req(pb::UnwrapKeyRequest {
                    wrapped_key: wrapped.to_vec(),
                    context: ctx(a.context),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            let plaintext = Zeroizing::new(B64.encode(&r.plaintext));
            match c.output {
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
            Ok(())
        }
        Command::Rewrap(a) => {
            let mut c = Client::connect(&a.opts).await?;
            let text = read_arg_or_stdin(a.wrapped)?;
            let wrapped = decode_b64(&text, "wrapped key")?;
            let r = c
                .inner
                .rewrap_key(c.req(pb::RewrapKeyRequest {
                    wrapped_key: wrapped.to_vec(),
                    context: ctx(a.context),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_wrapped(c.output, &r.wrapped_key, &r.key_name, r.key_version);
            Ok(())
        }
    }
}

async fn run_key(cmd: KeyCommand) -> Result<(), BoxError> {
    match cmd {
        KeyCommand::Create {
            name,
            description,
            rotate_every,
            retain_until,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let k = c
                .inner
                .create_key(c.req(pb::CreateKeyRequest {
                    name,
                    description,
                    rotation_period_seconds: rotate_every.unwrap_or(0),
                    retain_until: retain_until.unwrap_or_default(),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_key(c.output, &k);
        }
        KeyCommand::Versions { name, opts } => {
            let mut c = Client::connect(&opts).await?;
            let k = c
                .inner
                .get_key(c.req(pb::GetKeyRequest { name }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_versions(c.output, &k);
        }
        KeyCommand::Retire {
            name,
            version,
            waiting_period,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let waiting_period_seconds = waiting_period.unwrap_or(0);
            let r = match version {
                Some(version) => c
                    .inner
                    .retire_key_version(c.req(pb::RetireKeyVersionRequest {
                        name,
                        version,
                        waiting_period_seconds,
                    }))
                    .await
                    .map_err(call_error)?
                    .into_inner(),
                None => c
                    .inner
                    .retire_key(c.req(pb::RetireKeyRequest {
                        name,
                        waiting_period_seconds,
                    }))
                    .await
                    .map_err(call_error)?
                    .into_inner(),
            };
            print_admin(c.output, &r);
        }
        KeyCommand::CancelRetirement {
            name,
            version,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .cancel_retirement(c.req(pb::CancelRetirementRequest {
                    name,
                    version: version.unwrap_or(0),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_admin(c.output, &r);
        }
        KeyCommand::SetRetention {
            name,
            until,
            clear,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let retain_until = if clear {
                String::new()
            } else {
                until.unwrap_or_default()
            };
            let r = c
                .inner
                .set_retention(c.req(pb::SetRetentionRequest { name, retain_until }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_admin(c.output, &r);
        }
        KeyCommand::Get { name, opts } => {
            let mut c = Client::connect(&opts).await?;
            let k = c
                .inner
                .get_key(c.req(pb::GetKeyRequest { name }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_key(c.output, &k);
        }
        KeyCommand::List {
            page_size,
            page_token,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .list_keys(c.req(pb::ListKeysRequest {
                    page_size,
                    page_token,
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            match c.output {
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
        KeyCommand::Rotate { name, opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .rotate_key(c.req(pb::RotateKeyRequest { name }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_admin(c.output, &r);
        }
        KeyCommand::Disable {
            name,
            version,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .disable_key_version(c.req(pb::KeyVersionRequest { name, version }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_admin(c.output, &r);
        }
        KeyCommand::Enable {
            name,
            version,
            opts,
        } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .inner
                .enable_key_version(c.req(pb::KeyVersionRequest { name, version }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_admin(c.output, &r);
        }
    }
    Ok(())
}

/// Reads one secret line from `file`, or from stdin.
fn read_secret(file: Option<&std::path::Path>, what: &str) -> Result<Zeroizing<String>, BoxError> {
    let text = match file {
        Some(f) => Zeroizing::new(
            std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read {what} from {}: {e}", f.display()))?,
        ),
        None => {
            eprintln!("{what}:");
            let mut line = Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let trimmed = Zeroizing::new(text.trim().to_string());
    if trimmed.is_empty() {
        return Err(format!("empty {what}").into());
    }
    Ok(trimmed)
}

fn print_seal_status(output: Output, s: &pb::SealStatusResponse) {
    match output {
        Output::Json => println!(
            "{}",
            json!({"initialized": s.initialized, "sealed": s.sealed, "threshold": s.threshold,
                   "shares": s.shares, "progress": s.progress})
        ),
        Output::Human => {
            println!("initialized: {}", s.initialized);
            println!("sealed:      {}", s.sealed);
            if s.initialized {
                println!("threshold:   {} of {}", s.threshold, s.shares);
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

pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")
}

async fn run_operator(cmd: OperatorCommand) -> Result<(), BoxError> {
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
                return Err("--shares must equal the number of --custodian names".into());
            }
            let so_pin = read_secret(so_pin_file.as_deref(), "SO PIN")?;
            let mut c = Client::connect(&opts).await?;
            let r = c
                .quorum
                .init(c.req(pb::InitRequest {
                    threshold,
                    custodians,
                    so_pin: so_pin.to_string(),
                    age_recipients: age_recipients.into_iter().collect(),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            match out_dir {
                Some(dir) => {
                    for k in &r.custodians {
                        let d = dir.join(&k.custodian);
                        std::fs::create_dir_all(&d)?;
                        write_private(&d.join("share"), k.share.as_bytes())?;
                        write_private(&d.join("token"), k.token.as_bytes())?;
                        write_private(&d.join("totp-uri"), k.totp_uri.as_bytes())?;
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
            for k in r.custodians {
                drop(Zeroizing::new(k.share));
                drop(Zeroizing::new(k.token));
                drop(Zeroizing::new(k.totp_uri));
            }
        }
        OperatorCommand::Unseal {
            share_file,
            totp,
            opts,
        } => {
            let share = read_secret(share_file.as_deref(), "share")?;
            let mut c = Client::connect(&opts).await?;
            let s = c
                .quorum
                .unseal(c.req(pb::UnsealRequest {
                    share: share.to_string(),
                    totp,
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            print_seal_status(c.output, &s);
        }
        OperatorCommand::Rekey {
            shares,
            threshold,
            custodians,
            age_recipients,
            opts,
        } => {
            if shares.is_some_and(|n| n as usize != custodians.len()) {
                return Err("--shares must equal the number of --custodian names".into());
            }
            let mut c = Client::connect(&opts).await?;
            let r = c
                .quorum
                .rekey(c.req(pb::RekeyRequest {
                    threshold,
                    custodians,
                    shares: shares.unwrap_or(0),
                    age_recipients: age_recipients.into_iter().collect(),
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            requests::print_created(c.output, &r);
        }
        OperatorCommand::Seal { opts } => {
            let mut c = Client::connect(&opts).await?;
            let s = c
                .quorum
                .seal(c.req(pb::SealRequest {}))
                .await
                .map_err(call_error)?
                .into_inner();
            print_seal_status(c.output, &s);
        }
        OperatorCommand::Status { opts } => {
            let mut c = Client::connect(&opts).await?;
            let s = c
                .quorum
                .seal_status(c.req(pb::SealStatusRequest {}))
                .await
                .map_err(call_error)?
                .into_inner();
            print_seal_status(c.output, &s);
        }
    }
    Ok(())
}

async fn run_token(cmd: TokenCommand) -> Result<(), BoxError> {
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
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .create_token(c.req(pb::CreateTokenRequest {
                    principal,
                    roles,
                    key_globs,
                    ttl_seconds: ttl.unwrap_or(0),
                    cidrs,
                    bound_principal: bound_principal.unwrap_or_default(),
                    description,
                }))
                .await
                .map_err(call_error)?
                .into_inner();
            let token = Zeroizing::new(r.token);
            match c.output {
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
        }
        TokenCommand::Revoke { id, opts } => {
            let mut c = Client::connect(&opts).await?;
            c.access
                .revoke_token(c.req(pb::RevokeTokenRequest { id: id.clone() }))
                .await
                .map_err(call_error)?;
            println!("revoked {id}");
        }
        TokenCommand::List { opts } => {
            let mut c = Client::connect(&opts).await?;
            let r = c
                .access
                .list_tokens(c.req(pb::ListTokensRequest {}))
                .await
                .map_err(call_error)?
                .into_inner();
            match c.output {
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
    }
    Ok(())
}
