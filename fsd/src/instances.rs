//! The managed daemon: the instance list and daemon state behind the API
//! ([`Host`], which implements [`DaemonControl`]), and [`run_managed`], the
//! main loop of `lode-fsd --apisock`.
//!
//! In dedicated mode the daemon serves one instance at the mount root; its
//! unmount (API or external) ends the daemon. In shared mode the daemon
//! mounts a pseudo root at start and instances come and go as its
//! subdirectories ([`crate::shared_host`]).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lode_common::api::{
    BuildVersion, DaemonInfo, DaemonMode, DaemonSnapshot, InflightMetrics, InstanceInfo,
    MountRequest, SavedInstance,
};
use lode_config::FsdConfig;
use tracing::info;

use crate::api::{ApiRequest, ApiResponse, ControlError, DaemonControl};
use crate::backend::BlobSource;
use crate::daemon::{Daemon, DaemonError, DaemonOptions, Event};
use crate::shared_host::SharedMount;
use crate::state::{DaemonState, StateEvent, StateMachine};

mod handover;
mod metrics_view;

use metrics_view::{backend_metrics, cache_metrics, fs_metrics};

/// Hand-over to a supervisor; provided by the takeover module when the
/// daemon has a supervisor socket.
pub trait Supervision: Send + Sync {
    /// Gives the supervisor the daemon's state (and its FUSE descriptor).
    fn send_fd(&self, snapshot: &DaemonSnapshot) -> Result<(), String>;
    /// Takes the connection and state a predecessor left with the supervisor.
    fn takeover(&self) -> Result<(), String>;
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
}

/// What the main loop of [`run_managed`] reacts to.
#[derive(Debug)]
pub enum HostEvent {
    Daemon(Event),
    /// `PUT /daemon/exit`: leave without unmounting.
    Exit,
}

struct Mounted {
    daemon: Daemon,
    saved: SavedInstance,
}

/// The daemon's state and instances, as the API sees them.
pub struct Host {
    options: HostOptions,
    state: StateMachine,
    instance: Mutex<Option<Mounted>>,
    shared: std::sync::OnceLock<SharedMount>,
    events: mpsc::Sender<HostEvent>,
    supervision: Option<Arc<dyn Supervision>>,
    /// Serialises takeover requests.
    takeover_lock: Mutex<()>,
}

fn build_version() -> BuildVersion {
    BuildVersion {
        package: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: env!("LODE_GIT_COMMIT").to_owned(),
        build_time: env!("LODE_BUILD_TIME").to_owned(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Instance sequence numbers must fit the inode layout of shared mode.
pub const MAX_SEQ: u32 = 1 << 23;

fn illegal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Conflict(e.to_string())
}

/// A refused state transition during start-up.
fn state_error(e: crate::state::IllegalTransition) -> DaemonError {
    DaemonError::Io {
        what: "daemon state".into(),
        source: std::io::Error::other(e),
    }
}

fn daemon_error(e: DaemonError) -> ControlError {
    match e {
        DaemonError::Bootstrap { .. } | DaemonError::Config(_) => {
            ControlError::InvalidArgument(e.to_string())
        }
        other => ControlError::Internal(other.to_string()),
    }
}

impl Host {
    pub fn new(
        options: HostOptions,
        events: mpsc::Sender<HostEvent>,
        supervision: Option<Arc<dyn Supervision>>,
    ) -> Self {
        Self {
            options,
            state: StateMachine::new(),
            instance: Mutex::new(None),
            shared: std::sync::OnceLock::new(),
            events,
            supervision,
            takeover_lock: Mutex::new(()),
        }
    }

    pub fn state(&self) -> &StateMachine {
        &self.state
    }

    fn instance(&self) -> std::sync::MutexGuard<'_, Option<Mounted>> {
        self.instance.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> DaemonSnapshot {
        DaemonSnapshot {
            id: self.options.id.clone(),
            mode: self.options.mode,
            mountpoint: self.options.mountpoint.clone(),
            state: self.state.get(),
            instances: self.saved(),
        }
    }

    fn info(&self) -> DaemonInfo {
        DaemonInfo {
            id: self.options.id.clone(),
            version: build_version(),
            pid: std::process::id(),
            mode: self.options.mode,
            state: self.state.get(),
            supervisor: self.options.supervisor.clone(),
            instances: self.saved().into_iter().map(|s| s.info).collect(),
        }
    }

    fn saved(&self) -> Vec<SavedInstance> {
        match self.shared.get() {
            Some(shared) => shared.saved(),
            None => self.instance().iter().map(|m| m.saved.clone()).collect(),
        }
    }

    /// The instance id a shared-mode mountpoint `<mnt>/<id>` names.
    fn shared_id(&self, mountpoint: &Path) -> Result<String, ControlError> {
        let id = mountpoint
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| mountpoint.parent() == Some(self.options.mountpoint.as_path()));
        match id {
            Some(id) if !id.is_empty() && id != "." && id != ".." => Ok(id.to_owned()),
            _ => Err(ControlError::InvalidArgument(format!(
                "mountpoint {}: a shared daemon's instances are {}/<id>",
                mountpoint.display(),
                self.options.mountpoint.display()
            ))),
        }
    }

    /// A sender for a daemon's events, relayed by a thread into the host's
    /// own event channel as [`HostEvent::Daemon`].
    fn forward_daemon_events(&self) -> std::io::Result<mpsc::Sender<Event>> {
        let (daemon_events, received) = mpsc::channel();
        let forward = self.events.clone();
        std::thread::Builder::new()
            .name("lode-events".into())
            .spawn(move || {
                while let Ok(event) = received.recv() {
                    if forward.send(HostEvent::Daemon(event)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(daemon_events)
    }

    /// [`Host::forward_daemon_events`] for start-up paths.
    fn daemon_event_sender(&self) -> Result<mpsc::Sender<Event>, DaemonError> {
        self.forward_daemon_events()
            .map_err(|source| DaemonError::Io {
                what: "spawn event thread".into(),
                source,
            })
    }

    /// Unmounts everything the daemon serves; the session end follows.
    pub fn unmount_all(&self) -> Result<(), DaemonError> {
        if let Some(shared) = self.shared.get() {
            return shared.unmount();
        }
        match self.instance().as_ref() {
            Some(m) => m.daemon.unmount(),
            None => Ok(()),
        }
    }

    /// Whether a FUSE mount is being served.
    pub fn serving(&self) -> bool {
        self.shared.get().is_some() || self.instance().is_some()
    }

    /// After the session ended: stops every instance.
    pub fn finish(&self) -> Result<(), DaemonError> {
        if let Some(shared) = self.shared.get() {
            return shared.wait();
        }
        match self.take_daemon() {
            Some(daemon) => daemon.wait(),
            None => Ok(()),
        }
    }

    fn mount_shared(&self, mountpoint: &Path, request: MountRequest) -> Result<(), ControlError> {
        let id = self.shared_id(mountpoint)?;
        let state = self.state.get();
        let shared = match (state, self.shared.get()) {
            (DaemonState::Running, Some(shared)) => shared,
            (DaemonState::Init | DaemonState::Ready, _) => {
                return Err(ControlError::NotReady(format!("daemon is {state}")))
            }
            _ => return Err(ControlError::Conflict(format!("daemon is {state}"))),
        };
        let (blob_source, config) = self.instance_setup(&request)?;
        shared.add(&id, request, &blob_source, &config, now_secs())
    }

    /// The blob source and configuration a mount request asks for.
    fn instance_setup(
        &self,
        request: &MountRequest,
    ) -> Result<(BlobSource, FsdConfig), ControlError> {
        let blob_source: BlobSource = request
            .config
            .blob_source
            .parse()
            .map_err(|e| ControlError::InvalidArgument(format!("{e}")))?;
        Ok((blob_source, self.instance_config(request)))
    }

    fn instance_config(&self, request: &MountRequest) -> FsdConfig {
        let mut config = self.options.config.clone();
        config.registry.plain_http |= request.config.plain_http;
        if let Some(path) = &request.config.docker_config {
            config.registry.docker_config = Some(path.clone());
        }
        config
    }

    fn check_mountpoint(&self, mountpoint: &Path) -> Result<(), ControlError> {
        if self.options.mode == DaemonMode::Shared {
            return self.shared_id(mountpoint).map(|_| ());
        }
        if mountpoint != self.options.mountpoint {
            return Err(ControlError::InvalidArgument(format!(
                "mountpoint {}: a dedicated daemon serves only {}",
                mountpoint.display(),
                self.options.mountpoint.display()
            )));
        }
        Ok(())
    }

    /// Mounts the dedicated instance and starts serving it.
    pub fn mount(&self, mountpoint: &Path, request: MountRequest) -> Result<(), ControlError> {
        if self.options.mode == DaemonMode::Shared {
            return self.mount_shared(mountpoint, request);
        }
        self.check_mountpoint(mountpoint)?;
        if request.seq >= MAX_SEQ {
            return Err(ControlError::InvalidArgument(format!(
                "seq {} is not below {MAX_SEQ}",
                request.seq
            )));
        }
        let blob_source: BlobSource = request
            .config
            .blob_source
            .parse()
            .map_err(|e| ControlError::InvalidArgument(format!("{e}")))?;
        let mut slot = self.instance();
        if slot.is_some() {
            return Err(ControlError::Conflict(format!(
                "{} is already mounted",
                mountpoint.display()
            )));
        }
        let state = self.state.get();
        if state != DaemonState::Init {
            return Err(ControlError::Conflict(format!(
                "daemon is {state}; a dedicated daemon mounts only from INIT"
            )));
        }
        let config = self.instance_config(&request);
        let daemon_events = self
            .forward_daemon_events()
            .map_err(|e| ControlError::Internal(format!("spawn event thread: {e}")))?;
        let failover = self.failover(false);
        let daemon = Daemon::start_with(
            DaemonOptions {
                bootstrap: request.source.clone(),
                blob_source,
                mountpoint: mountpoint.to_path_buf(),
                config,
                seq: request.seq,
                image_ref: request.image_ref.clone(),
            },
            daemon_events,
            &failover,
        )
        .map_err(daemon_error)?;
        self.state.apply(StateEvent::FuseReady).map_err(illegal)?;
        // Without a supervisor nobody else would say "start".
        if !self.supervised() {
            self.state.apply(StateEvent::Start).map_err(illegal)?;
        }
        let info = InstanceInfo {
            id: self.options.id.clone(),
            seq: request.seq,
            mountpoint: mountpoint.to_path_buf(),
            bootstrap: request.source.clone(),
            image_ref: request.image_ref.clone(),
            mounted_at: now_secs(),
        };
        info!(daemon_id = %self.options.id, mountpoint = %mountpoint.display(), "instance mounted");
        *slot = Some(Mounted {
            daemon,
            saved: SavedInstance { info, request },
        });
        Ok(())
    }

    /// Removes the instance (its session has ended, or the daemon stops).
    pub fn take_daemon(&self) -> Option<Daemon> {
        self.instance().take().map(|m| m.daemon)
    }

    /// Metrics of the mounted instance, if any, as one line of JSON.
    pub fn metrics_json(&self) -> Option<String> {
        self.instance()
            .as_ref()
            .map(|m| m.daemon.metrics().to_json())
    }

    pub fn umount(&self, mountpoint: &Path) -> Result<(), ControlError> {
        if self.options.mode == DaemonMode::Shared {
            let id = self.shared_id(mountpoint)?;
            return match self.shared.get() {
                Some(shared) => shared.remove(&id),
                None => Err(ControlError::NotFound(format!("no instance {id}"))),
            };
        }
        self.check_mountpoint(mountpoint)?;
        let slot = self.instance();
        let mounted = slot.as_ref().ok_or_else(|| {
            ControlError::NotFound(format!("nothing mounted at {}", mountpoint.display()))
        })?;
        // The session then ends and the main loop stops the daemon.
        mounted
            .daemon
            .unmount()
            .map_err(|e| ControlError::Internal(e.to_string()))
    }
}

impl DaemonControl for Host {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ControlError> {
        match request {
            ApiRequest::GetDaemon => Ok(ApiResponse::Daemon(Box::new(self.info()))),
            ApiRequest::Mount {
                mountpoint,
                request,
            } => self
                .mount(&mountpoint, request)
                .map(|()| ApiResponse::Empty),
            ApiRequest::Umount { mountpoint } => {
                self.umount(&mountpoint).map(|()| ApiResponse::Empty)
            }
            ApiRequest::Remount {
                mountpoint,
                request,
            } if self.options.mode == DaemonMode::Shared => {
                let id = self.shared_id(&mountpoint)?;
                let shared = self
                    .shared
                    .get()
                    .ok_or_else(|| ControlError::NotFound(format!("no instance {id}")))?;
                let blob_source: BlobSource = request
                    .config
                    .blob_source
                    .parse()
                    .map_err(|e| ControlError::InvalidArgument(format!("{e}")))?;
                let config = self.instance_config(&request);
                shared
                    .remount(&id, request, &blob_source, &config)
                    .map(|()| ApiResponse::Empty)
            }
            ApiRequest::Remount { mountpoint, .. } => {
                self.check_mountpoint(&mountpoint)?;
                Err(ControlError::NotSupported(
                    "remount of a dedicated daemon's instance is not supported; use a shared daemon"
                        .into(),
                ))
            }
            ApiRequest::FsMetrics { id } => self
                .with_metrics(id.as_deref(), fs_metrics)
                .map(ApiResponse::FsMetrics),
            ApiRequest::CacheMetrics { id } => self
                .with_metrics(id.as_deref(), cache_metrics)
                .map(ApiResponse::CacheMetrics),
            ApiRequest::BackendMetrics { id } => self
                .with_metrics(id.as_deref(), backend_metrics)
                .map(ApiResponse::BackendMetrics),
            ApiRequest::Inflight if self.shared.get().is_some() => {
                let ops = self
                    .shared
                    .get()
                    .map(|s| s.table().inflight.snapshot())
                    .unwrap_or_default();
                Ok(ApiResponse::Inflight(InflightMetrics { ops }))
            }
            ApiRequest::Inflight => {
                let ops = self
                    .instance()
                    .as_ref()
                    .map(|m| m.daemon.metrics().inflight_ops.snapshot())
                    .unwrap_or_default();
                Ok(ApiResponse::Inflight(InflightMetrics { ops }))
            }
            ApiRequest::Start => {
                self.state.apply(StateEvent::Start).map_err(illegal)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Exit => {
                self.state.apply(StateEvent::Stop).map_err(illegal)?;
                let _ = self.events.send(HostEvent::Exit);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::SendFd => {
                let state = self.state.get();
                if !matches!(state, DaemonState::Ready | DaemonState::Running) {
                    return Err(ControlError::Conflict(format!(
                        "daemon is {state}: no FUSE connection to send"
                    )));
                }
                if self.options.supervisor.is_some() {
                    self.report_to_supervisor()?;
                    return Ok(ApiResponse::Empty);
                }
                let snapshot = self.snapshot();
                self.supervision("sendfd")?
                    .send_fd(&snapshot)
                    .map_err(ControlError::Internal)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Takeover => self.take_over_on_request().map(|()| ApiResponse::Empty),
        }
    }
}

#[cfg(test)]
#[path = "instances_tests.rs"]
mod tests;
