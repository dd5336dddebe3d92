//! Approval requests of quorum operations (DESIGN §2 "Quorum operations"): which
//! operations exist, the canonical digest a custodian reviews, the request states and
//! the rules for approving and rejecting, and the [`QuorumApproved`] proof that K genuine
//! shares rebuilt the quorum secret.
//!
//! Pure logic: no I/O, and time is a parameter (`now`, Unix ms).
//!
//! Invariants:
//! - The digest covers the operation and every parameter, in one canonical encoding:
//!   u32-BE length + UTF-8 operation name, then the parameters sorted by name (byte
//!   order), each as u32-BE length + name, u32-BE length + value — the encoding of the
//!   encryption context, preceded by the operation. Hex SHA-256 of that.
//! - Only `PENDING` changes; `EXECUTED`, `REJECTED`, `EXPIRED` and `FAILED` are final.
//! - A [`QuorumApproved`] exists only after K shares with distinct x rebuilt a secret
//!   that matched the verifier; the secret itself is dropped (zeroized) before it returns.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

use super::{crypto, shamir, QuorumError};
use crate::secret::{QuorumSecret, Share};

/// Parameters of an operation, sorted by name.
pub type Parameters = BTreeMap<String, String>;

/// Parameter naming the key an operation acts on.
pub const PARAM_KEY: &str = "key";
/// Parameter naming the key version an operation acts on.
pub const PARAM_VERSION: &str = "version";
/// Parameter: a retirement's waiting period, in ms.
pub const PARAM_WAITING_MS: &str = "waiting_period_ms";
/// Parameter: a retention date, Unix ms ("" for none).
pub const PARAM_RETAIN_UNTIL: &str = "retain_until_ms";
/// Parameter of a rekey: the new threshold K.
pub const PARAM_THRESHOLD: &str = "threshold";
/// Parameter of a rekey: the new number of shares N.
pub const PARAM_SHARES: &str = "shares";
/// Parameter of a rekey: the new custodians, comma-separated in share order.
pub const PARAM_CUSTODIANS: &str = "custodians";

/// An operation that a quorum policy may put under K-of-N approval. Every name here is
/// known to the policy loader; operations that have no RPC yet never create requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// `KeyService.RotateKey` {key}.
    RotateKey,
    /// `KeyService.DisableKeyVersion` {key, version}.
    DisableKeyVersion,
    /// `KeyService.EnableKeyVersion` {key, version}.
    EnableKeyVersion,
    /// `KeyService.RetireKeyVersion` {key, version, waiting_period_ms}.
    RetireKeyVersion,
    /// `KeyService.RetireKey` {key, waiting_period_ms}.
    RetireKey,
    /// `KeyService.CancelRetirement` {key, version?}.
    CancelRetirement,
    /// `KeyService.SetRetention` {key, retain_until}.
    SetRetention,
    /// `QuorumService.Rekey` {threshold, custodians}.
    Rekey,
    /// `AccessService.UpdatePolicy` {policy}.
    UpdatePolicy,
    /// `AccessService.Elevate` {principal, role, duration_seconds, reason}.
    Elevate,
    /// `AccessService.CreateToken` {principal, roles, key_globs, cidrs, bound_principal,
    /// description, ttl_seconds, token_sha256}: the requester made the token and sends
    /// only its hash.
    CreateToken,
}

impl Operation {
    /// Every operation, in declaration order.
    pub const ALL: [Operation; 11] = [
        Operation::RotateKey,
        Operation::DisableKeyVersion,
        Operation::EnableKeyVersion,
        Operation::RetireKeyVersion,
        Operation::RetireKey,
        Operation::CancelRetirement,
        Operation::SetRetention,
        Operation::Rekey,
        Operation::UpdatePolicy,
        Operation::Elevate,
        Operation::CreateToken,
    ];

    /// The name used in policies, requests and the digest.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::RotateKey => "RotateKey",
            Operation::DisableKeyVersion => "DisableKeyVersion",
            Operation::EnableKeyVersion => "EnableKeyVersion",
            Operation::RetireKeyVersion => "RetireKeyVersion",
            Operation::RetireKey => "RetireKey",
            Operation::CancelRetirement => "CancelRetirement",
            Operation::SetRetention => "SetRetention",
            Operation::Rekey => "Rekey",
            Operation::UpdatePolicy => "UpdatePolicy",
            Operation::Elevate => "Elevate",
            Operation::CreateToken => "CreateToken",
        }
    }

    /// Parses a name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Operation::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The canonical encoding of an operation and its parameters (see the module docs).
pub fn canonical(op: Operation, params: &Parameters) -> Vec<u8> {
    let mut out = Vec::new();
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    field(op.as_str().as_bytes());
    // BTreeMap<String, _> iterates in byte order of the names.
    for (k, v) in params {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    out
}

/// The digest a custodian reviews and repeats when approving: hex SHA-256 of
/// [`canonical`].
pub fn digest(op: Operation, params: &Parameters) -> String {
    hex::encode(Sha256::digest(canonical(op, params)))
}

/// The state of an approval request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestState {
    /// Collecting approvals (or, with K approvals, about to run).
    Pending,
    /// The operation ran; its result is on the request.
    Executed,
    /// A custodian (or the requester) cancelled it.
    Rejected,
    /// Its lifetime ended before K approvals.
    Expired,
    /// K approvals were given but the operation could not run (and never will).
    Failed,
}

impl RequestState {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "PENDING",
            RequestState::Executed => "EXECUTED",
            RequestState::Rejected => "REJECTED",
            RequestState::Expired => "EXPIRED",
            RequestState::Failed => "FAILED",
        }
    }

    /// Parses a name (case-insensitive: `pending` works on the command line).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "PENDING" => RequestState::Pending,
            "EXECUTED" => RequestState::Executed,
            "REJECTED" => RequestState::Rejected,
            "EXPIRED" => RequestState::Expired,
            "FAILED" => RequestState::Failed,
            _ => return None,
        })
    }

    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        self != RequestState::Pending
    }
}

/// What the rules need to know about a request.
#[derive(Clone, Copy, Debug)]
pub struct Standing<'a> {
    /// The stored state.
    pub state: RequestState,
    /// Unix ms.
    pub expires_at: i64,
    /// Principal name of the requester.
    pub requester: &'a str,
    /// The person behind the requester, as recorded when the request was opened (the
    /// requester principal for requests opened before people were recorded).
    pub requester_person: &'a str,
    /// K.
    pub threshold: u8,
    /// Approvals so far.
    pub approvals: usize,
    /// The request's digest (hex).
    pub digest: &'a str,
}

impl Standing<'_> {
    /// The state as of `now`: a pending request past its expiry without K approvals is
    /// expired even before the store records it. (With K approvals it runs: the quorum
    /// was reached in time.)
    pub fn effective_state(&self, now: i64) -> RequestState {
        if self.state == RequestState::Pending
            && now >= self.expires_at
            && self.approvals < usize::from(self.threshold)
        {
            RequestState::Expired
        } else {
            self.state
        }
    }
}

/// Why an approval or rejection is refused before any credential is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request is decided (the state says how).
    NotPending(RequestState),
    /// The request expired.
    Expired,
    /// The requester may not approve their own request (through any of their
    /// principals).
    Requester,
    /// This custodian, or another principal of the same person, approved already.
    AlreadyApproved,
    /// The digest given is not the request's.
    DigestMismatch,
}

/// Who asks to approve, as people (DESIGN §2 "People, not principals"): persons come
/// from the access policy's `[people]`, computed by the caller (this module reads no
/// policy).
#[derive(Clone, Copy, Debug)]
pub struct Approver<'a> {
    /// The approver's principal (`custodian:NAME`).
    pub principal: &'a str,
    /// The person behind it, by the policy in force at approval.
    pub person: &'a str,
    /// The person behind the request's requester, by the same policy.
    pub requester_person: &'a str,
    /// Whether this custodian, or another principal of the same person, approved this
    /// request already.
    pub already: bool,
}

/// Whether `approver` may approve, given the digest they reviewed. The requester may not,
/// through any principal of theirs: the approver's person is compared with the
/// requester's person both as recorded at the request and by the policy in force now, so
/// neither a policy change before the approval nor one since the request lets a person
/// approve their own request. One person counts once.
pub fn check_approval(
    s: &Standing<'_>,
    approver: &Approver<'_>,
    presented_digest: &str,
    now: i64,
) -> Result<(), Refusal> {
    match s.effective_state(now) {
        RequestState::Pending => {}
        RequestState::Expired => return Err(Refusal::Expired),
        other => return Err(Refusal::NotPending(other)),
    }
    // Once K approvals are in, the request only waits to run: no more approvals.
    if s.approvals >= usize::from(s.threshold) {
        return Err(Refusal::NotPending(RequestState::Pending));
    }
    if approver.principal == s.requester
        || approver.person == s.requester_person
        || approver.person == approver.requester_person
    {
        return Err(Refusal::Requester);
    }
    if approver.already {
        return Err(Refusal::AlreadyApproved);
    }
    if !presented_digest.trim().eq_ignore_ascii_case(s.digest) {
        return Err(Refusal::DigestMismatch);
    }
    Ok(())
}

/// Whether a request may be rejected now.
pub fn check_reject(s: &Standing<'_>, now: i64) -> Result<(), Refusal> {
    match s.effective_state(now) {
        RequestState::Pending => Ok(()),
        RequestState::Expired => Err(Refusal::Expired),
        other => Err(Refusal::NotPending(other)),
    }
}

/// Whether a stored request's digest is the digest of its stored operation and
/// parameters: a request whose parameters were changed in the database after it was
/// made (and shown to custodians) does not match.
pub fn binds(op: Operation, params: &Parameters, stored_digest: &str) -> bool {
    crate::secret::ct_eq(digest(op, params).as_bytes(), stored_digest.as_bytes())
}

/// The AAD binding a custodian's share, sealed under `arca:meta`, to one request, its
/// digest (what the custodian approved) and one custodian: a sealed share copied to
/// another row, or kept for a request whose operation or parameters changed, does not
/// open.
pub fn share_aad(request_id: &str, digest: &str, custodian: &str) -> Vec<u8> {
    let mut out = b"arca:approval-share:v2".to_vec();
    for f in [request_id, digest, custodian] {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

/// Proof that K approvals rebuilt the quorum secret and it matched the verifier. Only
/// [`verify_quorum`] makes one; the operations that run on approval take it.
pub struct QuorumApproved {
    _proof: (),
}

/// Rebuilds the quorum secret from `shares` (K or more, distinct custodians), checks it
/// against `verifier`, wipes it, and returns the proof.
pub fn verify_quorum(
    shares: &[&Share],
    threshold: u8,
    verifier: &[u8],
) -> Result<QuorumApproved, QuorumError> {
    verify_quorum_with(shares, threshold, verifier, |_| Ok(())).map(|(ok, ())| ok)
}

/// As [`verify_quorum`], and runs `use_secret` on the checked secret before wiping it
/// (a rekey opens the sealed HSM PIN with it). `use_secret` must not keep the secret.
pub fn verify_quorum_with<T>(
    shares: &[&Share],
    threshold: u8,
    verifier: &[u8],
    use_secret: impl FnOnce(&QuorumSecret) -> Result<T, QuorumError>,
) -> Result<(QuorumApproved, T), QuorumError> {
    let secret = shamir::combine(shares, threshold)?;
    crypto::check_verifier(&secret, verifier)?;
    let out = use_secret(&secret);
    drop(secret);
    Ok((QuorumApproved { _proof: () }, out?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn params(pairs: &[(&str, &str)]) -> Parameters {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn canonical_encoding_is_the_operation_then_sorted_length_prefixed_parameters() {
        // Insertion order does not matter: the map sorts.
        let p = params(&[("version", "2"), ("key", "phi")]);
        assert_eq!(
            canonical(Operation::DisableKeyVersion, &p),
            [
                &[0, 0, 0, 17][..],
                b"DisableKeyVersion",
                &[0, 0, 0, 3],
                b"key",
                &[0, 0, 0, 3],
                b"phi",
                &[0, 0, 0, 7],
                b"version",
                &[0, 0, 0, 1],
                b"2",
            ]
            .concat()
        );
        // Fixed vectors, so the encoding cannot drift unnoticed (custodians may check a
        // digest with their own tools, e.g. a few lines of Python).
        assert_eq!(
            digest(Operation::DisableKeyVersion, &p),
            "8c90ba1db3083afe4d9d7f34f5729a834c751b6d6604addaf87b78960531e2a9"
        );
        assert_eq!(
            digest(Operation::RotateKey, &params(&[("key", "phi")])),
            "1700af6a237874d73d4e32888289df70b8972c544fce3d942d48a158179ac314"
        );
    }

    #[test]
    fn digests_separate_what_differs() {
        let rotate = |k: &str| digest(Operation::RotateKey, &params(&[("key", k)]));
        let d = rotate("phi");
        assert_eq!(d.len(), 64);
        assert_eq!(d, rotate("phi"));
        assert_ne!(d, rotate("phi2"));
        assert_ne!(
            d,
            digest(Operation::DisableKeyVersion, &params(&[("key", "phi")]))
        );
        // Length prefixes: moving bytes between name and value changes the digest.
        assert_ne!(
            digest(Operation::RotateKey, &params(&[("ab", "c")])),
            digest(Operation::RotateKey, &params(&[("a", "bc")]))
        );
        assert_ne!(
            digest(Operation::RotateKey, &params(&[])),
            digest(Operation::RotateKey, &params(&[("", "")]))
        );
    }

    #[test]
    fn names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(Operation::parse(op.as_str()), Some(op));
        }
        assert_eq!(Operation::parse("rotatekey"), None);
        for s in [
            RequestState::Pending,
            RequestState::Executed,
            RequestState::Rejected,
            RequestState::Expired,
            RequestState::Failed,
        ] {
            assert_eq!(RequestState::parse(s.as_str()), Some(s));
            assert_eq!(s.is_final(), s != RequestState::Pending);
        }
        assert_eq!(RequestState::parse("pending"), Some(RequestState::Pending));
        assert_eq!(RequestState::parse("EXECUTING"), None);
    }

    const T0: i64 = 1_800_000_000_000;
    const DAY: i64 = 24 * 3600 * 1000;

    fn standing(state: RequestState, approvals: usize) -> Standing<'static> {
        Standing {
            state,
            expires_at: T0 + DAY,
            requester: "dev-admin",
            requester_person: "dev-admin",
            threshold: 3,
            approvals,
            digest: "ab12",
        }
    }

    /// A custodian approver who is a person of their own (or `already` approved).
    fn by(who: &str, already: bool) -> Approver<'_> {
        Approver {
            principal: who,
            person: who,
            requester_person: "dev-admin",
            already,
        }
    }

    #[test]
    fn approval_rules_with_a_fixed_clock() {
        let clock = ManualClock::at(T0);
        let s = standing(RequestState::Pending, 1);
        let ok = |s: &Standing<'_>, who: &str, already: bool, d: &str, now: i64| {
            check_approval(s, &by(who, already), d, now)
        };
        assert_eq!(ok(&s, "custodian:a", false, "ab12", clock.now_ms()), Ok(()));
        // The digest compares without regard to case or surrounding space.
        assert_eq!(
            ok(&s, "custodian:a", false, " AB12\n", clock.now_ms()),
            Ok(())
        );
        assert_eq!(
            ok(&s, "custodian:a", false, "ab13", clock.now_ms()),
            Err(Refusal::DigestMismatch)
        );
        assert_eq!(
            ok(&s, "dev-admin", false, "ab12", clock.now_ms()),
            Err(Refusal::Requester)
        );
        assert_eq!(
            ok(&s, "custodian:a", true, "ab12", clock.now_ms()),
            Err(Refusal::AlreadyApproved)
        );
        // One millisecond before expiry it is open; at expiry it is closed.
        clock.advance(DAY - 1);
        assert_eq!(ok(&s, "custodian:a", false, "ab12", clock.now_ms()), Ok(()));
        clock.advance(1);
        assert_eq!(
            ok(&s, "custodian:a", false, "ab12", clock.now_ms()),
            Err(Refusal::Expired)
        );
        assert_eq!(s.effective_state(clock.now_ms()), RequestState::Expired);
        assert_eq!(check_reject(&s, clock.now_ms()), Err(Refusal::Expired));
    }

    #[test]
    fn the_requester_approves_through_no_principal_of_theirs() {
        // alice asked as key-admin:alice; the policy then and now says custodian:c1 is
        // alice too.
        let s = Standing {
            requester: "key-admin:alice",
            requester_person: "alice",
            ..standing(RequestState::Pending, 0)
        };
        let c1 = Approver {
            principal: "custodian:c1",
            person: "alice",
            requester_person: "alice",
            already: false,
        };
        assert_eq!(check_approval(&s, &c1, "ab12", T0), Err(Refusal::Requester));
        // The policy changed since the request: c1 is now "al", and so is the requester.
        let renamed = Approver {
            person: "al",
            requester_person: "al",
            ..c1
        };
        assert_eq!(
            check_approval(&s, &renamed, "ab12", T0),
            Err(Refusal::Requester)
        );
        // The policy now splits alice's principals: the person recorded at the request
        // still refuses her.
        let split = Approver {
            requester_person: "key-admin:alice",
            ..c1
        };
        assert_eq!(
            check_approval(&s, &split, "ab12", T0),
            Err(Refusal::Requester)
        );
        // The policy now joins them, though the request recorded alice apart.
        let apart = Standing {
            requester_person: "key-admin:alice",
            ..s
        };
        assert_eq!(
            check_approval(&apart, &c1, "ab12", T0),
            Err(Refusal::Requester)
        );
        // Another person approves.
        let bob = Approver {
            principal: "custodian:c2",
            person: "bob",
            requester_person: "alice",
            already: false,
        };
        assert_eq!(check_approval(&s, &bob, "ab12", T0), Ok(()));
        // The requester comes first: whoever asked hears that, not "already approved".
        let again = Approver {
            already: true,
            ..c1
        };
        assert_eq!(
            check_approval(&s, &again, "ab12", T0),
            Err(Refusal::Requester)
        );
    }

    #[test]
    fn decided_requests_take_nothing() {
        for st in [
            RequestState::Executed,
            RequestState::Rejected,
            RequestState::Expired,
            RequestState::Failed,
        ] {
            let s = standing(st, 0);
            assert_eq!(
                check_approval(&s, &by("custodian:a", false), "ab12", T0),
                Err(if st == RequestState::Expired {
                    Refusal::Expired
                } else {
                    Refusal::NotPending(st)
                })
            );
            assert!(check_reject(&s, T0).is_err());
            // A final state stays what it is, whatever the clock says.
            assert_eq!(s.effective_state(T0 + 2 * DAY), st);
        }
        // K approvals in: the request waits to run, takes no more, and does not expire.
        let full = standing(RequestState::Pending, 3);
        assert_eq!(
            check_approval(&full, &by("custodian:d", false), "ab12", T0),
            Err(Refusal::NotPending(RequestState::Pending))
        );
        assert_eq!(full.effective_state(T0 + 2 * DAY), RequestState::Pending);
        assert_eq!(
            check_reject(&standing(RequestState::Pending, 2), T0),
            Ok(())
        );
    }

    #[test]
    fn share_aad_binds_request_digest_and_custodian() {
        assert_ne!(share_aad("req_1", "d", "a"), share_aad("req_1", "d", "b"));
        assert_ne!(share_aad("req_1", "d", "a"), share_aad("req_2", "d", "a"));
        assert_ne!(share_aad("req_1", "d", "a"), share_aad("req_1", "e", "a"));
        assert_ne!(share_aad("req_1a", "d", ""), share_aad("req_1", "d", "a"));
    }

    #[test]
    fn a_digest_binds_operation_and_parameters() {
        let p = params(&[("key", "phi")]);
        let d = digest(Operation::RotateKey, &p);
        assert!(binds(Operation::RotateKey, &p, &d));
        assert!(!binds(Operation::DisableKeyVersion, &p, &d));
        assert!(!binds(
            Operation::RotateKey,
            &params(&[("key", "other")]),
            &d
        ));
        assert!(!binds(Operation::RotateKey, &p, &"0".repeat(64)));
    }

    #[test]
    fn quorum_needs_k_genuine_shares() {
        let s = QuorumSecret::from_slice(&[9; 32]).unwrap();
        let v = crypto::verifier(&s);
        let shares = shamir::split(&s, 3, 5).unwrap();
        assert!(verify_quorum(&[&shares[0], &shares[2], &shares[4]], 3, &v).is_ok());
        assert_eq!(
            verify_quorum(&[&shares[0], &shares[2]], 3, &v).err(),
            Some(QuorumError::NotEnoughShares)
        );
        let other = shamir::split(&QuorumSecret::from_slice(&[8; 32]).unwrap(), 3, 5).unwrap();
        assert_eq!(
            verify_quorum(&[&shares[0], &shares[2], &other[4]], 3, &v).err(),
            Some(QuorumError::VerifierMismatch)
        );
    }
}
