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
    BackendMetrics, BuildVersion, CacheMetrics, DaemonInfo, DaemonMode, DaemonSnapshot, FopCount,
    FsMetrics, InflightMetrics, InstanceInfo, MountRequest, SavedInstance,
};
use lode_config::FsdConfig;
use tracing::info;

use crate::api::{ApiRequest, ApiResponse, ControlError, DaemonControl};
use crate::backend::BlobSource;
use crate::daemon::{Daemon, DaemonError, DaemonOptions, Event};
use crate::metrics::{Fop, Metrics};
use crate::shared_host::SharedMount;
use crate::state::{DaemonState, StateEvent, StateMachine};
use crate::takeover::{self, Failover};

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

    fn failover(&self) -> Failover {
        Failover {
            supervisor: self.options.supervisor.clone(),
            id: self.options.id.clone(),
            takeover: self.options.takeover,
        }
    }

    /// Whether something besides the daemon says when to start serving.
    fn supervised(&self) -> bool {
        self.options.supervisor.is_some() || self.supervision.is_some()
    }

    /// Mounts the shared pseudo root and starts serving it (shared mode).
    /// With `--takeover`, rebuilds the predecessor's instances in sequence
    /// order first and then resumes its connection.
    pub fn start_shared(&self) -> Result<(), DaemonError> {
        let daemon_events = self
            .forward_daemon_events()
            .map_err(|source| DaemonError::Io {
                what: "spawn event thread".into(),
                source,
            })?;
        let failover = self.failover();
        let shared = SharedMount::new(&self.options.mountpoint, &self.options.config)?;
        let predecessor = if failover.takeover {
            Some(takeover::fetch(&failover, &self.options.mountpoint)?)
        } else {
            None
        };
        if let Some(predecessor) = &predecessor {
            let mut instances = predecessor.state.instances.clone();
            instances.sort_by_key(|i| i.seq);
            for instance in instances {
                self.restore_shared(&shared, &instance)
                    .map_err(|e| DaemonError::Io {
                        what: format!("rebuild instance {}", instance.id),
                        source: std::io::Error::other(e.to_string()),
                    })?;
            }
        }
        shared.serve(&self.options.config, daemon_events, &failover, predecessor)?;
        let shared = self.shared.get_or_init(|| shared);
        let state_err = |e: crate::state::IllegalTransition| DaemonError::Io {
            what: "daemon state".into(),
            source: std::io::Error::other(e),
        };
        self.state.apply(StateEvent::FuseReady).map_err(state_err)?;
        if !self.supervised() {
            self.state.apply(StateEvent::Start).map_err(state_err)?;
        }
        shared.report()?;
        Ok(())
    }

    /// Dedicated mode with `--takeover`: serves the instance the supervisor
    /// holds for this daemon's id on its kept connection, without mounting.
    pub fn take_over_dedicated(&self) -> Result<(), DaemonError> {
        let failover = self.failover();
        // The supervisor keeps its copies until this daemon reports, so the
        // daemon below can fetch the connection again.
        let predecessor = takeover::fetch(&failover, &self.options.mountpoint)?;
        let Some(instance) = predecessor.state.instances.first().cloned() else {
            return Err(DaemonError::Io {
                what: "take over".into(),
                source: std::io::Error::other("the predecessor served no instance"),
            });
        };
        drop(predecessor);
        let invalid = |what: String| DaemonError::Io {
            what,
            source: std::io::Error::other("unusable saved state"),
        };
        let config: FsdConfig = serde_json::from_str(&instance.config)
            .map_err(|e| invalid(format!("saved configuration: {e}")))?;
        let blob_source: BlobSource = instance
            .blob_source
            .parse()
            .map_err(|e| invalid(format!("saved blob source: {e}")))?;
        let daemon_events = self
            .forward_daemon_events()
            .map_err(|source| DaemonError::Io {
                what: "spawn event thread".into(),
                source,
            })?;
        let request = MountRequest {
            source: PathBuf::from(&instance.bootstrap),
            config: lode_common::api::InstanceConfig {
                blob_source: instance.blob_source.clone(),
                plain_http: config.registry.plain_http,
                docker_config: config.registry.docker_config.clone(),
            },
            seq: u32::try_from(instance.seq).unwrap_or(0),
            image_ref: instance.image_ref.clone(),
        };
        let daemon = Daemon::start_with(
            DaemonOptions {
                bootstrap: request.source.clone(),
                blob_source,
                mountpoint: self.options.mountpoint.clone(),
                config,
            },
            daemon_events,
            &failover,
        )?;
        let info = InstanceInfo {
            id: self.options.id.clone(),
            seq: request.seq,
            mountpoint: self.options.mountpoint.clone(),
            bootstrap: request.source.clone(),
            image_ref: request.image_ref.clone(),
            mounted_at: now_secs(),
        };
        *self.instance() = Some(Mounted {
            daemon,
            saved: SavedInstance { info, request },
        });
        self.state
            .apply(StateEvent::FuseReady)
            .map_err(|e| DaemonError::Io {
                what: "daemon state".into(),
                source: std::io::Error::other(e),
            })?;
        info!(daemon_id = %self.options.id, "took over the dedicated instance");
        Ok(())
    }

    /// Adds one instance of a predecessor's state to `shared`, exactly as it
    /// was mounted.
    fn restore_shared(
        &self,
        shared: &SharedMount,
        instance: &lode_common::supervisor::InstanceState,
    ) -> Result<(), ControlError> {
        let request: MountRequest = serde_json::from_str(&instance.config).map_err(|e| {
            ControlError::InvalidArgument(format!("saved mount request of {}: {e}", instance.id))
        })?;
        let (blob_source, config) = self.instance_setup(&request)?;
        shared.add(&instance.id, request, &blob_source, &config, now_secs())
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
        let failover = Failover {
            takeover: false,
            ..self.failover()
        };
        let daemon = Daemon::start_with(
            DaemonOptions {
                bootstrap: request.source.clone(),
                blob_source,
                mountpoint: mountpoint.to_path_buf(),
                config,
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

    /// Runs `f` on the metrics of instance `id` (the only one if `None`).
    fn with_metrics<T>(
        &self,
        id: Option<&str>,
        f: impl FnOnce(&str, &Metrics) -> T,
    ) -> Result<T, ControlError> {
        if self.state.get() == DaemonState::Init {
            return Err(ControlError::NotReady("no instance mounted yet".into()));
        }
        if let Some(shared) = self.shared.get() {
            let id = match id {
                Some(id) => id.to_owned(),
                None => match shared.saved().as_slice() {
                    [only] => only.info.id.clone(),
                    _ => {
                        return Err(ControlError::InvalidArgument(
                            "query parameter id is required with several instances".into(),
                        ))
                    }
                },
            };
            let metrics = shared
                .metrics(&id)
                .ok_or_else(|| ControlError::NotFound(format!("no instance {id}")))?;
            return Ok(f(&id, &metrics));
        }
        let slot = self.instance();
        match slot.as_ref() {
            Some(m) if id.is_none_or(|id| id == m.saved.info.id) => {
                Ok(f(&m.saved.info.id, m.daemon.metrics()))
            }
            _ => Err(ControlError::NotFound(format!(
                "no instance {}",
                id.unwrap_or("mounted")
            ))),
        }
    }

    /// Hands the current state and connection to `--supervisor`.
    fn report_to_supervisor(&self) -> Result<(), ControlError> {
        let result = match self.shared.get() {
            Some(shared) => shared.report(),
            None => match self.instance().as_ref() {
                Some(mounted) => mounted.daemon.report_to_supervisor(),
                None => return Err(ControlError::Conflict("no instance mounted".into())),
            },
        };
        result.map_err(|e| ControlError::Internal(format!("sendfd: {e}")))
    }

    fn supervision(&self, what: &str) -> Result<&Arc<dyn Supervision>, ControlError> {
        self.supervision.as_ref().ok_or_else(|| {
            ControlError::NotSupported(format!(
                "{what} needs a supervisor (start lode-fsd with a supervisor socket)"
            ))
        })
    }
}

fn fs_metrics(id: &str, m: &Metrics) -> FsMetrics {
    let snapshot = m.snapshot();
    let (opens, _) = m.fop_counts(Fop::Open);
    let (releases, _) = m.fop_counts(Fop::Release);
    FsMetrics {
        id: id.to_owned(),
        bytes_read: snapshot.bytes_read,
        fops: snapshot
            .fops
            .iter()
            .map(|(name, c)| {
                (
                    (*name).to_owned(),
                    FopCount {
                        count: c.count,
                        errors: c.errors,
                    },
                )
            })
            .collect(),
        read_latency: m.read_latency.snapshot(),
        open_files: opens.saturating_sub(releases),
    }
}

fn cache_metrics(id: &str, m: &Metrics) -> CacheMetrics {
    let s = m.snapshot();
    CacheMetrics {
        id: id.to_owned(),
        hits: s.cache_hits,
        misses: s.cache_misses,
        inflight_joins: s.inflight_joins,
        prefetch_hits: s.prefetch_hits,
        readahead_requests: s.readahead_requests,
        bytes_fetched: s.bytes_fetched,
        chunks_cached: s.chunks_verified,
        bytes_cached: s.cache_bytes_written,
        write_errors: s.cache_write_errors,
        digest_errors: s.digest_errors,
        fetch_timeouts: s.fetch_timeouts,
    }
}

fn backend_metrics(id: &str, m: &Metrics) -> BackendMetrics {
    let s = m.snapshot();
    BackendMetrics {
        id: id.to_owned(),
        requests: s.backend_requests,
        bytes: s.bytes_fetched,
        errors: s.backend_errors,
        latency: m.backend_latency.snapshot(),
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
            ApiRequest::Takeover => {
                let state = self.state.get();
                if state != DaemonState::Init {
                    return Err(ControlError::Conflict(format!(
                        "daemon is {state}: only a daemon in INIT can take over"
                    )));
                }
                self.supervision("takeover")?
                    .takeover()
                    .map_err(ControlError::Internal)?;
                Ok(ApiResponse::Empty)
            }
        }
    }
}

#[cfg(test)]
#[path = "instances_tests.rs"]
mod tests;
