//! The `lodectl` command line. Each subcommand is a module here with its
//! clap arguments and a `run` that calls the library; adding one means a
//! module, a [`Command`] variant, a [`CtlError`] variant for its library
//! error, and a match arm in [`Command::run`].

pub mod convert;
pub mod daemon;
pub mod doctor;
pub mod mount;
pub mod pull;
mod pull_content;
mod pull_layers;

use std::io::Write;

use clap::{Parser, Subcommand};

use crate::convert::ConvertError;
use crate::localmount::MountError;

#[derive(Debug, Parser)]
#[command(
    name = "lodectl",
    version,
    about = "Build and inspect Lode lazy-loading images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert an OCI image into a Lode image; prints the new manifest digest.
    Convert(convert::ConvertArgs),
    /// Serve a Lode image from its registry at a directory (starts lode-fsd).
    Mount(mount::MountArgs),
    /// Stop serving a directory mounted with `lodectl mount`.
    Umount(mount::UmountArgs),
    /// Pull an image into containerd lazily through the lode snapshotter.
    Pull(pull::PullArgs),
    /// Query a lode-fsd through its API socket.
    Daemon(daemon::DaemonArgs),
    /// Check this node's set-up for Lode (containerd's configuration, the
    /// sockets, the kernel) and say what to change.
    Doctor(doctor::DoctorArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    #[error(transparent)]
    Daemon(#[from] lode_common::api::ClientError),
    #[error("{failed} check(s) failed; see the fixes above")]
    Doctor { failed: usize },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Command {
    /// Runs the subcommand; its result (e.g. a digest) goes to `out`.
    pub fn run(self, out: &mut dyn Write) -> Result<(), CtlError> {
        match self {
            Command::Convert(args) => convert::run(args, out),
            Command::Mount(args) => mount::run_mount(args, out),
            Command::Umount(args) => mount::run_umount(args),
            Command::Pull(args) => pull::run(args, out),
            Command::Daemon(args) => daemon::run(args, out),
            Command::Doctor(args) => doctor::run(args, out),
        }
    }
}

/// The async runtime for subcommands that talk to registries or daemons.
pub fn runtime() -> Result<tokio::runtime::Runtime, CtlError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| CtlError::Io {
            what: "start the async runtime".to_owned(),
            source,
        })
}
