//! `lodectl daemon info SOCK`, `lodectl daemon metrics SOCK [--id ID]` and
//! `lodectl daemon record SOCK [--id ID]`: ask a lode-fsd for its state, its
//! figures and what an instance's readers read, through its API socket.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use lode_common::api::DaemonClient;
use serde::Serialize;

use super::{runtime, CtlError};
use crate::convert::prefetch_list;

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
    /// Print what an instance's readers read, as byte ranges of files (whole
    /// chunks) in the order they were first read, one per line: a prefetch
    /// list for `lodectl convert --prefetch-paths`. Run a container of the
    /// image once, cold, then this.
    Record {
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
        DaemonCommand::Record { socket, id } => {
            let client = DaemonClient::new(socket);
            let access = rt.block_on(client.access(id.as_deref()))?;
            let write = |out: &mut dyn Write| -> std::io::Result<()> {
                writeln!(
                    out,
                    "# instance {}: {} files, {} chunks, {} stored bytes read",
                    access.id,
                    access.files.len(),
                    access.chunks,
                    access.chunk_bytes
                )?;
                // A daemon that predates ranges names whole files.
                if access.ranges.is_empty() {
                    for file in &access.files {
                        prefetch_list::write_entry(out, file, None)?;
                    }
                }
                for r in &access.ranges {
                    prefetch_list::write_entry(out, &r.path, Some(&(r.start..r.end)))?;
                }
                Ok(())
            };
            write(out).map_err(|source| CtlError::Io {
                what: "write the list".into(),
                source,
            })
        }
    }
}
