//! Crash points for the kill -9 tests: in debug builds, a process started with
//! `ARCA_FAULT_ABORT_AT=<point>` aborts (as abruptly as `kill -9`) when it reaches that
//! point. Release builds compile every point to nothing.
//!
//! Points: `after-hsm-destroy` (the destroyer has called `C_DestroyObject` and not yet
//! marked the version DESTROYED).

/// Aborts the process here if the environment names this point (debug builds only).
#[inline]
pub fn point(name: &'static str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("ARCA_FAULT_ABORT_AT").is_some_and(|v| v == name) {
        eprintln!("fault injection: aborting at {name}");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
