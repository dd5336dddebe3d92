//! `arca audit verify|query|export`: the audit trail, for auditors (DESIGN §6).
//!
//! Times are RFC 3339 UTC (`2026-11-26T10:00:00Z`) or an age (`15m`, `2h`, `7d`: that
//! long ago). `export` prints every record as JSON lines, oldest first.
//!
//! Imports only the client's shared files, never another command file.

use clap::{Subcommand, ValueEnum};
use serde_json::json;

use super::args::{parse_duration_secs, ClientOpts, Output};
use super::call::{call, Session};
use super::error::CliError;
use crate::clock::Clock;
use crate::grpc::pb;

/// Export formats.
#[derive(Clone, Copy, ValueEnum)]
pub(in crate::cli) enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// `arca audit …`.
#[derive(Subcommand)]
pub(in crate::cli) enum AuditCommand {
    /// Recompute the chain and check the HSM seals and the checkpoint file: prints OK
    /// with the count, or the first bad seq and what is wrong (exit status 1).
    Verify {
        /// Start at this seq (trusting the stored hash of the one before).
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Decrypted records matching every filter given, oldest first.
    Query {
        /// Exact principal.
        #[arg(long)]
        principal: Option<String>,
        /// Exact key name.
        #[arg(long)]
        key: Option<String>,
        /// Operation (RPC method, e.g. UnwrapKey).
        #[arg(long)]
        op: Option<String>,
        /// From (RFC 3339 UTC, or an age such as 15m).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Until (exclusive; RFC 3339 UTC, or an age).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// gRPC result code name, e.g. PERMISSION_DENIED.
        #[arg(long)]
        result: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Every record (decrypted), oldest first.
    Export {
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// Unix ms of days since the epoch (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`, or an age (`90s`, `15m`, `2h`, `7d`).
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(secs) = parse_duration_secs(s) {
        let ago = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        return Ok(crate::clock::SystemClock.now_ms().saturating_sub(ago));
    }
    let bad = || format!("bad time {s:?} (use 2026-11-26T10:00:00Z or an age like 15m)");
    let t = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || h.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    let ms: i64 = format!("{frac:0<3}")[..3].parse().map_err(|_| bad())?;
    Ok((days_from_civil(d[0], d[1], d[2]) * 86_400 + h[0] * 3600 + h[1] * 60 + h[2]) * 1000 + ms)
}

fn record_json(r: &pb::AuditRecord) -> serde_json::Value {
    json!({
        "seq": r.seq,
        "time": r.time,
        "kind": r.kind,
        "operation": r.operation,
        "result": r.result,
        "node": r.node,
        "request_id": r.request_id,
        "principal": r.principal,
        "auth_method": r.auth_method,
        "key_name": r.key_name,
        "key_version": r.key_version,
        "client": r.client,
        "context_digest": r.context_digest,
        "latency_us": r.latency_us,
        "detail": r.detail,
    })
}

/// Runs one `arca audit` command.
pub(super) async fn run(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Verify { from, opts } => {
            let req = pb::VerifyAuditRequest { from_seq: from };
            call(
                &opts,
                req,
                async |c, r| c.audit.verify_audit(r).await,
                print_verified,
            )
            .await
        }
        AuditCommand::Query {
            principal,
            key,
            op,
            since,
            until,
            result,
            limit,
            opts,
        } => {
            let mut session = Session::connect(&opts).await?;
            let mut token = String::new();
            let mut shown = 0usize;
            while shown < limit {
                let req = pb::QueryAuditRequest {
                    principal: principal.clone().unwrap_or_default(),
                    key_name: key.clone().unwrap_or_default(),
                    operation: op.clone().unwrap_or_default(),
                    since_ms: since.unwrap_or_default(),
                    until_ms: until.unwrap_or_default(),
                    result: result.clone().unwrap_or_default(),
                    page_size: (limit - shown).min(1000) as u32,
                    page_token: token.clone(),
                };
                let page = session
                    .send(req, async |c, r| c.audit.query_audit(r).await)
                    .await?;
                for r in &page.records {
                    print_record(session.output(), r);
                }
                shown += page.records.len();
                if page.next_page_token.is_empty() || page.records.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            Ok(())
        }
        AuditCommand::Export { format, opts } => {
            let ExportFormat::Jsonl = format;
            let mut session = Session::connect(&opts).await?;
            let mut token = String::new();
            loop {
                let req = pb::QueryAuditRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..pb::QueryAuditRequest::default()
                };
                let page = session
                    .send(req, async |c, r| c.audit.query_audit(r).await)
                    .await?;
                for r in &page.records {
                    println!("{}", record_json(r));
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                token = page.next_page_token;
            }
        }
    }
}

/// The verifier's report; a bad chain is also the command's failure (exit status 1).
fn print_verified(output: Output, r: pb::VerifyAuditResponse) -> Result<(), CliError> {
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "ok": r.ok,
                "records": r.records,
                "last_seq": r.last_seq,
                "first_bad_seq": (!r.ok).then_some(r.first_bad_seq),
                "problem": r.problem,
                "detail": r.detail,
                "seals_checked": r.seals_checked,
                "seal_macs_checked": r.seal_macs_checked,
                "unsealed_tail": r.unsealed_tail,
            })
        ),
        Output::Human if r.ok => println!(
            "OK: {} records (through seq {}), {} seals checked{}",
            r.records,
            r.last_seq,
            r.seals_checked,
            if r.seal_macs_checked {
                ""
            } else {
                " (HMACs not checked: sealed)"
            }
        ),
        Output::Human => {
            println!("BAD: seq {} {}: {}", r.first_bad_seq, r.problem, r.detail)
        }
    }
    if r.ok {
        Ok(())
    } else {
        Err(CliError::AuditBroken(r.first_bad_seq))
    }
}

fn print_record(output: Output, r: &pb::AuditRecord) {
    match output {
        Output::Json => println!("{}", record_json(r)),
        Output::Human => println!(
            "{:>8}  {}  {:<16} {:<20} {:<18} {:<24} {}{}",
            r.seq,
            r.time,
            r.operation,
            r.result,
            if r.principal.is_empty() {
                "-"
            } else {
                &r.principal
            },
            if r.key_name.is_empty() {
                "-".to_string()
            } else if r.key_version == 0 {
                r.key_name.clone()
            } else {
                format!("{}/v{}", r.key_name, r.key_version)
            },
            r.client,
            if r.detail.is_empty() {
                String::new()
            } else {
                format!("  {}", r.detail)
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_time("2026-11-26T14:18:05.123Z").unwrap(),
            1_795_702_685_123
        );
        assert_eq!(parse_time("2000-02-29T00:00:00Z").unwrap(), 951_782_400_000);
        assert!(parse_time("yesterday").is_err());
        let ago = parse_time("1h").unwrap();
        assert!(crate::clock::SystemClock.now_ms() - ago >= 3_600_000);
    }
}
