//! What client commands read before a call: secrets (shares, PINs, TOTP codes) from a
//! file or one line of stdin, key material in base64 from an argument or stdin, and
//! encryption contexts from `k=v` pairs.
//!
//! Invariant: every secret read here lives in a [`Zeroizing`] buffer. Imports only the
//! client's error type.

use std::collections::HashMap;
use std::io::Read;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use zeroize::Zeroizing;

use super::error::CliError;

/// Reads one secret line from `file`, or from stdin (after a prompt on stderr).
pub(super) fn read_secret(
    file: Option<&std::path::Path>,
    what: &'static str,
) -> Result<Zeroizing<String>, CliError> {
    let text = match file {
        Some(f) => Zeroizing::new(std::fs::read_to_string(f).map_err(|source| CliError::Read {
            what: format!("{what} from {}", f.display()),
            source,
        })?),
        None => {
            eprintln!("{what}:");
            let mut line = Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let trimmed = Zeroizing::new(text.trim().to_string());
    if trimmed.is_empty() {
        return Err(CliError::Empty(what));
    }
    Ok(trimmed)
}

/// The argument, or all of stdin when it is absent.
pub(super) fn read_arg_or_stdin(arg: Option<String>) -> Result<Zeroizing<String>, CliError> {
    match arg {
        Some(a) => Ok(Zeroizing::new(a)),
        None => {
            let mut s = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        }
    }
}

/// Base64 (standard alphabet, surrounding whitespace ignored) → bytes.
pub(super) fn decode_b64(s: &str, what: &'static str) -> Result<Zeroizing<Vec<u8>>, CliError> {
    B64.decode(s.trim())
        .map(Zeroizing::new)
        .map_err(|_| CliError::NotBase64(what))
}

/// `--context k=v` pairs → the request's context map.
pub(super) fn context(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}
