//! `lodectl daemon info SOCK` and `lodectl daemon metrics SOCK [--id ID]`:
//! ask a lode-fsd for its state and figures through its API socket.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use lode_common::api::DaemonClient;
use serde::Serialize;

use super::{runtime, CtlError};

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub command: DaemonCommand,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Print the daemon's id, version, state and instances as JSON.
    Info {
        /// The daemon's API socket (its --apisock).
        socket: PathBuf,
    },
    /// Print an instance's filesystem, cache, backend and in-flight figures as JSON.
    Metrics {
        /// The daemon's API socket (its --apisock).
        socket: PathBuf,
        /// Instance id (default: the daemon's only instance).
        #[arg(long)]
        id: Option<String>,
    },
}

/// Everything `lodectl daemon metrics` prints, one object.
#[derive(Serialize)]
struct AllMetrics {
    fs: lode_common::api::FsMetrics,
    cache: lode_common::api::CacheMetrics,
    backend: lode_common::api::BackendMetrics,
    inflight: lode_common::api::InflightMetrics,
}

fn print(out: &mut dyn Write, value: &impl Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CtlError::Io {
        what: "encode the answer".into(),
        source: e.into(),
    })?;
    writeln!(out, "{text}").map_err(|source| CtlError::Io {
        what: "write the answer".into(),
        source,
    })
}

pub fn run(args: DaemonArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let rt = runtime()?;
    match args.command {
        DaemonCommand::Info { socket } => {
            let client = DaemonClient::new(socket);
            let info = rt.block_on(client.daemon_info())?;
            print(out, &info)
        }
        DaemonCommand::Metrics { socket, id } => {
            let client = DaemonClient::new(socket);
            let id = id.as_deref();
            let all = rt.block_on(async {
                Ok::<_, lode_common::api::ClientError>(AllMetrics {
                    fs: client.fs_metrics(id).await?,
                    cache: client.cache_metrics(id).await?,
                    backend: client.backend_metrics(id).await?,
                    inflight: client.inflight().await?,
                })
            })?;
            print(out, &all)
        }
    }
}
