//! SoftHSM2 support for dev mode, tests and benchmarks: the configuration template, the
//! module path, and token initialisation through PKCS#11; and, on any PKCS#11 token,
//! setting a new user PIN as the security officer ([`reset_user_pin`], which operator
//! init uses so that no person knows the user PIN).
//!
//! SoftHSM reads its configuration file from the `SOFTHSM2_CONF` environment variable
//! **in `C_Initialize`**. The caller sets it (to the path [`write_config`] returns) before
//! the first call into the module in this process — that is, before [`token_exists`],
//! [`init_token`], [`reset_user_pin`] or [`crate::pkcs11::Pkcs11Hsm::open`] — and does not
//! change it afterwards. Setting an environment variable is only safe while no other
//! thread reads the environment, so do it early in `main` or at the start of a test.
//!
//! # Invariants
//! - A token directory is `DIR/tokens`, mode 0700; the configuration `DIR/softhsm2.conf`
//!   (mode 0600) points at it by absolute path.
//! - [`token_exists`], [`init_token`] and [`reset_user_pin`] `C_Initialize` the module and
//!   `C_Finalize` it before returning (also on error), so a
//!   [`crate::pkcs11::Pkcs11Hsm::open`] later in the same process works. They must not run
//!   while a `Pkcs11Hsm` on the same module is live in the process (they would fail with
//!   [`HsmError::Module`], "already initialised").
//! - Tokens are found by label, never by slot index: SoftHSM renumbers slots after
//!   `C_InitToken`.
//! - PINs stay in [`AuthPin`] (`SecretString`) and are exposed only at the FFI call.
//!
//! The shell equivalent of [`write_config`] and [`init_token`], for scripts, is
//! `hsm/softhsm/init-token`.
//!
//! Uses the module loading, token lookup and login of [`crate::pkcs11`]; must not import
//! anything from the rest of Arca.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;

use crate::pkcs11::{find_slot, initialize, login, plain_error};
use crate::{AuthPin, HsmError, Result};

/// The SoftHSM2 configuration template (`hsm/softhsm/softhsm2.conf.in`); `@TOKENDIR@`
/// stands for the absolute token directory.
pub const CONFIG_TEMPLATE: &str = include_str!("../softhsm/softhsm2.conf.in");

/// Placeholder of the token directory in [`CONFIG_TEMPLATE`].
pub const TOKENDIR_PLACEHOLDER: &str = "@TOKENDIR@";

/// File name of the configuration [`write_config`] writes.
pub const CONFIG_FILE: &str = "softhsm2.conf";

/// Name of the token directory inside the directory given to [`write_config`].
pub const TOKENS_DIR: &str = "tokens";

/// Where Debian, Ubuntu and source installs put the SoftHSM2 module.
pub const MODULE_CANDIDATES: [&str; 4] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The first SoftHSM2 module found in the usual places, if any.
pub fn default_module_path() -> Option<PathBuf> {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The configuration text for a token directory (an absolute path).
pub fn render_config(token_dir: &Path) -> io::Result<String> {
    let dir = token_dir.to_str().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "token directory is not UTF-8")
    })?;
    if !token_dir.is_absolute() || dir.contains(['\n', '\r']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "token directory must be an absolute path without line breaks",
        ));
    }
    Ok(CONFIG_TEMPLATE.replace(TOKENDIR_PLACEHOLDER, dir))
}

/// Writes `DIR/softhsm2.conf` (mode 0600) pointing at `DIR/tokens`, creating `DIR` and
/// `DIR/tokens` (mode 0700) as needed. Returns the configuration path, for
/// `SOFTHSM2_CONF`. Existing tokens are kept.
pub fn write_config(dir: &Path) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let dir = fs::canonicalize(dir)?;
    let tokens = dir.join(TOKENS_DIR);
    match fs::DirBuilder::new().mode(0o700).create(&tokens) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700))?;
        }
        Err(e) => return Err(e),
    }
    let text = render_config(&tokens)?;
    let path = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Whether an initialised token with this label exists. Initialises and finalizes the
/// module (see the module docs: `SOFTHSM2_CONF` must be set).
pub fn token_exists(module: &Path, label: &str) -> Result<bool> {
    with_module(module, |ctx| match find_slot(ctx, label) {
        Ok(_) => Ok(true),
        Err(HsmError::TokenNotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    })
}

/// Initialises a new token: finds a slot whose token is not initialised,
/// `C_InitToken` with the SO PIN and `label`, logs in as SO, `C_InitPIN` with the user
/// PIN, and finalizes the module.
///
/// Fails with [`HsmError::ObjectExists`] if a token with that label already exists and
/// [`HsmError::InvalidInput`] for a label that is empty or longer than 32 bytes.
pub fn init_token(module: &Path, label: &str, so_pin: &AuthPin, user_pin: &AuthPin) -> Result<()> {
    if label.is_empty() || label.len() > 32 {
        return Err(HsmError::InvalidInput("token label must be 1 to 32 bytes"));
    }
    with_module(module, |ctx| {
        match find_slot(ctx, label) {
            Ok(_) => return Err(HsmError::ObjectExists),
            Err(HsmError::TokenNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let free = ctx
            .get_slots_with_token()
            .map_err(|e| plain_error(e, "C_GetSlotList"))?
            .into_iter()
            .find(|slot| {
                ctx.get_token_info(*slot)
                    .map(|info| !info.token_initialized())
                    .unwrap_or(false)
            })
            .ok_or_else(|| HsmError::Pkcs11 {
                function: "C_GetTokenInfo",
                detail: "no slot with an uninitialised token".into(),
            })?;
        ctx.init_token(free, so_pin, label)
            .map_err(|e| plain_error(e, "C_InitToken"))?;
        // SoftHSM moves the new token to a slot id derived from its serial number.
        let slot = find_slot(ctx, label)?;
        set_user_pin(ctx, slot, so_pin, user_pin)?;
        tracing::info!(token = label, "SoftHSM token initialised");
        Ok(())
    })
}

/// Sets a new user PIN on the token labelled `label`, logging in as the security
/// officer (`C_InitPIN`). Works on any PKCS#11 token, not only SoftHSM; dual control uses
/// it so that no person ever knows the user PIN. Like [`init_token`], it initialises the
/// module itself: call it while no `Pkcs11Hsm` is open on `module` in this process.
pub fn reset_user_pin(
    module: &Path,
    label: &str,
    so_pin: &AuthPin,
    new_pin: &AuthPin,
) -> Result<()> {
    with_module(module, |ctx| {
        let slot = find_slot(ctx, label)?;
        set_user_pin(ctx, slot, so_pin, new_pin)
    })
}

/// Logs in to the token in `slot` as the security officer, sets the user PIN
/// (`C_InitPIN`) and logs out again (the session closes on return).
fn set_user_pin(ctx: &Pkcs11, slot: Slot, so_pin: &AuthPin, user_pin: &AuthPin) -> Result<()> {
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| plain_error(e, "C_OpenSession"))?;
    login(&session, UserType::So, so_pin)?;
    let result = session
        .init_pin(user_pin)
        .map_err(|e| plain_error(e, "C_InitPIN"));
    if let Err(e) = session.logout() {
        tracing::debug!(error = %e, "C_Logout after C_InitPIN");
    }
    result
}

/// Runs `f` with the module initialised, finalizing it afterwards whatever happens.
fn with_module<T>(module: &Path, f: impl FnOnce(&Pkcs11) -> Result<T>) -> Result<T> {
    let ctx = initialize(module)?;
    let result = f(&ctx);
    if let Err(e) = ctx.finalize() {
        tracing::warn!(error = %e, "C_Finalize failed");
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn template_has_placeholder_and_settings() {
        assert!(CONFIG_TEMPLATE.contains("directories.tokendir = @TOKENDIR@"));
        assert!(CONFIG_TEMPLATE.contains("objectstore.backend = file"));
        assert!(CONFIG_TEMPLATE.contains("log.level = ERROR"));
        assert!(CONFIG_TEMPLATE.contains("slots.removable = false"));
    }

    #[test]
    fn write_config_creates_private_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hsm");
        let conf = write_config(&dir).unwrap();
        let text = fs::read_to_string(&conf).unwrap();
        let tokens = fs::canonicalize(dir.join(TOKENS_DIR)).unwrap();
        assert!(text.contains(&format!("directories.tokendir = {}\n", tokens.display())));
        assert!(!text.contains(TOKENDIR_PLACEHOLDER));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tokens), 0o700);
        assert_eq!(mode(&conf), 0o600);
        // Idempotent.
        assert_eq!(write_config(&dir).unwrap(), conf);
    }

    #[test]
    fn render_refuses_relative_or_multiline() {
        assert!(render_config(Path::new("relative/tokens")).is_err());
        assert!(render_config(Path::new("/tmp/a\nlog.level = DEBUG")).is_err());
    }
}
