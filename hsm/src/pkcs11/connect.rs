//! Reaching the token: loading the PKCS#11 module, `C_Initialize` (OS locking), finding
//! the token by label, opening the sessions and `C_Login`.
//!
//! # Invariants
//! - `C_Initialize` is process-global for a module. [`initialize`] refuses a module that is
//!   already initialised in this process ([`HsmError::Module`]), since that context belongs
//!   to someone else; only [`connect`] while reconnecting, when the context is this
//!   `Pkcs11Hsm`'s own lost one, finalizes it again.
//! - A failed [`connect`] finalizes the module before returning, so a later attempt in
//!   this process can initialise it afresh.
//! - The token is found **by label** on every (re)connect ([`find_slot`]); a slot id is
//!   never kept across a reconnect (SoftHSM renumbers slots, network HSMs re-enumerate
//!   them). Exactly one initialised token may carry the label.
//! - Sessions are opened "no close on drop" (they die with `C_Finalize`, see `pool.rs`),
//!   and the user logs in once: a login holds for every session of the application.
//! - The PIN stays in [`AuthPin`] and is exposed only at the `C_Login` call.
//!
//! Used by `pool.rs` and, through `crate::pkcs11`, by [`crate::softhsm`]. Must not import
//! anything from the rest of Arca, nor from the pool or the key-operation files.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use super::error::{ckr_name, describe, is_outage, plain_error};
use crate::{AuthPin, HsmError, Result};

/// Loads and initialises the module, finds the token, opens `n` sessions and logs in.
/// On failure the module is finalized again, so a later attempt in this process works.
///
/// `reconnecting`: this `Pkcs11Hsm` owns the module and has just finalized its own
/// context; if the module still says "already initialised" (the `C_Finalize` of the lost
/// context failed), finalize once more and retry. At start-up the same answer means
/// another user of the module in this process, whose context must not be touched.
pub(super) fn connect(
    module: &Path,
    label: &str,
    pin: &AuthPin,
    n: usize,
    reconnecting: bool,
) -> Result<(Pkcs11, Vec<Session>)> {
    let ctx = match try_initialize(module) {
        Ok(ctx) => ctx,
        Err(InitFailure::AlreadyInitialized(stale)) if reconnecting => {
            tracing::warn!("module still initialised after C_Finalize; finalizing again");
            if let Err(e) = stale.finalize() {
                tracing::debug!(error = %describe(&e), "C_Finalize of a stale initialisation");
            }
            initialize(module)?
        }
        Err(InitFailure::AlreadyInitialized(_)) => return Err(already_initialized(module)),
        Err(InitFailure::Other(e)) => return Err(e),
    };
    match open_sessions(&ctx, label, pin, n) {
        Ok(sessions) => Ok((ctx, sessions)),
        Err(e) => {
            if let Err(fe) = ctx.finalize() {
                tracing::debug!(error = %describe(&fe), "C_Finalize after a failed connect");
            }
            Err(e)
        }
    }
}

/// `Pkcs11::new` + `C_Initialize` with OS locking. Shared with [`crate::softhsm`].
pub(crate) fn initialize(module: &Path) -> Result<Pkcs11> {
    try_initialize(module).map_err(|failure| match failure {
        InitFailure::AlreadyInitialized(_) => already_initialized(module),
        InitFailure::Other(e) => e,
    })
}

fn already_initialized(module: &Path) -> HsmError {
    HsmError::Module {
        path: module.display().to_string(),
        detail: "C_Initialize: CKR_CRYPTOKI_ALREADY_INITIALIZED (only one Pkcs11Hsm per module \
                 may be live in a process)"
            .into(),
    }
}

enum InitFailure {
    /// `CKR_CRYPTOKI_ALREADY_INITIALIZED`, with the (loaded, not initialised by us) module.
    AlreadyInitialized(Pkcs11),
    Other(HsmError),
}

fn try_initialize(module: &Path) -> std::result::Result<Pkcs11, InitFailure> {
    let module_err = |detail: String| {
        InitFailure::Other(HsmError::Module {
            path: module.display().to_string(),
            detail,
        })
    };
    let ctx = Pkcs11::new(module).map_err(|e| module_err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(ctx),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            Err(InitFailure::AlreadyInitialized(ctx))
        }
        Err(CkError::Pkcs11(rv, _)) if is_outage(rv) => {
            Err(InitFailure::Other(HsmError::Unavailable {
                function: "C_Initialize",
                detail: ckr_name(rv),
            }))
        }
        Err(e) => Err(module_err(format!("C_Initialize: {}", describe(&e)))),
    }
}

/// Finds the initialised token labelled `label`. Exactly one must exist.
pub(crate) fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| plain_error(e, "C_GetSlotList"))?;
    let mut found = Vec::new();
    for slot in slots {
        match ctx.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label() == label => found.push(slot),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%slot, error = %describe(&e), "C_GetTokenInfo failed; skipping slot")
            }
        }
    }
    match found.as_slice() {
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
        }),
        [one] => Ok(*one),
        more => Err(HsmError::Pkcs11 {
            function: "C_GetTokenInfo",
            detail: format!("{} tokens labelled {label:?}", more.len()),
        }),
    }
}

fn open_sessions(ctx: &Pkcs11, label: &str, pin: &AuthPin, n: usize) -> Result<Vec<Session>> {
    let slot = find_slot(ctx, label)?;
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(
            ctx.open_rw_session_no_drop(slot)
                .map_err(|e| plain_error(e, "C_OpenSession"))?,
        );
    }
    if let Some(first) = sessions.first() {
        login(first, UserType::User, pin)?;
    }
    Ok(sessions)
}

/// `C_Login`; `CKR_USER_ALREADY_LOGGED_IN` is success. Shared with [`crate::softhsm`].
pub(crate) fn login(session: &Session, user: UserType, pin: &AuthPin) -> Result<()> {
    match session.login(user, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::UserPinNotInitialized
            | RvError::UserTypeInvalid),
            _,
        )) => Err(HsmError::LoginRefused {
            detail: ckr_name(rv),
        }),
        Err(e) => Err(plain_error(e, "C_Login")),
    }
}
