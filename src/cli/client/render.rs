//! Renderings shared by several commands: a key with its versions, an approval request
//! (in full, or as the request an administrative call created), and custodian kits
//! written to private files.
//!
//! Invariant: `request show` and `approve` say whether the digest the server reports is
//! the digest of the operation and parameters shown, recomputed here (a custodian
//! approves what they read). Must not import the commands that use these.

use serde_json::json;

use super::args::Output;
use crate::grpc::pb;
use crate::quorum::approvals::{digest, Operation, Parameters};

/// A version state's proto name (`ENABLED`, …).
pub(super) fn state_name(s: i32) -> &'static str {
    pb::KeyVersionState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// A key and its versions as JSON.
pub(super) fn key_json(k: &pb::Key) -> serde_json::Value {
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

/// Prints a key and its versions.
pub(super) fn print_key(output: Output, k: &pb::Key) {
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

/// Whether the reported digest is the digest of the reported operation and parameters.
fn digest_verified(r: &pb::ApprovalRequest) -> bool {
    let params: Parameters = r
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Operation::parse(&r.operation).is_some_and(|op| digest(op, &params) == r.digest)
}

/// A request's parameters, sorted by name.
pub(super) fn sorted_params(r: &pb::ApprovalRequest) -> Vec<(&String, &String)> {
    let mut p: Vec<_> = r.parameters.iter().collect();
    p.sort();
    p
}

/// An approval request as JSON.
pub(super) fn request_json(r: &pb::ApprovalRequest) -> serde_json::Value {
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

/// Writes a custodian's kit to `dir`/NAME/{share,token,totp-uri}, each 0600 and new, in
/// folders created 0700 (a folder that already existed is narrowed to 0700), so no other
/// local user can list or open a kit.
pub(super) fn write_kit(dir: &std::path::Path, k: &pb::CustodianKit) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let d = dir.join(&k.custodian);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    write_private(&d.join("share"), k.share.as_bytes())?;
    write_private(&d.join("token"), k.token.as_bytes())?;
    write_private(&d.join("totp-uri"), k.totp_uri.as_bytes())
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// Wipes the secrets of kits that have been shown or written.
pub(super) fn wipe_kits(kits: Vec<pb::CustodianKit>) {
    for k in kits {
        drop(zeroize::Zeroizing::new(k.share));
        drop(zeroize::Zeroizing::new(k.token));
        drop(zeroize::Zeroizing::new(k.totp_uri));
    }
}
