//! The canonical encoding of a database row that grants, limits or records authority
//! (DESIGN §2b, ADR 12): what `arca:state-mac` authenticates.
//!
//! Layout: the domain tag `"arca state row v1"`, then the table name, then the row's state
//! sequence number, then each field as `name`, a one-byte type tag and the value. Names,
//! text and byte values are length-prefixed (u32 big-endian), integers are 8 bytes
//! big-endian, an absent value is its own tag, and a list is its length followed by its
//! length-prefixed items. So two different (table, sequence, fields) never encode alike:
//! a MAC copied from another table, another row, another sequence or another field value
//! does not verify.
//!
//! The service layer (`service/stamp.rs`) chooses each table's fields; this file only
//! encodes them.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

/// Why a row was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unverified {
    /// Its MAC does not verify: the row was written, moved or changed by someone
    /// without the HSM (`STATE_FORGED`).
    Forged,
    /// It has no MAC: written before state MACs, and not re-stamped yet
    /// (`STATE_UNSTAMPED`).
    Unstamped,
}

impl Unverified {
    /// The stable reason (`x-arca-reason`).
    pub fn reason(self) -> &'static str {
        match self {
            Unverified::Forged => "STATE_FORGED",
            Unverified::Unstamped => "STATE_UNSTAMPED",
        }
    }
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unverified::Forged => "state not authenticated by the HSM (refused)",
            Unverified::Unstamped => "state not stamped by the HSM yet (refused until re-stamped)",
        })
    }
}

/// Domain separation of every row encoding.
const DOMAIN: &[u8] = b"arca state row v1";

const TAG_TEXT: u8 = b's';
const TAG_INT: u8 = b'i';
const TAG_NONE: u8 = b'n';
const TAG_LIST: u8 = b'l';
const TAG_BYTES: u8 = b'b';

/// A row being encoded: `RowEncoding::new(table, seq).text(..).int(..)…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowEncoding(Vec<u8>);

fn put_len(out: &mut Vec<u8>, b: &[u8]) {
    // Rows never hold 4 GiB fields; saturating keeps the encoding total without a panic.
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
}

impl RowEncoding {
    /// Starts the encoding of a row of `table` at state sequence `seq`.
    pub fn new(table: &str, seq: i64) -> Self {
        let mut out = Vec::with_capacity(128);
        put_len(&mut out, DOMAIN);
        put_len(&mut out, table.as_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        RowEncoding(out)
    }

    fn name(mut self, name: &str, tag: u8) -> Self {
        put_len(&mut self.0, name.as_bytes());
        self.0.push(tag);
        self
    }

    /// A text field.
    pub fn text(self, name: &str, value: &str) -> Self {
        self.bytes_tagged(name, TAG_TEXT, value.as_bytes())
    }

    /// A byte-string field.
    pub fn bytes(self, name: &str, value: &[u8]) -> Self {
        self.bytes_tagged(name, TAG_BYTES, value)
    }

    fn bytes_tagged(self, name: &str, tag: u8, value: &[u8]) -> Self {
        let mut s = self.name(name, tag);
        put_len(&mut s.0, value);
        s
    }

    /// An integer field.
    pub fn int(self, name: &str, value: i64) -> Self {
        let mut s = self.name(name, TAG_INT);
        s.0.extend_from_slice(&value.to_be_bytes());
        s
    }

    /// An optional text field.
    pub fn opt_text(self, name: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.text(name, v),
            None => self.name(name, TAG_NONE),
        }
    }

    /// An optional integer field.
    pub fn opt_int(self, name: &str, value: Option<i64>) -> Self {
        match value {
            Some(v) => self.int(name, v),
            None => self.name(name, TAG_NONE),
        }
    }

    /// A list of text items (order matters).
    pub fn list(self, name: &str, items: &[String]) -> Self {
        let mut s = self.name(name, TAG_LIST);
        let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
        s.0.extend_from_slice(&n.to_be_bytes());
        for i in items {
            put_len(&mut s.0, i.as_bytes());
        }
        s
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: RowEncoding) -> Vec<u8> {
        r.into_bytes()
    }

    #[test]
    fn tables_rows_sequences_and_fields_never_collide() {
        let all = [
            enc(RowEncoding::new("tokens", 1).text("id", "a")),
            enc(RowEncoding::new("role_grants", 1).text("id", "a")),
            enc(RowEncoding::new("tokens", 2).text("id", "a")),
            enc(RowEncoding::new("tokens", 1).text("id", "b")),
            enc(RowEncoding::new("tokens", 1).text("ix", "a")),
            // Moving bytes between a name and a value, or between two fields.
            enc(RowEncoding::new("tokens", 1).text("id", "ab").text("c", "")),
            enc(RowEncoding::new("tokens", 1).text("id", "a").text("bc", "")),
            enc(RowEncoding::new("tokens", 1).text("id", "a").text("b", "c")),
            // Absent, empty, integer, bytes and list values of one field.
            enc(RowEncoding::new("tokens", 1).opt_text("id", None)),
            enc(RowEncoding::new("tokens", 1).text("id", "")),
            enc(RowEncoding::new("tokens", 1).int("id", 0)),
            enc(RowEncoding::new("tokens", 1).bytes("id", b"a")),
            enc(RowEncoding::new("tokens", 1).list("id", &["a".into()])),
            enc(RowEncoding::new("tokens", 1).list("id", &["a".into(), "".into()])),
            enc(RowEncoding::new("tokens", 1).list("id", &[])),
            // A table name that swallows the start of the sequence.
            enc(RowEncoding::new("tokens\0", 1).text("id", "a")),
        ];
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                assert_eq!(i == j, a == b, "{i} vs {j}");
            }
        }
    }

    #[test]
    fn deterministic_and_names_the_domain() {
        let a = enc(RowEncoding::new("t", 7).int("x", -1).opt_int("y", Some(3)));
        let b = enc(RowEncoding::new("t", 7).int("x", -1).opt_int("y", Some(3)));
        assert_eq!(a, b);
        assert!(a.windows(DOMAIN.len()).any(|w| w == DOMAIN));
    }
}
