//! `lode-fsd`: serves Lode image instances read-only over FUSE.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use lode_common::api::{DaemonMode, InstanceConfig, MountRequest};
use lode_config::FsdConfig;
use lode_fsd::host::{self, HostOptions, RunOptions};
use lode_fsd::read::backend::BlobSource;

/// Serves a Lode image read-only over FUSE, fetching file data lazily.
///
/// Readiness protocol: with --ready-fd N the daemon writes the line "ready"
/// to descriptor N once the mount serves requests, then closes N. If start-up
/// fails, N is closed without that line and the daemon exits non-zero. Read N
/// to end-of-file to learn which. The --pid-file is written before "ready".
///
/// SIGTERM or SIGINT unmounts and exits 0 once the kernel ends the session;
/// a mount still in use is detached lazily and served until its last user
/// lets go, and a second SIGTERM/SIGINT then aborts the FUSE connection.
/// SIGUSR1 logs the metrics as JSON. SIGUSR2, with --supervisor, exits
/// without unmounting: a successor started with --takeover serves the mount
/// on (without a supervisor SIGUSR2 is ignored). The same holds in every
/// mode. Logging goes to stderr, filtered by RUST_LOG (default "info").
#[derive(Parser, Debug)]
#[command(name = "lode-fsd", version, verbatim_doc_comment)]
struct Args {
    /// The image's bootstrap file. Optional with --apisock (then an
    /// instance can be mounted through the API).
    #[arg(long, value_name = "FILE", required_unless_present = "apisock")]
    bootstrap: Option<PathBuf>,

    /// Where data blobs are read: registry://HOST[:PORT]/REPO (HTTP range
    /// requests) or dir:///PATH (files named by digest hex).
    #[arg(long, value_name = "SOURCE", required_unless_present = "apisock")]
    blob_source: Option<BlobSource>,

    /// Serve the control API (docs/api.md) on this unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    apisock: Option<PathBuf>,

    /// dedicated: one instance at the mount root; shared: instances as
    /// subdirectories of the mount (with --apisock).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "dedicated",
        requires = "apisock"
    )]
    mode: DaemonMode,

    /// Use plain HTTP for the registry (overrides registry.plain_http).
    #[arg(long)]
    plain_http: bool,

    /// Chunk cache directory (overrides cache.dir).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Directory to mount the image on.
    #[arg(long, value_name = "DIR")]
    mountpoint: PathBuf,

    /// TOML configuration file (see misc/fsd.sample.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// FUSE worker threads (overrides fuse.threads).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Write the daemon's pid here once the mount is ready; removed at exit.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Write "ready\n" to this inherited descriptor once the mount is ready,
    /// then close it.
    #[arg(long, value_name = "N")]
    ready_fd: Option<RawFd>,

    /// Supervisor socket: the daemon hands it its state and /dev/fuse
    /// descriptor once serving, so that a successor can take the mount over.
    #[arg(long, value_name = "PATH")]
    supervisor: Option<PathBuf>,

    /// Name of this daemon at the supervisor (default: the mountpoint).
    #[arg(long, value_name = "ID")]
    id: Option<String>,

    /// Take over the mount the supervisor holds for --id (after a crash, or
    /// from a daemon that exits on SIGUSR2) instead of mounting.
    #[arg(long, requires = "supervisor")]
    takeover: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Take the descriptor first, so it is closed (failure seen) on every error path.
    let ready = args.ready_fd.map(take_fd).transpose()?;

    let mut config = match &args.config {
        Some(path) => FsdConfig::load(path)?,
        None => FsdConfig::default(),
    };
    if let Some(dir) = args.cache_dir {
        config.cache.dir = Some(dir);
    }
    if args.plain_http {
        config.registry.plain_http = true;
    }
    if let Some(threads) = args.threads {
        config.fuse.threads = threads;
    }
    config.validate()?;

    let id = args
        .id
        .unwrap_or_else(|| args.mountpoint.display().to_string());
    let initial = match (args.bootstrap, args.blob_source) {
        (Some(bootstrap), Some(source)) => Some(MountRequest {
            source: bootstrap,
            config: InstanceConfig {
                blob_source: source.to_string(),
                plain_http: args.plain_http,
                docker_config: None,
                hosts: Vec::new(),
            },
            seq: 1,
            image_ref: None,
            credentials: None,
        }),
        (None, None) => None,
        _ => bail!("--bootstrap and --blob-source go together"),
    };
    if initial.is_some() && args.mode == DaemonMode::Shared {
        bail!(
            "--bootstrap with --mode shared: a shared daemon's instances are mounted \
             through the API, at {}/<id>",
            args.mountpoint.display()
        );
    }
    let api = args.apisock.is_some();
    host::run(RunOptions {
        host: HostOptions {
            id,
            mode: args.mode,
            mountpoint: args.mountpoint,
            config,
            supervisor: args.supervisor,
            takeover: args.takeover,
            api,
        },
        apisock: args.apisock,
        initial,
        pid_file: args.pid_file,
        ready,
    })
    .context("lode-fsd")?;
    Ok(())
}

/// Takes ownership of an inherited descriptor after checking it is open.
fn take_fd(fd: RawFd) -> anyhow::Result<OwnedFd> {
    if fd < 3 {
        bail!("--ready-fd {fd}: must not be stdin, stdout or stderr");
    }
    nix::fcntl::fcntl(
        // SAFETY: only used for this F_GETFD probe, which fails harmlessly
        // with EBADF if `fd` is not open.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .with_context(|| format!("--ready-fd {fd} is not an open descriptor"))?;
    // SAFETY: the descriptor is open (checked above), was handed to us by our
    // parent for this purpose, and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
