//! Key objects on the token: generating a key (`C_GenerateKey`), asking whether one
//! exists, reading back its attributes (`C_GetAttributeValue`), destroying it
//! (`C_DestroyObject`) and forgetting this process's handles and session copies of it.
//!
//! # Invariants
//! - Generated keys are token objects that are private, sensitive and never extractable,
//!   with exactly the usage flags of their [`KeyKind`] (no wrap, unwrap or derive).
//! - `generate_key` refuses an existing `CKA_ID` (checked just before `C_GenerateKey`;
//!   ids are random 128-bit values, and a lookup that finds two token objects with one
//!   `CKA_ID` fails rather than pick one).
//! - `destroy_key` and `forget_key` first collect **every** pooled session (an exclusive
//!   section: no operation in flight), destroy the session copies and drop the cached
//!   handles in each, then (`destroy_key` only) destroy the token object, then sweep any
//!   session object left with that `CKA_ID`. If the sessions cannot be collected in time,
//!   the pool is torn down instead (marked down), which destroys all copies with
//!   `C_Finalize` at the reconnect.
//! - `forget_key` succeeds only when a fresh search finds no session object with that
//!   `CKA_ID`; any failure is returned (the caller retries or resets the sessions).
//!
//! Must not import anything from the rest of Arca.

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::types::Ulong;

use super::device::Pkcs11Hsm;
use super::error::is_stale_handle;
use super::handles::Usage;
use super::pool::down_error;
use super::session::{CachedKey, PooledSession};
use crate::{HsmError, KeyAttributes, KeyKind, ObjectId, Result};

/// [`crate::Hsm::generate_key`].
pub(super) fn generate_key(
    hsm: &Pkcs11Hsm,
    kind: KeyKind,
    id: &ObjectId,
    label: &str,
) -> Result<()> {
    let mut guard = hsm.pool.checkout()?;
    let s = guard.get()?;
    if hsm.find_token_object(s, id)?.is_some() {
        return Err(HsmError::ObjectExists);
    }
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::ValueLen(Ulong::new(32)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Id(id.0.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mechanism = match kind {
        KeyKind::Aes256 => {
            template.extend([
                Attribute::KeyType(KeyType::AES),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Sign(false),
                Attribute::Verify(false),
            ]);
            Mechanism::AesKeyGen
        }
        KeyKind::HmacSha256 => {
            template.extend([
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Sign(true),
                Attribute::Verify(true),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
            ]);
            Mechanism::GenericSecretKeyGen
        }
    };
    match s.session.generate_key(&mechanism, &template) {
        Ok(token) => {
            s.keys.insert(*id, CachedKey { token, copy: None });
            tracing::info!(key = %id, ?kind, "HSM key generated");
            Ok(())
        }
        Err(e) => Err(hsm.pool.fail(s, e, "C_GenerateKey", false)),
    }
}

/// [`crate::Hsm::key_exists`].
pub(super) fn key_exists(hsm: &Pkcs11Hsm, id: &ObjectId) -> Result<bool> {
    let mut guard = hsm.pool.checkout()?;
    let s = guard.get()?;
    let exists = hsm.find_token_object(s, id)?.is_some();
    if !exists {
        // Whatever this session still holds for it is stale.
        s.purge(id);
    }
    Ok(exists)
}

/// [`crate::Hsm::key_attributes`].
pub(super) fn key_attributes(hsm: &Pkcs11Hsm, id: &ObjectId) -> Result<KeyAttributes> {
    let attrs = hsm.with_key(
        id,
        Usage::Token,
        "C_GetAttributeValue",
        false,
        |session, key| {
            session.get_attributes(
                key,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Label,
                ],
            )
        },
    )?;
    let missing = |name: &str| HsmError::Pkcs11 {
        function: "C_GetAttributeValue",
        detail: format!("{name} not returned"),
    };
    let (mut token, mut sensitive, mut extractable) = (None, None, None);
    let (mut always_sensitive, mut never_extractable, mut label) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::Token(v) => token = Some(v),
            Attribute::Sensitive(v) => sensitive = Some(v),
            Attribute::Extractable(v) => extractable = Some(v),
            Attribute::AlwaysSensitive(v) => always_sensitive = Some(v),
            Attribute::NeverExtractable(v) => never_extractable = Some(v),
            Attribute::Label(v) => label = Some(String::from_utf8_lossy(&v).into_owned()),
            _ => {}
        }
    }
    Ok(KeyAttributes {
        token: token.ok_or_else(|| missing("CKA_TOKEN"))?,
        sensitive: sensitive.ok_or_else(|| missing("CKA_SENSITIVE"))?,
        extractable: extractable.ok_or_else(|| missing("CKA_EXTRACTABLE"))?,
        always_sensitive: always_sensitive.ok_or_else(|| missing("CKA_ALWAYS_SENSITIVE"))?,
        never_extractable: never_extractable.ok_or_else(|| missing("CKA_NEVER_EXTRACTABLE"))?,
        label: label.unwrap_or_default(),
    })
}

/// [`crate::Hsm::destroy_key`].
pub(super) fn destroy_key(hsm: &Pkcs11Hsm, id: &ObjectId) -> Result<bool> {
    let destroyed = hsm.pool.exclusive(|sessions| {
        for s in sessions.iter_mut() {
            s.purge(id);
        }
        let Some(s) = sessions.first() else {
            return Err(down_error());
        };
        let existed = match hsm.find_token_object(s, id)? {
            Some(handle) => match s.session.destroy_object(handle) {
                Ok(()) => true,
                Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => false,
                Err(e) => return Err(hsm.pool.fail(s, e, "C_DestroyObject", false)),
            },
            None => false,
        };
        let swept = sweep_copies(hsm, s, id)?;
        if swept > 0 {
            tracing::warn!(key = %id, swept, "destroyed untracked session copies");
        }
        Ok(existed)
    })?;
    tracing::info!(key = %id, destroyed, "HSM key destroyed");
    Ok(destroyed)
}

/// [`crate::Hsm::forget_key`]: `Ok` only when no session object with that `CKA_ID` is
/// left (looked up again after the copies were destroyed).
pub(super) fn forget_key(hsm: &Pkcs11Hsm, id: &ObjectId) -> Result<()> {
    let result = hsm.pool.exclusive(|sessions| {
        for s in sessions.iter_mut() {
            s.purge(id);
        }
        let Some(s) = sessions.first() else {
            return Err(down_error());
        };
        sweep_copies(hsm, s, id)?;
        let left = hsm.find_session_copies(s, id)?.len();
        if left > 0 {
            return Err(HsmError::Pkcs11 {
                function: "C_DestroyObject",
                detail: format!("{left} session copies survived"),
            });
        }
        Ok(())
    });
    match &result {
        Ok(()) => tracing::debug!(key = %id, "HSM key handles forgotten"),
        Err(e) => tracing::warn!(key = %id, error = %e, "forget_key incomplete"),
    }
    result
}

/// [`Pkcs11Hsm::session_copy_count`].
pub(super) fn session_copy_count(hsm: &Pkcs11Hsm, id: &ObjectId) -> Result<usize> {
    let mut guard = hsm.pool.checkout()?;
    let s = guard.get()?;
    Ok(hsm.find_session_copies(s, id)?.len())
}

/// Destroys every session object with this `CKA_ID` still visible (copies the caches
/// lost track of). Returns how many were destroyed.
fn sweep_copies(hsm: &Pkcs11Hsm, s: &PooledSession, id: &ObjectId) -> Result<usize> {
    let found = hsm.find_session_copies(s, id)?;
    for h in &found {
        match s.session.destroy_object(*h) {
            Ok(()) => {}
            Err(CkError::Pkcs11(rv, _)) if is_stale_handle(rv) => {}
            Err(e) => return Err(hsm.pool.fail(s, e, "C_DestroyObject", false)),
        }
    }
    Ok(found.len())
}
