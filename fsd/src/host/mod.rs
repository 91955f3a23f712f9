//! The one host of every mode: it owns the instances, the FUSE connection,
//! the network runtime and the buffer pools, and the daemon's state.
//!
//! - standalone (`--bootstrap` without `--apisock`): a dedicated host with
//!   one instance from the command line and no API;
//! - dedicated (`--apisock --mode dedicated`): one instance at the mount
//!   root, mounted when the instance is; its unmount ends the daemon;
//! - shared (`--apisock --mode shared`): the mount exists from the start,
//!   instances come and go as its subdirectories.
//!
//! [`serve`] opens or resumes the connection, [`takeover`] rebuilds a
//! predecessor's instances, [`run`] is the main loop with its one signal
//! policy, [`control`] answers the API.

mod control;
mod metrics_view;
mod run;
mod serve;
pub mod state;
mod takeover;

pub use run::{run, RunOptions};

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use lode_common::api::{AheadRequest, DaemonMode, MountRequest};
use lode_config::FsdConfig;
use nix::sys::signal::Signal;
use tracing::info;

use crate::api::ControlError;
use crate::fs::table::{Table, TableError};
use crate::instance::{Instance, InstanceError, Resources, STOP_GRACE};
use crate::mount::MountError;
use crate::read::ahead::Ahead;
use crate::read::pools::Pools;
use crate::read::workers::usable_nice;
use crate::takeover::TakeoverError;
use serve::Connection;
use state::{DaemonState, IllegalTransition, StateMachine};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid configuration: {0}")]
    Config(#[from] lode_config::ConfigError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    #[error(transparent)]
    State(#[from] IllegalTransition),
    #[error("saved state of instance {id}: {reason}")]
    SavedState { id: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostError {
    let what = what.into();
    move |source| HostError::Io { what, source }
}

/// The API's answer to a failed host operation: the one place where host
/// errors become API statuses.
impl From<HostError> for ControlError {
    fn from(e: HostError) -> Self {
        match &e {
            HostError::Instance(i) if i.is_invalid_request() => {
                ControlError::InvalidArgument(e.to_string())
            }
            HostError::Table(TableError::Seq(_)) | HostError::Config(_) => {
                ControlError::InvalidArgument(e.to_string())
            }
            HostError::Table(_) | HostError::State(_) => ControlError::Conflict(e.to_string()),
            _ => ControlError::Internal(e.to_string()),
        }
    }
}

/// Who the daemon is and how it serves.
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub id: String,
    pub mode: DaemonMode,
    /// The FUSE mount.
    pub mountpoint: PathBuf,
    /// Defaults for every instance; a mount request overrides its subset.
    pub config: FsdConfig,
    pub supervisor: Option<PathBuf>,
    /// Resume the connection the supervisor holds for `id` instead of
    /// mounting (`--takeover`).
    pub takeover: bool,
    /// Whether the daemon serves the control API (managed).
    pub api: bool,
}

impl HostOptions {
    /// Whether a supervisor says when to start serving (`PUT /daemon/start`);
    /// otherwise the daemon starts as soon as it can.
    fn waits_for_start(&self) -> bool {
        self.api && self.supervisor.is_some()
    }
}

/// What the main loop reacts to.
#[derive(Debug)]
pub enum HostEvent {
    Signal(Signal),
    /// The FUSE session ended (unmounted, or the connection was aborted).
    SessionEnded,
    /// `PUT /daemon/exit`: leave without unmounting.
    Exit,
}

/// The daemon's instances, connection and state.
pub struct Host {
    options: HostOptions,
    state: StateMachine,
    table: Arc<Table>,
    /// Runs registry requests and the API.
    runtime: tokio::runtime::Handle,
    pools: Pools,
    ahead: Arc<Ahead>,
    /// How much nicer background work runs; see [`usable_nice`].
    background_nice: i32,
    connection: Mutex<Option<Connection>>,
    events: mpsc::Sender<HostEvent>,
    /// Serialises changes of the instances and the connection.
    changes: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Host {
    pub fn new(
        options: HostOptions,
        runtime: tokio::runtime::Handle,
        events: mpsc::Sender<HostEvent>,
    ) -> Result<Self, HostError> {
        options.config.validate()?;
        let fetch = &options.config.fetch;
        let background_nice = usable_nice(fetch.background_nice);
        let ahead = Arc::new(Ahead::new(fetch.ahead_bytes, background_nice));
        Ok(Self {
            table: Arc::new(Table::new(options.mode)),
            options,
            state: StateMachine::new(),
            runtime,
            pools: Pools::default(),
            ahead,
            background_nice,
            connection: Mutex::new(None),
            events,
            changes: Mutex::new(()),
        })
    }

    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    fn resources(&self) -> Resources<'_> {
        Resources {
            config: &self.options.config,
            runtime: &self.runtime,
            pools: &self.pools,
            ahead: &self.ahead,
            background_nice: self.background_nice,
        }
    }

    /// The instance id a mountpoint names: `<mnt>/<id>` in shared mode, the
    /// mount itself (named by the daemon's id) in dedicated mode.
    fn instance_id(&self, mountpoint: &Path) -> Result<String, ControlError> {
        let root = &self.options.mountpoint;
        match self.options.mode {
            DaemonMode::Dedicated if mountpoint == root => Ok(self.options.id.clone()),
            DaemonMode::Dedicated => Err(ControlError::InvalidArgument(format!(
                "mountpoint {}: a dedicated daemon serves only {}",
                mountpoint.display(),
                root.display()
            ))),
            DaemonMode::Shared => {
                let id = mountpoint
                    .file_name()
                    .and_then(|n| n.to_str())
                    .filter(|_| mountpoint.parent() == Some(root.as_path()));
                match id {
                    Some(id) if !id.is_empty() && id != "." && id != ".." => Ok(id.to_owned()),
                    _ => Err(ControlError::InvalidArgument(format!(
                        "mountpoint {}: a shared daemon's instances are {}/<id>",
                        mountpoint.display(),
                        root.display()
                    ))),
                }
            }
        }
    }

    /// Builds `request`'s instance and makes it visible at `mountpoint`; in
    /// dedicated mode this mounts the filesystem.
    pub fn mount(&self, mountpoint: &Path, request: MountRequest) -> Result<(), ControlError> {
        let _changes = lock(&self.changes);
        let id = self.instance_id(mountpoint)?;
        let state = self.state.get();
        match (self.options.mode, state) {
            (DaemonMode::Shared, DaemonState::Running)
            | (DaemonMode::Dedicated, DaemonState::Init) => {}
            (DaemonMode::Shared, DaemonState::Init | DaemonState::Ready) => {
                return Err(ControlError::NotReady(format!("daemon is {state}")))
            }
            (DaemonMode::Dedicated, _) => {
                return Err(ControlError::Conflict(format!(
                    "daemon is {state}; a dedicated daemon mounts its instance only from INIT"
                )))
            }
            (DaemonMode::Shared, _) => {
                return Err(ControlError::Conflict(format!("daemon is {state}")))
            }
        }
        self.table
            .check_free(&id, request.seq)
            .map_err(HostError::from)?;
        let instance = Arc::new(
            Instance::build(&id, mountpoint, request, &self.resources())
                .map_err(HostError::from)?,
        );
        self.table
            .insert(Arc::clone(&instance))
            .map_err(HostError::from)?;
        if self.options.mode == DaemonMode::Dedicated {
            if let Err(e) = self.open(None, instance.root_mode) {
                self.table.remove(&id);
                instance.stop(STOP_GRACE);
                return Err(e.into());
            }
        }
        info!(instance = %id, seq = instance.seq, mountpoint = %mountpoint.display(), "instance mounted");
        self.reported();
        Ok(())
    }

    /// Replaces the blob source (and credentials) of the instance at
    /// `mountpoint`; its image, inodes and cache stay.
    pub fn remount(&self, mountpoint: &Path, request: MountRequest) -> Result<(), ControlError> {
        let _changes = lock(&self.changes);
        let id = self.instance_id(mountpoint)?;
        let instance = self
            .table
            .get(&id)
            .ok_or_else(|| ControlError::NotFound(format!("no instance {id}")))?;
        instance
            .remount(request, &self.resources())
            .map_err(HostError::from)?;
        self.reported();
        Ok(())
    }

    /// Removes the instance at `mountpoint`. In shared mode its inodes
    /// answer ESTALE from now on and the kernel forgets its entry, so the
    /// same id can be mounted again at once; in dedicated mode the
    /// filesystem is unmounted and the daemon ends with the session.
    pub fn umount(&self, mountpoint: &Path) -> Result<(), ControlError> {
        let _changes = lock(&self.changes);
        let id = self.instance_id(mountpoint)?;
        let missing =
            || ControlError::NotFound(format!("nothing mounted at {}", mountpoint.display()));
        match self.options.mode {
            DaemonMode::Dedicated => {
                self.table.get(&id).ok_or_else(missing)?;
                crate::mount::unmount(&self.options.mountpoint).map_err(HostError::from)?;
            }
            DaemonMode::Shared => {
                let instance = self.table.remove(&id).ok_or_else(missing)?;
                self.forget_entry(&id);
                instance.stop(STOP_GRACE);
                info!(instance = %id, "instance removed");
                self.reported();
            }
        }
        Ok(())
    }

    /// `PUT /ahead`: starts fetching the blob fronts of an image about to
    /// be mounted.
    pub fn ahead(&self, request: &AheadRequest) -> Result<(), ControlError> {
        if let Some(bad) = request.blobs.iter().find(|b| b.bytes > b.size) {
            return Err(ControlError::InvalidArgument(format!(
                "blob {}: a front of {} bytes is larger than the blob's {}",
                bad.digest, bad.bytes, bad.size
            )));
        }
        self.resources()
            .fetch_ahead(request)
            .map_err(|e| HostError::from(e).into())
    }

    /// Logs every instance's metrics as JSON.
    pub fn log_metrics(&self, message: &str) {
        for instance in self.table.all() {
            info!(instance = %instance.id, metrics = %instance.metrics.to_json(), "{message}");
        }
    }
}

#[cfg(test)]
mod mount_tests;
#[cfg(test)]
mod tests;
