//! Verification and decrypting reads of the audit trail.
//!
//! [`verify`] walks the rows from `from` in seq order and recomputes the chain; checks
//! every seal (from the database and from the checkpoint file) against the chain and,
//! with the HSM open, its HMAC; and compares the end of the log with the head row, the
//! last seal and the last checkpoint. It names the first bad seq and what is wrong:
//! - `missing`: a seq is absent while later ones exist, or a record was removed and the
//!   later rows renumbered to close the gap;
//! - `reordered`: the row at n holds content that chains at another position;
//! - `modified`: a row's content does not match its hash, or a seal does not match the
//!   chain (the chain was rewritten from the first row after the previous good seal);
//! - `inserted`: a row put in and the later rows renumbered (whether or not the links
//!   after it were recomputed: a seal, or the head, that matches the chain without the
//!   row names it), or rows beyond the head that no seal covers;
//! - `truncated`: the log ends before a seal, a checkpoint or the head says it reaches.
//!
//! Deterministic: the same rows, seals and checkpoints give the same report, whichever
//! seqs the seals happen to fall on (for every problem but a change whose links were
//! recomputed, which only a seal reveals, at the first row after the last good seal).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use super::chain::{link, open_details, seal_input, DataKey, GENESIS};
use super::record::{code_name, Kind, Record};
use super::writer::{dek_aad, dek_derivation, DERIVED_DEK};
use super::{checkpoint, AuditError, AuditKeys};
use crate::store::{AuditRow, AuditStore, StoreError};

/// What is wrong at the first bad seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Problem {
    /// Content changed.
    Modified,
    /// A seq is absent.
    Missing,
    /// Rows exchanged.
    Reordered,
    /// A row that should not be there.
    Inserted,
    /// The end was cut off.
    Truncated,
    /// The checkpoint file holds two different heads for one seq (a line is never
    /// superseded: the later one is a rewrite).
    CheckpointRewritten,
}

impl Problem {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Modified => "modified",
            Problem::Missing => "missing",
            Problem::Reordered => "reordered",
            Problem::Inserted => "inserted",
            Problem::Truncated => "truncated",
            Problem::CheckpointRewritten => "checkpoint rewritten",
        }
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// True when nothing is wrong.
    pub ok: bool,
    /// Rows whose chain link checked out.
    pub records: u64,
    /// The last seq checked.
    pub last_seq: u64,
    /// Seals (database and checkpoint file) checked.
    pub seals_checked: u64,
    /// Whether seal HMACs were checked (they need the HSM unsealed).
    pub seal_macs_checked: bool,
    /// Rows after the last seal (written while sealed, or not sealed yet).
    pub unsealed_tail: u64,
    /// The first bad seq.
    pub first_bad_seq: Option<u64>,
    /// What is wrong there.
    pub problem: Option<Problem>,
    /// In words.
    pub detail: String,
}

struct SealMark {
    head: [u8; 32],
    mac: [u8; 32],
    from_checkpoint: bool,
}

const PAGE: u32 = 1000;
const LOOKAHEAD: usize = 64;
/// The most rows between a good seal and a bad one (or the head) searched for a row
/// inserted with its later links recomputed. The search costs half the square of it in
/// links, and runs only once a seal or the head does not match: 1024 rows are 524,800
/// SHA-256 of ~500 bytes, 0.23 s in a release build on the 2-core development machine
/// (about 20 s unoptimised). Seals normally trail the head by about one batch (≤ 256).
const RELINK_WINDOW: u64 = 1024;

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut o = [0u8; 32];
    hex::decode_to_slice(s, &mut o).ok().map(|_| o)
}

/// Verifies the log from `from` (1 = everything).
pub async fn verify(
    store: &dyn AuditStore,
    keys: &dyn AuditKeys,
    checkpoints: Option<&Path>,
    from: u64,
) -> Result<Report, AuditError> {
    let from = from.max(1);
    // Read first: every row up to this head, every seal and every checkpoint read
    // below was committed before the walk starts, so the walk must find them.
    let (head_before, head_hash) = store.audit_head().await?;
    let mut prev = if from == 1 {
        GENESIS
    } else {
        match store.audit_row(from - 1).await {
            Ok(r) => r.hash,
            Err(StoreError::NotFound) => {
                return Ok(bad_report(
                    0,
                    0,
                    0,
                    from - 1,
                    Problem::Missing,
                    "the row before --from is absent",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    };
    // The hash before `prev` (to tell a row inserted before a mismatch).
    let mut prev_prev: Option<[u8; 32]> = None;
    let mut seals: BTreeMap<u64, SealMark> = BTreeMap::new();
    let mut first_bad: Option<(u64, Problem, String)> = None;
    for s in store.audit_seals(from).await? {
        seals.insert(
            s.seq,
            SealMark {
                head: s.head,
                mac: s.seal,
                from_checkpoint: false,
            },
        );
    }
    if let Some(path) = checkpoints {
        let lines = checkpoint::read(path)?;
        if let Some((seq, a, b)) = conflicting_checkpoint(&lines) {
            return Ok(bad_report(
                0,
                0,
                0,
                seq,
                Problem::CheckpointRewritten,
                &format!(
                    "checkpoint lines {a} and {b} give two different heads for seq {seq}: a checkpoint line is never superseded, so the file (or the database it was written from) was rewritten"
                ),
            ));
        }
        for c in lines {
            if c.seq < from {
                continue;
            }
            let (Some(head), Some(mac)) = (parse_hex32(&c.head), parse_hex32(&c.seal)) else {
                return Err(AuditError::Corrupt("checkpoint line"));
            };
            match seals.get(&c.seq) {
                Some(s) if s.head == head && crate::secret::ct_eq(&s.mac, &mac) => {}
                // The write-once file wins over the database: the walk checks it.
                _ => {
                    seals.insert(
                        c.seq,
                        SealMark {
                            head,
                            mac,
                            from_checkpoint: true,
                        },
                    );
                }
            }
        }
    }
    let macs = keys.is_open();
    let mut expected = from;
    let mut checked = 0u64;
    let mut seals_checked = 0u64;
    let mut last_good_seal = from - 1;
    let mut last_good_hash = prev;
    'walk: loop {
        let mut page = store.audit_rows(expected, PAGE).await?;
        if page.is_empty() {
            break;
        }
        let mut i = 0;
        while i < page.len() {
            let row = &page[i];
            if row.seq != expected {
                first_bad = Some((
                    expected,
                    Problem::Missing,
                    format!("seq {expected} is absent (the next row is {})", row.seq),
                ));
                break 'walk;
            }
            if link(&prev, row) != row.hash {
                if page.len() - i <= LOOKAHEAD {
                    let more = store
                        .audit_rows(page[page.len() - 1].seq + 1, LOOKAHEAD as u32)
                        .await?;
                    page.extend(more);
                }
                first_bad = Some(diagnose(&page[i..], expected, &prev, prev_prev.as_ref()));
                break 'walk;
            }
            if let Some(s) = seals.get(&row.seq) {
                seals_checked += 1;
                let src = if s.from_checkpoint {
                    "checkpoint"
                } else {
                    "seal"
                };
                let mac_ok = !macs
                    || keys
                        .mac(seal_input(&s.head, row.seq))
                        .await
                        .map(|m| crate::secret::ct_eq(m.as_slice(), &s.mac))?;
                // A genuine seal that matches the chain once one row is taken out names
                // that row, wherever the seals fall.
                if s.head != row.hash && mac_ok {
                    if let Some(at) =
                        relinked_insertion(store, last_good_seal, &last_good_hash, row.seq, &s.head)
                            .await?
                    {
                        first_bad = Some(inserted_at(at, &format!("the {src} of seq {}", row.seq)));
                        break 'walk;
                    }
                }
                if s.head != row.hash && s.from_checkpoint {
                    first_bad = Some((
                        last_good_seal + 1,
                        Problem::Truncated,
                        format!(
                            "the checkpoint of seq {} does not match the database: records after seq {} were cut (and the chain rewritten from there)",
                            row.seq, last_good_seal
                        ),
                    ));
                    break 'walk;
                }
                if s.head != row.hash || !mac_ok {
                    first_bad = Some((
                        last_good_seal + 1,
                        Problem::Modified,
                        format!(
                            "the {src} of seq {} does not match the chain: records {}..={} were rewritten",
                            row.seq,
                            last_good_seal + 1,
                            row.seq
                        ),
                    ));
                    break 'walk;
                }
                last_good_seal = row.seq;
                last_good_hash = row.hash;
            }
            prev_prev = Some(prev);
            prev = row.hash;
            expected += 1;
            checked += 1;
            i += 1;
        }
        if (page.len() as u32) < PAGE {
            break;
        }
    }
    let last_seq = expected - 1;
    if first_bad.is_none() && head_before >= from && head_before <= last_seq {
        // The head names the hash of its row: a chain relinked after a row was put in
        // before it (and no seal after that row) shows here.
        let row = store.audit_row(head_before).await?;
        if row.hash != head_hash {
            first_bad = Some(
                match relinked_insertion(
                    store,
                    last_good_seal,
                    &last_good_hash,
                    head_before,
                    &head_hash,
                )
                .await?
                {
                    Some(at) => inserted_at(at, &format!("the head (seq {head_before})")),
                    None => (
                        last_good_seal + 1,
                        Problem::Modified,
                        format!(
                            "the head (seq {head_before}) does not match the chain: records {}..={head_before} were rewritten",
                            last_good_seal + 1
                        ),
                    ),
                },
            );
        }
    }
    if first_bad.is_none() {
        // Read last: rows beyond it are not the writers'.
        let (head_seq, _) = store.audit_head().await?;
        let sealed_end = seals.keys().next_back().copied().unwrap_or(0);
        if sealed_end > last_seq {
            first_bad = Some((
                last_seq + 1,
                Problem::Truncated,
                format!("the log ends at seq {last_seq} but a seal or checkpoint reaches seq {sealed_end}"),
            ));
        } else if head_before > last_seq {
            first_bad = Some((
                last_seq + 1,
                Problem::Truncated,
                format!("the log ends at seq {last_seq} but the head is at seq {head_before}"),
            ));
        } else if last_seq > head_seq && last_seq > last_good_seal {
            let at = head_seq.max(last_good_seal) + 1;
            first_bad = Some((
                at,
                Problem::Inserted,
                format!("rows {at}..={last_seq} lie beyond the head (seq {head_seq}) and no seal covers them"),
            ));
        }
    }
    let unsealed_tail = last_seq.saturating_sub(last_good_seal);
    Ok(match first_bad {
        Some((seq, problem, detail)) => Report {
            ok: false,
            records: checked,
            last_seq,
            seals_checked,
            seal_macs_checked: macs,
            unsealed_tail,
            first_bad_seq: Some(seq),
            problem: Some(problem),
            detail,
        },
        None => Report {
            ok: true,
            records: checked,
            last_seq,
            seals_checked,
            seal_macs_checked: macs,
            unsealed_tail,
            first_bad_seq: None,
            problem: None,
            detail: format!("OK: {checked} records"),
        },
    })
}

/// The report of a row inserted at `at`, found by `anchor` (a seal or the head).
fn inserted_at(at: u64, anchor: &str) -> (u64, Problem, String) {
    (
        at,
        Problem::Inserted,
        format!(
            "seq {at} holds a row that is not in the chain: the record of seq {at} follows it, the later rows were renumbered and their links recomputed ({anchor} matches the chain without it)"
        ),
    )
}

/// Where one row was inserted after the good seal at `good` (chain hash `good_hash`),
/// the later rows renumbered and their links recomputed, if that explains why the
/// genuine head `head` of seq `at_seq` does not match the stored chain. Reads the rows
/// `good + 1 ..= at_seq + 1`.
async fn relinked_insertion(
    store: &dyn AuditStore,
    good: u64,
    good_hash: &[u8; 32],
    at_seq: u64,
    head: &[u8; 32],
) -> Result<Option<u64>, AuditError> {
    let span = at_seq.saturating_sub(good);
    if span == 0 || span > RELINK_WINDOW {
        return Ok(None);
    }
    let rows = store.audit_rows(good + 1, span as u32 + 1).await?;
    if rows.len() as u64 != span + 1 {
        // No row after `at_seq`: nothing was put in before it.
        return Ok(None);
    }
    Ok(insertion_point(&rows, good, good_hash, head))
}

/// The lowest seq `p` such that the chain from `good_hash`, over the rows stored before
/// `p` and then the rows stored after `p` each one seq back, reaches `head` at the seq of
/// `rows`' second-to-last row. `rows` are the stored rows `good + 1 ..= n + 1`, whose
/// links have been checked up to `n`.
fn insertion_point(
    rows: &[AuditRow],
    good: u64,
    good_hash: &[u8; 32],
    head: &[u8; 32],
) -> Option<u64> {
    if rows.len() < 2 || rows.iter().zip(good + 1..).any(|(r, seq)| r.seq != seq) {
        return None;
    }
    let n = rows.len() - 1;
    (0..n).find_map(|i| {
        // The row at index i (seq good + 1 + i) put in: the chain before it is as
        // stored; each row after it is its record one seq back.
        let mut h = if i == 0 { *good_hash } else { rows[i - 1].hash };
        for later in &rows[i + 1..] {
            h = link(&h, &at_seq(later, later.seq - 1));
        }
        (h == *head).then_some(good + 1 + i as u64)
    })
}

/// `row` as if it were stored at `seq`.
fn at_seq(row: &AuditRow, seq: u64) -> AuditRow {
    let mut r = row.clone();
    r.seq = seq;
    r
}

/// What is wrong where the row at `expected` (`rows[0]`, followed by the rows after it)
/// does not link on `prev`. Rows keep their stored hashes, so a record moved to another
/// seq is recognised by linking it at its original seq:
/// - the row at `expected` is the record of `expected - 1`, whose place holds a row that
///   linked: that row was inserted (and the ones after it renumbered);
/// - the next row links on this row's hash at the seq after its own: a record was
///   removed at `expected` and the later ones renumbered;
/// - a later row linked at `expected` is this seq's record: this row was inserted there
///   (when this row belongs right after it) or the two were exchanged;
/// - otherwise the row was changed.
fn diagnose(
    rows: &[AuditRow],
    expected: u64,
    prev: &[u8; 32],
    prev_prev: Option<&[u8; 32]>,
) -> (u64, Problem, String) {
    let row = &rows[0];
    if let Some(pp) = prev_prev {
        if expected > 1 && link(pp, &at_seq(row, expected - 1)) == row.hash {
            return (
                expected - 1,
                Problem::Inserted,
                format!(
                    "seq {} holds a row that is not in the chain: the record of seq {} follows it",
                    expected - 1,
                    expected - 1
                ),
            );
        }
    }
    if let Some(next) = rows.get(1) {
        if link(&row.hash, &at_seq(next, next.seq + 1)) == next.hash {
            return (
                expected,
                Problem::Missing,
                format!(
                    "the record of seq {expected} was removed and the records after it renumbered"
                ),
            );
        }
    }
    let moved = rows[1..]
        .iter()
        .take(LOOKAHEAD)
        .find(|cand| link(prev, &at_seq(cand, expected)) == cand.hash);
    match moved {
        Some(cand) if cand.seq == expected + 1 && link(&cand.hash, &at_seq(row, expected + 1)) != row.hash => (
            expected,
            Problem::Inserted,
            format!("seq {expected} holds a row that is not in the chain: the record of seq {expected} follows it"),
        ),
        Some(cand) => (
            expected,
            Problem::Reordered,
            format!("the record of seq {expected} is stored at seq {}", cand.seq),
        ),
        None => (
            expected,
            Problem::Modified,
            format!("seq {expected} does not match its hash"),
        ),
    }
}

/// The first seq (lowest) for which two checkpoint lines disagree on the head or the
/// seal, with the two line numbers (1-based, among the checkpoint lines). Deterministic:
/// the same file gives the same answer.
fn conflicting_checkpoint(lines: &[checkpoint::Checkpoint]) -> Option<(u64, usize, usize)> {
    let mut first: BTreeMap<u64, usize> = BTreeMap::new();
    let mut found: Option<(u64, usize, usize)> = None;
    for (i, c) in lines.iter().enumerate() {
        match first.get(&c.seq) {
            None => {
                first.insert(c.seq, i);
            }
            Some(&j) => {
                let e = &lines[j];
                if e.head != c.head || e.seal != c.seal {
                    let hit = (c.seq, j + 1, i + 1);
                    if found.is_none_or(|f| hit.0 < f.0) {
                        found = Some(hit);
                    }
                }
            }
        }
    }
    found
}

fn bad_report(records: u64, last: u64, seals: u64, seq: u64, p: Problem, d: &str) -> Report {
    Report {
        ok: false,
        records,
        last_seq: last,
        seals_checked: seals,
        seal_macs_checked: false,
        unsealed_tail: 0,
        first_bad_seq: Some(seq),
        problem: Some(p),
        detail: d.to_string(),
    }
}

/// What a query selects; `None` matches anything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Exact principal.
    pub principal: Option<String>,
    /// Exact key name.
    pub key: Option<String>,
    /// Exact operation.
    pub operation: Option<String>,
    /// Unix ms, inclusive.
    pub since_ms: Option<i64>,
    /// Unix ms, exclusive.
    pub until_ms: Option<i64>,
    /// gRPC code number.
    pub result: Option<u32>,
}

/// Decrypts records with `seq >= from` that match `filter`, up to `limit`. Returns them
/// and the seq to continue from (`None` at the end).
pub async fn query(
    store: &dyn AuditStore,
    keys: &dyn AuditKeys,
    filter: &Filter,
    from: u64,
    limit: usize,
) -> Result<(Vec<Record>, Option<u64>), AuditError> {
    let mut deks: HashMap<String, DataKey> = HashMap::new();
    let mut out = Vec::new();
    let mut cursor = from.max(1);
    loop {
        let page = store
            .audit_rows_in_time(
                cursor,
                filter.since_ms.unwrap_or(i64::MIN),
                filter.until_ms.unwrap_or(i64::MAX),
                PAGE,
            )
            .await?;
        let full = page.len() as u32 == PAGE;
        for row in page {
            cursor = row.seq + 1;
            if filter
                .operation
                .as_ref()
                .is_some_and(|o| *o != row.operation)
                || filter.result.is_some_and(|r| r != row.result)
            {
                continue;
            }
            if !row.dek_id.is_empty() && !deks.contains_key(&row.dek_id) {
                let sealed = store.audit_dek(&row.dek_id).await?;
                let raw = if sealed == DERIVED_DEK {
                    zeroize::Zeroizing::new(keys.mac(dek_derivation(&row.dek_id)).await?.to_vec())
                } else {
                    keys.open_meta(dek_aad(&row.dek_id), sealed).await?
                };
                let mut k = zeroize::Zeroizing::new([0u8; 32]);
                if raw.len() != 32 {
                    return Err(AuditError::Corrupt("audit data key"));
                }
                k.copy_from_slice(&raw);
                deks.insert(row.dek_id.clone(), DataKey::new(row.dek_id.clone(), k));
            }
            let details = open_details(&row, deks.get(&row.dek_id))?;
            if filter
                .principal
                .as_ref()
                .is_some_and(|p| *p != details.principal)
                || filter
                    .key
                    .as_ref()
                    .is_some_and(|k| Some(k) != details.key_name.as_ref())
            {
                continue;
            }
            out.push(Record {
                seq: row.seq,
                time: crate::clock::rfc3339(row.time_ms),
                time_ms: row.time_ms,
                kind: Kind::parse(&row.kind).ok_or(AuditError::Corrupt("kind"))?,
                operation: row.operation,
                result: code_name(row.result).to_string(),
                details,
            });
            if out.len() >= limit {
                return Ok((out, Some(cursor)));
            }
        }
        if !full {
            return Ok((out, None));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::chain::{build_rows, GENESIS};
    use super::super::record::{Details, Kind, PendingRecord};
    use super::*;

    /// Seqs 1..=8, chained, in clear.
    fn chain() -> Vec<AuditRow> {
        let recs: Vec<PendingRecord> = (0..8)
            .map(|i| PendingRecord {
                time_ms: 1_800_000_000_000 + i,
                kind: Kind::Rpc,
                operation: format!("Op{i}"),
                result: 0,
                details: Details::default(),
            })
            .collect();
        build_rows(0, GENESIS, recs.iter(), None).unwrap()
    }

    /// Walks like `verify` does and diagnoses the first row that does not link.
    fn first_bad(rows: &[AuditRow]) -> Option<(u64, Problem)> {
        let (mut prev, mut pp) = (GENESIS, None);
        for (i, row) in rows.iter().enumerate() {
            if link(&prev, row) != row.hash {
                let (seq, p, _) = diagnose(&rows[i..], row.seq, &prev, pp.as_ref());
                return Some((seq, p));
            }
            pp = Some(prev);
            prev = row.hash;
        }
        None
    }

    fn renumber(rows: &mut [AuditRow]) {
        for (i, r) in rows.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
    }

    #[test]
    fn tampering_that_renumbers_rows_is_named_for_what_it_is() {
        let good = chain();
        assert_eq!(first_bad(&good), None);
        // Changed in place.
        let mut m = good.clone();
        m[3].result = 9;
        assert_eq!(first_bad(&m), Some((4, Problem::Modified)));
        // Two neighbours exchanged (each keeps its hash).
        let mut x = good.clone();
        x.swap(4, 5);
        renumber(&mut x);
        assert_eq!(first_bad(&x), Some((5, Problem::Reordered)));
        // Two rows further apart exchanged.
        let mut far = good.clone();
        far.swap(2, 6);
        renumber(&mut far);
        assert_eq!(first_bad(&far), Some((3, Problem::Reordered)));
        // Removed, and the later rows renumbered to close the gap.
        let mut d = good.clone();
        d.remove(4);
        renumber(&mut d);
        assert_eq!(first_bad(&d), Some((5, Problem::Missing)));
        // A forged row put in, the later rows renumbered: with a hash that does not
        // link, and with one computed to link.
        for consistent in [false, true] {
            let mut ins = good.clone();
            let mut forged = at_seq(&good[4], 5);
            forged.operation = "Forged".into();
            forged.hash = if consistent {
                link(&good[3].hash, &forged)
            } else {
                [7u8; 32]
            };
            ins.insert(4, forged);
            renumber(&mut ins);
            assert_eq!(
                first_bad(&ins),
                Some((5, Problem::Inserted)),
                "consistent: {consistent}"
            );
        }
    }

    /// `rows` with a forged row put in at `at` (1-based), the later rows renumbered and
    /// every link from `at` on recomputed.
    fn relinked(rows: &[AuditRow], at: u64) -> Vec<AuditRow> {
        let mut out = rows.to_vec();
        let mut forged = at_seq(&rows[at as usize - 1], at);
        forged.operation = "Forged".into();
        out.insert(at as usize - 1, forged);
        renumber(&mut out);
        let mut prev = if at == 1 {
            GENESIS
        } else {
            out[at as usize - 2].hash
        };
        for r in &mut out[at as usize - 1..] {
            r.hash = link(&prev, r);
            prev = r.hash;
        }
        out
    }

    #[test]
    fn a_relinked_insertion_is_named_at_its_seq_wherever_the_seals_fall() {
        let good = chain();
        for at in 1..=8u64 {
            let tampered = relinked(&good, at);
            // The chain links throughout: only a seal (or the head) tells.
            assert_eq!(first_bad(&tampered), None, "at {at}");
            // Every genuine seal at or after the row put in, after every good seal
            // before it, names the same seq.
            for seal in at..=8u64 {
                for last_good in 0..at {
                    let good_hash = if last_good == 0 {
                        GENESIS
                    } else {
                        good[last_good as usize - 1].hash
                    };
                    let rows = &tampered[last_good as usize..=seal as usize];
                    assert_eq!(
                        insertion_point(rows, last_good, &good_hash, &good[seal as usize - 1].hash),
                        Some(at),
                        "at {at}, sealed at {seal}, last good seal {last_good}"
                    );
                }
            }
        }
        // A row changed and the links after it recomputed is not an insertion.
        let mut m = good.clone();
        m[3].result = 9;
        let mut prev = good[2].hash;
        for r in &mut m[3..] {
            r.hash = link(&prev, r);
            prev = r.hash;
        }
        assert_eq!(
            insertion_point(&m[2..7], 2, &good[1].hash, &good[5].hash),
            None
        );
        // Nor is an untouched chain, nor rows that skip a seq.
        assert_eq!(
            insertion_point(&good[2..7], 2, &good[1].hash, &good[5].hash),
            None
        );
        let mut gap = good[2..7].to_vec();
        gap.remove(2);
        assert_eq!(insertion_point(&gap, 2, &good[1].hash, &good[4].hash), None);
    }

    /// A log frozen in memory (rows, seals, head), read by [`verify`]; never written.
    struct Frozen {
        rows: Vec<AuditRow>,
        seals: Vec<crate::store::AuditSeal>,
        head: (u64, [u8; 32]),
    }

    #[async_trait::async_trait]
    impl AuditStore for Frozen {
        async fn audit_append(
            &self,
            _: &crate::store::AppendBuilder<'_>,
        ) -> crate::store::Result<(u64, [u8; 32])> {
            Err(StoreError::Corrupt("frozen"))
        }
        async fn audit_append_at(
            &self,
            _: (u64, [u8; 32]),
            _: crate::store::AuditAppend,
        ) -> crate::store::Result<(u64, [u8; 32])> {
            Err(StoreError::Corrupt("frozen"))
        }
        async fn audit_insert_dek(&self, _: &str, _: &[u8], _: i64) -> crate::store::Result<()> {
            Err(StoreError::Corrupt("frozen"))
        }
        async fn audit_dek(&self, _: &str) -> crate::store::Result<Vec<u8>> {
            Err(StoreError::NotFound)
        }
        async fn audit_rows(&self, from: u64, limit: u32) -> crate::store::Result<Vec<AuditRow>> {
            Ok(self
                .rows
                .iter()
                .filter(|r| r.seq >= from)
                .take(limit as usize)
                .cloned()
                .collect())
        }
        async fn audit_rows_in_time(
            &self,
            from: u64,
            _: i64,
            _: i64,
            limit: u32,
        ) -> crate::store::Result<Vec<AuditRow>> {
            self.audit_rows(from, limit).await
        }
        async fn audit_row(&self, seq: u64) -> crate::store::Result<AuditRow> {
            self.rows
                .iter()
                .find(|r| r.seq == seq)
                .cloned()
                .ok_or(StoreError::NotFound)
        }
        async fn audit_seals(
            &self,
            from: u64,
        ) -> crate::store::Result<Vec<crate::store::AuditSeal>> {
            Ok(self
                .seals
                .iter()
                .filter(|s| s.seq >= from)
                .cloned()
                .collect())
        }
        async fn audit_head(&self) -> crate::store::Result<(u64, [u8; 32])> {
            Ok(self.head)
        }
    }

    /// A sealed HSM: seals are compared with the chain, not MAC-checked.
    struct Closed;

    #[async_trait::async_trait]
    impl AuditKeys for Closed {
        fn is_open(&self) -> bool {
            false
        }
        async fn ensure(&self) -> Result<(), AuditError> {
            Err(AuditError::Hsm)
        }
        async fn mac(&self, _: Vec<u8>) -> Result<zeroize::Zeroizing<[u8; 32]>, AuditError> {
            Err(AuditError::Hsm)
        }
        async fn random32(&self) -> Result<zeroize::Zeroizing<[u8; 32]>, AuditError> {
            Err(AuditError::Hsm)
        }
        async fn seal_meta(
            &self,
            _: Vec<u8>,
            _: zeroize::Zeroizing<Vec<u8>>,
        ) -> Result<Vec<u8>, AuditError> {
            Err(AuditError::Hsm)
        }
        async fn open_meta(
            &self,
            _: Vec<u8>,
            _: Vec<u8>,
        ) -> Result<zeroize::Zeroizing<Vec<u8>>, AuditError> {
            Err(AuditError::Hsm)
        }
    }

    /// The report on `rows` with the genuine seals of `good` at `sealed` and `head`.
    async fn report(
        rows: Vec<AuditRow>,
        good: &[AuditRow],
        sealed: &[u64],
        head: (u64, [u8; 32]),
    ) -> (Option<u64>, Option<Problem>) {
        let seals = sealed
            .iter()
            .map(|&seq| crate::store::AuditSeal {
                seq,
                head: good[seq as usize - 1].hash,
                seal: [0; 32],
                node: String::new(),
                time_ms: 0,
            })
            .collect();
        let store = Frozen { rows, seals, head };
        let r = verify(&store, &Closed, None, 1).await.unwrap();
        (r.first_bad_seq, r.problem)
    }

    #[tokio::test]
    async fn verify_names_a_relinked_insertion_the_same_whichever_seqs_are_sealed() {
        let good = chain();
        let head = (8, good[7].hash);
        assert_eq!(
            report(good.clone(), &good, &[2, 5, 8], head).await,
            (None, None)
        );
        let tampered = relinked(&good, 4);
        let moved_head = (9, tampered[8].hash);
        // Seals after the row put in, the head moved to the new end: the first seal
        // after it names seq 4 (it was "modified" at the seq after the last good seal).
        for sealed in [&[2, 5, 8][..], &[3, 4, 8], &[1, 6], &[4], &[7, 8]] {
            assert_eq!(
                report(tampered.clone(), &good, sealed, moved_head).await,
                (Some(4), Some(Problem::Inserted)),
                "seals at {sealed:?}"
            );
        }
        // No seal after it, the head left where it was: the head names seq 4.
        for sealed in [&[2][..], &[3], &[]] {
            assert_eq!(
                report(tampered.clone(), &good, sealed, head).await,
                (Some(4), Some(Problem::Inserted)),
                "seals at {sealed:?}, head at 8"
            );
        }
        // A row changed and relinked: the head no longer matches; modified after the
        // last good seal.
        let mut m = good.clone();
        m[5].result = 9;
        let mut prev = good[4].hash;
        for r in &mut m[5..] {
            r.hash = link(&prev, r);
            prev = r.hash;
        }
        assert_eq!(
            report(m, &good, &[3], head).await,
            (Some(4), Some(Problem::Modified))
        );
    }

    #[test]
    fn a_checkpoint_line_is_never_superseded() {
        use super::super::checkpoint::Checkpoint;
        let line = |seq: u64, h: &str| Checkpoint {
            seq,
            head: h.repeat(64),
            seal: "0".repeat(64),
            time: String::new(),
        };
        // The same line twice (a retried write) is not a conflict.
        assert_eq!(
            super::conflicting_checkpoint(&[line(3, "a"), line(3, "a"), line(5, "b")]),
            None
        );
        // Two heads for one seq name both lines, at the lowest such seq.
        let lines = [line(9, "a"), line(4, "a"), line(9, "c"), line(4, "d")];
        assert_eq!(super::conflicting_checkpoint(&lines), Some((4, 2, 4)));
    }
}
