//! Pure checks of lifecycle changes against a key as it is: which versions a change
//! touches, or the [`Conflict`] that forbids it. Used when a change is asked (so no
//! approval request is made for a change that cannot happen) and again when it runs.
//!
//! Must not import: tonic, prost, sqlx, cryptoki; no I/O.

use crate::keys::VersionState;
use crate::service::error::{Conflict, Result, ServiceError};
use crate::store::{KeyRecord, VersionRecord};

/// The states a version may enter `to` from, if `current` is one of them. Enabling is
/// only the reverse of disabling; a version scheduled for destruction must have its
/// retirement cancelled first.
pub(super) fn transition_sources(
    current: VersionState,
    to: VersionState,
) -> Result<&'static [VersionState]> {
    let from: &'static [VersionState] = match to {
        VersionState::Enabled => &[VersionState::Disabled],
        VersionState::Disabled => &[VersionState::Enabled],
        _ => VersionState::sources_of(to),
    };
    if from.contains(&current) {
        Ok(from)
    } else {
        Err(ServiceError::Conflict(match current {
            VersionState::Destroyed => Conflict::VersionDestroyed,
            VersionState::ScheduledForDestruction => Conflict::VersionScheduled,
            _ => Conflict::IllegalTransition,
        }))
    }
}

/// The versions a retirement would schedule (`version`, or every version not yet
/// retired).
pub(super) fn plan_retire(key: &KeyRecord, version: Option<u32>) -> Result<Vec<u32>> {
    let Some(v) = version else {
        let all: Vec<u32> = key
            .versions
            .iter()
            .filter(|v| matches!(v.state, VersionState::Enabled | VersionState::Disabled))
            .map(|v| v.version)
            .collect();
        if all.is_empty() {
            return Err(ServiceError::Conflict(Conflict::AllRetired));
        }
        return Ok(all);
    };
    let rec = key
        .version(v)
        .ok_or(ServiceError::NotFound("key version not found"))?;
    match rec.state {
        VersionState::Enabled | VersionState::Disabled => {}
        VersionState::ScheduledForDestruction => {
            return Err(ServiceError::Conflict(Conflict::VersionScheduled))
        }
        VersionState::Destroyed => return Err(ServiceError::Conflict(Conflict::VersionDestroyed)),
    }
    let others_enabled = key
        .versions
        .iter()
        .any(|o| o.version != v && o.state == VersionState::Enabled);
    if v == key.primary_version && others_enabled {
        return Err(ServiceError::Conflict(Conflict::PrimaryInUse));
    }
    Ok(vec![v])
}

/// Whether a version is scheduled and its destruction has not started.
fn cancellable(v: &VersionRecord) -> Result<bool> {
    match (v.state, v.destroying_at) {
        (VersionState::ScheduledForDestruction, None) => Ok(true),
        (VersionState::ScheduledForDestruction, Some(_)) => {
            Err(ServiceError::Conflict(Conflict::DestructionStarted))
        }
        _ => Ok(false),
    }
}

/// The versions a cancellation would restore.
pub(super) fn plan_cancel(key: &KeyRecord, version: Option<u32>) -> Result<Vec<u32>> {
    let Some(v) = version else {
        let mut out = Vec::new();
        for v in &key.versions {
            if cancellable(v)? {
                out.push(v.version);
            }
        }
        if out.is_empty() {
            return Err(ServiceError::Conflict(Conflict::NothingScheduled));
        }
        return Ok(out);
    };
    let rec = key
        .version(v)
        .ok_or(ServiceError::NotFound("key version not found"))?;
    if cancellable(rec)? {
        Ok(vec![v])
    } else if rec.state == VersionState::Destroyed {
        Err(ServiceError::Conflict(Conflict::VersionDestroyed))
    } else {
        Err(ServiceError::Conflict(Conflict::VersionNotScheduled))
    }
}
