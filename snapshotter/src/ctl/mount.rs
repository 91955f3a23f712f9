//! `lodectl mount IMAGE MOUNTPOINT` and `lodectl umount MOUNTPOINT`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use lode_common::registry::{Reference, RegistryOptions};

use super::{runtime, CtlError};
use crate::localmount::{self, MountRequest};

/// Default directory of mount records.
pub const DEFAULT_STATE_DIR: &str = "/run/lode";
/// Default chunk and bootstrap cache.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/lode/cache";

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The Lode image: HOST[:PORT]/REPO[:TAG|@DIGEST].
    pub image: Reference,
    /// Existing directory to mount the image on.
    pub mountpoint: PathBuf,
    /// Use plain HTTP for the registry (loopback registries always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Cache of chunks and bootstraps, shared by all mounts.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    pub cache_dir: PathBuf,
    /// Where mount records (daemon pid, log) are kept.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// lode-fsd configuration file passed to the daemon.
    #[arg(long)]
    pub fsd_config: Option<PathBuf>,
    /// The lode-fsd binary (default: next to lodectl, else from PATH).
    #[arg(long)]
    pub fsd_binary: Option<PathBuf>,
    /// Docker config with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// Seconds to wait for the daemon to serve the mount.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// A directory mounted with `lodectl mount`.
    pub mountpoint: PathBuf,
    /// Where mount records are kept (as given to `lodectl mount`).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Seconds to wait for the daemon to unmount and exit.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// `lode-fsd` next to the running executable, else the bare name for a PATH lookup.
fn default_fsd_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("lode-fsd")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("lode-fsd"))
}

pub fn run_mount(args: MountArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let request = MountRequest {
        image: args.image,
        mountpoint: args.mountpoint,
        cache_dir: args.cache_dir,
        state_dir: args.state_dir,
        registry: RegistryOptions {
            plain_http: args.plain_http,
            docker_config: args.docker_config,
            ..RegistryOptions::default()
        },
        fsd_binary: args.fsd_binary.unwrap_or_else(default_fsd_binary),
        fsd_config: args.fsd_config,
        ready_timeout: Duration::from_secs(args.timeout),
    };
    let record = runtime()?.block_on(localmount::mount(&request))?;
    writeln!(
        out,
        "mounted {} at {} (lode-fsd pid {}, log {})",
        record.image,
        record.mountpoint.display(),
        record.pid,
        record.log.display()
    )
    .map_err(|source| CtlError::Io {
        what: "write to stdout".to_owned(),
        source,
    })
}

pub fn run_umount(args: UmountArgs) -> Result<(), CtlError> {
    localmount::umount(
        &args.state_dir,
        &args.mountpoint,
        Duration::from_secs(args.timeout),
    )?;
    Ok(())
}
