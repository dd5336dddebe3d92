//! Dev mode's conveniences, and the private files every mode writes: the admin (or
//! bootstrap) token file, PIN files, custodian kits under the data dir, and the way to an
//! unsealed service at start.
//!
//! Invariant: every file written here is created 0600 (directories 0700), never
//! overwritten.

use std::path::Path;

use zeroize::Zeroizing;

use crate::config::{DevQuorum, ServerConfig};
use crate::secret::BearerToken;
use crate::service::Services;

/// Errors of the server's start-up (reported to the operator, never to callers).
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Principal of the dev admin token.
const DEV_PRINCIPAL: &str = "dev-admin";

/// Dev mode's way to an unsealed (or, with `--custodians`, a sealed and initialised)
/// service:
/// - an explicit `--hsm-pin-file` opens the HSM with that PIN (no dual control);
/// - `--custodians N --threshold K` runs the init ceremony once with the SO PIN from
///   `DIR/hsm-so-pin` and writes each custodian's kit under `DIR/custodians/NAME/`; the
///   service stays sealed until K custodians unseal it;
/// - otherwise a 1-of-1 quorum seals the dev PIN, its share is kept in `DIR/dev-share`,
///   and the service unseals itself with it at every start.
pub(super) async fn dev_unseal(svc: &Services, cfg: &ServerConfig) -> Result<(), BoxError> {
    let dir = &cfg.data_dir;
    let system = svc.ctx.system();
    match &cfg.dev_quorum {
        DevQuorum::PinFile(path) => {
            let pin = read_pin(path)?;
            let pin = Zeroizing::new(pin.as_bytes().to_vec());
            svc.sealing.open_with_pin(pin).await?;
        }
        DevQuorum::Sealed => match svc.sealing.quorum_config(&system).await? {
            Some(_) => eprintln!("sealed: custodians unseal with `arca operator unseal`"),
            None => eprintln!(
                "not initialised: run `arca operator init` with the bootstrap token, then unseal"
            ),
        },
        DevQuorum::Custodians {
            custodians,
            threshold,
        } => {
            if svc.sealing.quorum_config(&system).await?.is_none() {
                let names: Vec<String> = (1..=*custodians)
                    .map(|i| format!("custodian-{i}"))
                    .collect();
                let so_pin = read_pin(&dir.join("hsm-so-pin"))?;
                let kits = svc
                    .ceremony
                    .init_with(
                        &system,
                        u32::from(*threshold),
                        &names,
                        so_pin,
                        &Default::default(),
                        1,
                    )
                    .await?;
                // The user PIN changed and nobody knows it now.
                let _ = std::fs::remove_file(dir.join("hsm-pin"));
                for kit in kits {
                    let kdir = dir.join("custodians").join(&kit.name);
                    make_private_dir(&kdir)?;
                    write_private(&kdir.join("share"), kit.share.as_bytes())?;
                    write_private(&kdir.join("token"), kit.token.expose().as_bytes())?;
                    write_private(&kdir.join("totp-uri"), kit.totp_uri.as_bytes())?;
                }
                eprintln!(
                    "dual control initialised: {threshold} of {custodians} custodians; kits in {}",
                    dir.join("custodians").display()
                );
            }
            eprintln!("sealed: unseal with `arca operator unseal` as {threshold} custodians");
        }
        DevQuorum::OneOfOne => {
            let share_path = dir.join("dev-share");
            let cfg_q = match svc.sealing.quorum_config(&system).await? {
                Some(q) => q,
                None => {
                    let pin = read_pin(&cfg.hsm.pin_file)?;
                    let kit = svc.ceremony.dev_init(&system, pin.as_bytes()).await?;
                    write_private(&share_path, kit.share.as_bytes())?;
                    svc.sealing
                        .quorum_config(&system)
                        .await?
                        .ok_or("dual control did not initialise")?
                }
            };
            match std::fs::read_to_string(&share_path) {
                Ok(text) => {
                    let text = Zeroizing::new(text);
                    let share = crate::quorum::shamir::decode(&text)?;
                    svc.sealing.unseal_with_shares(&cfg_q, &[share]).await?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("sealed: this data dir has no dev-share; unseal with `arca operator unseal`");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Dev mode: reads the dev admin token from `path` (registering it if the database does
/// not know it), or mints one and writes it there (0600).
///
/// Outside dev mode: when `path` is missing, mints the bootstrap admin token for the init
/// ceremony, once in the life of the database, valid 24 hours, and writes it there. A
/// token file that exists is never registered (whoever can write the data dir must not
/// be able to choose an admin token); a bootstrap token issued before is never minted
/// again.
pub(super) async fn ensure_dev_token(
    svc: &Services,
    path: &Path,
    dev: bool,
) -> Result<(), BoxError> {
    let system = svc.ctx.system();
    let tokens = &svc.tokens;
    match std::fs::read_to_string(path) {
        Ok(text) if dev => {
            let token = BearerToken::new(text.trim().to_string());
            tokens
                .ensure(&system, &token, DEV_PRINCIPAL, &["admin"])
                .await?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dev {
                let token = tokens.issue(&system, DEV_PRINCIPAL, &["admin"]).await?;
                write_private(path, token.expose().as_bytes())?;
            } else {
                match tokens
                    .issue_bootstrap(&system, DEV_PRINCIPAL, &["admin"])
                    .await
                {
                    Ok((_, token)) => write_private(path, token.expose().as_bytes())?,
                    Err(crate::service::ServiceError::FailedPrecondition(why)) => {
                        eprintln!("no bootstrap token: {why}")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Makes `dir` (and its parents) with mode 0700.
pub(super) fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` with mode 0600 (failing if it exists) and writes `bytes`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Creates `path` empty with mode 0600 if it does not exist, so SQLite (which gives its
/// -wal and -shm files the database file's mode) keeps every file private.
pub(super) fn precreate_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_pin(path: &Path) -> Result<Zeroizing<String>, BoxError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the PIN file {}: {e}", path.display()))?,
    );
    let pin = Zeroizing::new(text.trim().to_string());
    if pin.is_empty() {
        return Err(format!("the PIN file {} is empty", path.display()).into());
    }
    Ok(pin)
}

/// Reads a PIN file, or makes one with a fresh random PIN (dev mode only).
pub(super) fn read_or_make_pin(path: &Path) -> Result<Zeroizing<String>, BoxError> {
    if !path.exists() {
        let raw = crate::secret::random::<16>()?;
        let pin = Zeroizing::new(hex::encode(raw.as_ref()));
        write_private(path, pin.as_bytes())?;
    }
    read_pin(path)
}
