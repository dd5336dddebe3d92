//! Classification of PKCS#11 return values: which `CKR_` codes mean the HSM went away,
//! which mean a ciphertext failed authentication, which are ambiguous, and how a failure
//! is named in an [`HsmError`] (`C_Function` and `CKR_NAME`).
//!
//! # Invariants
//! - Pure functions: nothing here touches a session, the pool or the module. Acting on a
//!   verdict (marking the HSM down, probing the session) is the pool's job
//!   (`pool.rs`), so that this table of codes is the one place that decides.
//! - Outage codes: `CKR_DEVICE_REMOVED`, `CKR_DEVICE_ERROR`, `CKR_SESSION_HANDLE_INVALID`,
//!   `CKR_SESSION_CLOSED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`,
//!   `CKR_SLOT_ID_INVALID`, `CKR_CRYPTOKI_NOT_INITIALIZED` and `CKR_USER_NOT_LOGGED_IN`.
//!   On a pooled session `CKR_OPERATION_ACTIVE` also takes the HSM down (a wedged session
//!   cannot be closed alone).
//! - `CKR_GENERAL_ERROR` and `CKR_FUNCTION_FAILED` are never an outage by themselves:
//!   SoftHSM returns `CKR_GENERAL_ERROR` from `C_Decrypt` for a GCM tag mismatch, so they
//!   are [`Verdict::Ambiguous`] and the caller probes the session. A forged ciphertext can
//!   therefore never take the HSM "down".
//! - Errors carry the function name and the `CKR_` name only: never a PIN or data.
//!
//! Must not import anything from the rest of Arca, nor from the other files of
//! [`crate::pkcs11`].

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use crate::HsmError;

/// What a failed PKCS#11 call on a pooled session means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The device, token, session or login went away, or a half-finished operation
    /// wedged the session (`CKR_OPERATION_ACTIVE`; it cannot be closed alone, as it may be
    /// the last one): the HSM is down and the whole pool is rebuilt.
    Down,
    /// While decrypting: the ciphertext is malformed or failed authentication.
    AuthenticationFailed,
    /// `CKR_GENERAL_ERROR` or `CKR_FUNCTION_FAILED`: a dead device, or (SoftHSM) a GCM tag
    /// mismatch. Only a probe of the session can tell.
    Ambiguous,
    /// The HSM answered and refused the call.
    Refused,
}

/// Classifies the return value of a failed call on a pooled session. `decrypting`: the
/// call was part of a `C_Decrypt`, where bad data means a failed authentication.
pub(super) fn classify(rv: RvError, decrypting: bool) -> Verdict {
    if is_outage(rv) || rv == RvError::OperationActive {
        return Verdict::Down;
    }
    if decrypting
        && matches!(
            rv,
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange
        )
    {
        return Verdict::AuthenticationFailed;
    }
    if matches!(rv, RvError::GeneralError | RvError::FunctionFailed) {
        return Verdict::Ambiguous;
    }
    Verdict::Refused
}

/// Return values that mean the device, token, session or login went away. Observed:
/// p11-kit's client returns `CKR_DEVICE_ERROR` from every function (including
/// `C_GetSlotList`) once its server is gone. `CKR_GENERAL_ERROR` and
/// `CKR_FUNCTION_FAILED` are not in this list: they are confirmed by a session probe
/// first (see the module docs).
pub(super) fn is_outage(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
    )
}

/// A cached object handle no longer names an object in this session.
pub(super) fn is_stale_handle(rv: RvError) -> bool {
    matches!(rv, RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
}

/// Maps an error outside a pooled session (start-up, reconnect, SoftHSM helpers): outage
/// codes become [`HsmError::Unavailable`], anything else [`HsmError::Pkcs11`].
pub(crate) fn plain_error(e: CkError, site: &'static str) -> HsmError {
    match e {
        CkError::Pkcs11(rv, f) if is_outage(rv) => HsmError::Unavailable {
            function: fn_name(f, site),
            detail: ckr_name(rv),
        },
        CkError::Pkcs11(rv, f) => HsmError::Pkcs11 {
            function: fn_name(f, site),
            detail: ckr_name(rv),
        },
        other => HsmError::Pkcs11 {
            function: site,
            detail: other.to_string(),
        },
    }
}

/// `CKR_*` name of a return value (`DeviceError` -> `CKR_DEVICE_ERROR`).
pub(super) fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:08x})"),
        RvError::UnknownErrorCode(v) => format!("CKR_UNKNOWN(0x{v:08x})"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

/// A cryptoki error as "C_Function: CKR_NAME" (or its own text for non-PKCS#11 errors).
pub(super) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{}: {}", fn_name(*f, "PKCS#11"), ckr_name(*rv)),
        other => other.to_string(),
    }
}

/// The C name of a cryptoki [`Function`]; `fallback` for functions Arca never calls.
pub(super) fn fn_name(f: Function, fallback: &'static str) -> &'static str {
    match f {
        Function::Initialize => "C_Initialize",
        Function::Finalize => "C_Finalize",
        Function::GetSlotList => "C_GetSlotList",
        Function::GetSlotInfo => "C_GetSlotInfo",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::InitToken => "C_InitToken",
        Function::InitPIN => "C_InitPIN",
        Function::SetPIN => "C_SetPIN",
        Function::OpenSession => "C_OpenSession",
        Function::CloseSession => "C_CloseSession",
        Function::CloseAllSessions => "C_CloseAllSessions",
        Function::GetSessionInfo => "C_GetSessionInfo",
        Function::Login => "C_Login",
        Function::Logout => "C_Logout",
        Function::CopyObject => "C_CopyObject",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsFinal => "C_FindObjectsFinal",
        Function::EncryptInit => "C_EncryptInit",
        Function::Encrypt => "C_Encrypt",
        Function::DecryptInit => "C_DecryptInit",
        Function::Decrypt => "C_Decrypt",
        Function::SignInit => "C_SignInit",
        Function::Sign => "C_Sign",
        Function::GenerateKey => "C_GenerateKey",
        Function::GenerateRandom => "C_GenerateRandom",
        _ => fallback,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ckr_names() {
        assert_eq!(ckr_name(RvError::DeviceError), "CKR_DEVICE_ERROR");
        assert_eq!(ckr_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            ckr_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
        for rv in [
            RvError::DeviceRemoved,
            RvError::DeviceError,
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::TokenNotPresent,
            RvError::TokenNotRecognized,
            RvError::SlotIdInvalid,
            RvError::CryptokiNotInitialized,
            RvError::UserNotLoggedIn,
        ] {
            assert!(is_outage(rv), "{rv:?}");
        }
        assert!(!is_outage(RvError::GeneralError));
        assert!(!is_outage(RvError::EncryptedDataInvalid));
    }

    #[test]
    fn verdicts() {
        use Verdict::*;
        for decrypting in [false, true] {
            assert_eq!(classify(RvError::DeviceError, decrypting), Down);
            assert_eq!(classify(RvError::UserNotLoggedIn, decrypting), Down);
            assert_eq!(classify(RvError::OperationActive, decrypting), Down);
            assert_eq!(classify(RvError::GeneralError, decrypting), Ambiguous);
            assert_eq!(classify(RvError::FunctionFailed, decrypting), Ambiguous);
            assert_eq!(classify(RvError::MechanismInvalid, decrypting), Refused);
        }
        // Bad data is an authentication failure only while decrypting.
        for rv in [
            RvError::EncryptedDataInvalid,
            RvError::EncryptedDataLenRange,
        ] {
            assert_eq!(classify(rv, true), AuthenticationFailed);
            assert_eq!(classify(rv, false), Refused);
        }
    }
}
