//! The managed daemon's side of hand-over: resuming a connection that a
//! predecessor left with the supervisor, and reporting to the supervisor.
//!
//! A daemon resumes either at start (`--takeover`) or, nydusd-style, on
//! `PUT /daemon/fuse/takeover`: a daemon started with a supervisor on a
//! mountpoint that is still a Lode mount (its predecessor crashed, or is
//! about to be upgraded) must not mount over it, so it waits in INIT until
//! told to take over, and then until told to start.

use std::path::PathBuf;
use std::sync::Arc;

use lode_common::api::{DaemonMode, InstanceInfo, MountRequest, SavedInstance};
use lode_config::FsdConfig;
use tracing::info;

use super::{now_secs, state_error, Host, Mounted, Supervision};
use crate::api::ControlError;
use crate::backend::BlobSource;
use crate::daemon::{Daemon, DaemonError, DaemonOptions};
use crate::shared_host::SharedMount;
use crate::state::{DaemonState, StateEvent};
use crate::takeover::{self, Failover};

impl Host {
    pub(super) fn failover(&self, takeover: bool) -> Failover {
        Failover {
            supervisor: self.options.supervisor.clone(),
            id: self.options.id.clone(),
            takeover,
        }
    }

    /// Whether something besides the daemon says when to start serving.
    pub(super) fn supervised(&self) -> bool {
        self.options.supervisor.is_some() || self.supervision.is_some()
    }

    /// Mounts the shared pseudo root and starts serving it (shared mode).
    /// With `--takeover`, rebuilds the predecessor's instances in sequence
    /// order first and then resumes its connection.
    pub fn start_shared(&self) -> Result<(), DaemonError> {
        self.serve_shared(self.options.takeover)
    }

    fn serve_shared(&self, takeover: bool) -> Result<(), DaemonError> {
        let daemon_events = self.daemon_event_sender()?;
        let failover = self.failover(takeover);
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
        self.state
            .apply(StateEvent::FuseReady)
            .map_err(state_error)?;
        if !self.supervised() {
            self.state.apply(StateEvent::Start).map_err(state_error)?;
        }
        shared.report()?;
        Ok(())
    }

    /// Dedicated mode with `--takeover`: serves the instance the supervisor
    /// holds for this daemon's id on its kept connection, without mounting.
    pub fn take_over_dedicated(&self) -> Result<(), DaemonError> {
        let failover = self.failover(true);
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
        let daemon_events = self.daemon_event_sender()?;
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
                seq: request.seq,
                image_ref: request.image_ref.clone(),
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
            .map_err(state_error)?;
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

    /// Hands the current state and connection to `--supervisor`.
    pub(super) fn report_to_supervisor(&self) -> Result<(), ControlError> {
        let result = match self.shared.get() {
            Some(shared) => shared.report(),
            None => match self.instance().as_ref() {
                Some(mounted) => mounted.daemon.report_to_supervisor(),
                None => return Err(ControlError::Conflict("no instance mounted".into())),
            },
        };
        result.map_err(|e| ControlError::Internal(format!("sendfd: {e}")))
    }

    pub(super) fn supervision(&self, what: &str) -> Result<&Arc<dyn Supervision>, ControlError> {
        self.supervision.as_ref().ok_or_else(|| {
            ControlError::NotSupported(format!(
                "{what} needs a supervisor (start lode-fsd with a supervisor socket)"
            ))
        })
    }

    /// True when the daemon must wait for a takeover request instead of
    /// mounting: it has a supervisor, was not told to take over at start,
    /// and its mountpoint is still a Lode mount.
    pub fn mount_kept_for_takeover(&self) -> bool {
        !self.options.takeover
            && self.options.supervisor.is_some()
            && crate::mount::is_mounted(&self.options.mountpoint, "lode")
    }

    /// `PUT /daemon/fuse/takeover`: resumes the connection the supervisor
    /// holds for this daemon's id. The daemon is READY afterwards and
    /// serves the kernel's requests; `PUT /daemon/start` makes it RUNNING.
    pub(super) fn take_over_on_request(&self) -> Result<(), ControlError> {
        let _one_at_a_time = self.takeover_lock.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.get();
        if state != DaemonState::Init {
            return Err(ControlError::Conflict(format!(
                "daemon is {state}: only a daemon in INIT can take over"
            )));
        }
        if self.options.supervisor.is_none() {
            return self
                .supervision("takeover")?
                .takeover()
                .map_err(ControlError::Internal);
        }
        let result = match self.options.mode {
            DaemonMode::Shared => self.serve_shared(true),
            DaemonMode::Dedicated => {
                if self.instance().is_some() {
                    return Err(ControlError::Conflict(
                        "an instance is already mounted".into(),
                    ));
                }
                self.take_over_dedicated()
            }
        };
        result.map_err(|e| ControlError::Internal(format!("takeover: {e}")))
    }
}
