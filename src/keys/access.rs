//! [`HsmAccess`]: how the service opens the HSM at unseal and sets a new user PIN at init,
//! without naming a PKCS#11 type. `cli::server` wires it from the `arca-hsm` adapter (or
//! the in-memory fake in unit tests).
//!
//! Invariants:
//! - A PIN exists in clear only in zeroizing buffers, and only until it reaches the HSM
//!   layer (which keeps the user PIN for reconnects).
//! - Opening and PIN changes block; they run off the async threads.
//! - A refused login is [`KeysError::LoginRefused`]; an HSM that is down or a token that is
//!   missing is [`KeysError::HsmUnavailable`].

use std::sync::Arc;

use arca_hsm::{AuthPin, Hsm, HsmError};
use zeroize::Zeroizing;

use super::{EngineConfig, KeyEngine, KeysError};

/// Opens the HSM with a user PIN (logs in, opens the session pool). Blocking.
pub type HsmOpener =
    Arc<dyn Fn(AuthPin) -> std::result::Result<Arc<dyn Hsm>, HsmError> + Send + Sync>;
/// Sets a new user PIN with the security officer's PIN. Blocking.
pub type PinSetter =
    Arc<dyn Fn(&AuthPin, &AuthPin) -> std::result::Result<(), HsmError> + Send + Sync>;

/// The way to the HSM while sealed.
#[derive(Clone)]
pub struct HsmAccess {
    opener: HsmOpener,
    pin_setter: PinSetter,
    engine_cfg: EngineConfig,
}

fn classify(e: HsmError) -> KeysError {
    match e {
        HsmError::LoginRefused { .. } => KeysError::LoginRefused,
        HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. } => {
            KeysError::HsmUnavailable(Some(e))
        }
        e => KeysError::Hsm(e),
    }
}

fn pin_of(bytes: &[u8]) -> AuthPin {
    AuthPin::from(String::from_utf8_lossy(bytes).into_owned())
}

impl HsmAccess {
    /// Access through `opener` and `pin_setter`; engines start with `engine_cfg`.
    pub fn new(opener: HsmOpener, pin_setter: PinSetter, engine_cfg: EngineConfig) -> Self {
        HsmAccess {
            opener,
            pin_setter,
            engine_cfg,
        }
    }

    /// Logs in with the user `pin` and starts an engine over the HSM.
    pub async fn open(&self, pin: Zeroizing<Vec<u8>>) -> Result<KeyEngine, KeysError> {
        let opener = Arc::clone(&self.opener);
        let pin = pin_of(&pin);
        let hsm = tokio::task::spawn_blocking(move || opener(pin))
            .await
            .map_err(|_| KeysError::HsmUnavailable(None))?
            .map_err(classify)?;
        KeyEngine::start(hsm, &self.engine_cfg).map_err(|_| KeysError::HsmUnavailable(None))
    }

    /// Sets the user PIN to `new_pin`, logging in as the security officer with `so_pin`.
    pub async fn set_user_pin(
        &self,
        so_pin: Zeroizing<String>,
        new_pin: Zeroizing<Vec<u8>>,
    ) -> Result<(), KeysError> {
        let setter = Arc::clone(&self.pin_setter);
        let so = AuthPin::from(so_pin.to_string());
        let new = pin_of(&new_pin);
        tokio::task::spawn_blocking(move || setter(&so, &new))
            .await
            .map_err(|_| KeysError::HsmUnavailable(None))?
            .map_err(classify)
    }
}
