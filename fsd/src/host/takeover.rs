//! Resuming a connection that a predecessor left with the supervisor: its
//! instances are rebuilt in sequence order, exactly as they were mounted,
//! before the kernel's first (resent) request reaches them.
//!
//! A daemon resumes either at start (`--takeover`) or, nydusd-style, on
//! `PUT /daemon/fuse/takeover`: a managed daemon started with a supervisor
//! on a mountpoint that is still a Lode mount (its predecessor crashed, or
//! is about to be upgraded) must not mount over it, so it waits in INIT
//! until told to take over, and then until told to start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lode_common::api::{DaemonMode, InstanceConfig, MountRequest};
use lode_common::supervisor::InstanceState;
use lode_config::FsdConfig;
use tracing::info;

use super::state::DaemonState;
use super::{lock, Host, HostError};
use crate::api::ControlError;
use crate::instance::Instance;
use crate::takeover::{self, Failover};

impl Host {
    /// Serves the connection the supervisor holds for this daemon's id,
    /// with the instances its predecessor served.
    pub(super) fn take_over(&self) -> Result<(), HostError> {
        let _changes = lock(&self.changes);
        let failover = Failover {
            supervisor: self.options.supervisor.clone(),
            id: self.options.id.clone(),
        };
        let predecessor = takeover::fetch(&failover, &self.options.mountpoint)?;
        let mut saved = predecessor.state.instances.clone();
        saved.sort_by_key(|i| i.seq);
        let mut root_mode = 0o040_755;
        for state in &saved {
            let request = saved_request(state)?;
            let mountpoint = match self.options.mode {
                DaemonMode::Dedicated => self.options.mountpoint.clone(),
                DaemonMode::Shared => PathBuf::from(&state.mountpoint),
            };
            let instance = Instance::build(&state.id, &mountpoint, request, &self.resources())?;
            root_mode = instance.root_mode;
            self.table.insert(Arc::new(instance))?;
        }
        if self.options.mode == DaemonMode::Dedicated && self.table.all().is_empty() {
            return Err(HostError::SavedState {
                id: self.options.id.clone(),
                reason: "the predecessor served no instance".into(),
            });
        }
        self.open(Some(predecessor), root_mode)?;
        info!(daemon_id = %self.options.id, instances = saved.len(), "took over");
        self.reported();
        Ok(())
    }

    /// True when the daemon must wait for a takeover request instead of
    /// mounting: it is managed, has a supervisor, was not told to take over
    /// at start, and its mountpoint is still a Lode mount.
    pub(super) fn mount_kept_for_takeover(&self) -> bool {
        self.options.api
            && !self.options.takeover
            && self.options.supervisor.is_some()
            && crate::mount::is_mounted(&self.options.mountpoint)
    }

    /// `PUT /daemon/fuse/takeover`: resumes the connection the supervisor
    /// holds for this daemon's id. The daemon is READY afterwards and
    /// serves the kernel's requests; `PUT /daemon/start` makes it RUNNING.
    pub(super) fn take_over_on_request(&self) -> Result<(), ControlError> {
        let state = self.state.get();
        if state != DaemonState::Init {
            return Err(ControlError::Conflict(format!(
                "daemon is {state}: only a daemon in INIT can take over"
            )));
        }
        self.require_supervisor("takeover")?;
        self.take_over()
            .map_err(|e| ControlError::Internal(format!("takeover: {e}")))
    }
}

/// The mount request a predecessor saved for an instance. Daemons save the
/// whole request; a dedicated daemon of an earlier version saved its
/// configuration instead, from which the request is rebuilt.
fn saved_request(state: &InstanceState) -> Result<MountRequest, HostError> {
    if let Ok(request) = serde_json::from_str::<MountRequest>(&state.config) {
        return Ok(request);
    }
    let config: FsdConfig =
        serde_json::from_str(&state.config).map_err(|e| HostError::SavedState {
            id: state.id.clone(),
            reason: format!("neither a mount request nor a configuration: {e}"),
        })?;
    Ok(MountRequest {
        source: Path::new(&state.bootstrap).to_path_buf(),
        config: InstanceConfig {
            blob_source: state.blob_source.clone(),
            plain_http: config.registry.plain_http,
            docker_config: config.registry.docker_config,
            hosts: Vec::new(),
        },
        seq: u32::try_from(state.seq).map_err(|_| HostError::SavedState {
            id: state.id.clone(),
            reason: format!("seq {} out of range", state.seq),
        })?,
        image_ref: state.image_ref.clone(),
        credentials: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(config: String) -> InstanceState {
        InstanceState {
            id: "i".into(),
            seq: 7,
            mountpoint: "/mnt/i".into(),
            bootstrap: "/b".into(),
            blob_source: "dir:///blobs".into(),
            image_ref: Some("r".into()),
            config,
        }
    }

    #[test]
    fn saved_requests_and_earlier_saved_configurations_are_understood() {
        let request = MountRequest {
            source: "/b".into(),
            config: InstanceConfig {
                blob_source: "dir:///blobs".into(),
                plain_http: true,
                docker_config: None,
                hosts: Vec::new(),
            },
            seq: 7,
            image_ref: Some("r".into()),
            credentials: None,
        };
        let saved = state(serde_json::to_string(&request).unwrap());
        assert_eq!(saved_request(&saved).unwrap(), request);
        let mut config = FsdConfig::default();
        config.registry.plain_http = true;
        let earlier = state(serde_json::to_string(&config).unwrap());
        assert_eq!(saved_request(&earlier).unwrap(), request);
        let broken = saved_request(&state("{".into())).unwrap_err();
        assert!(broken.to_string().contains("instance i"), "{broken}");
    }
}
