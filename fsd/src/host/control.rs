//! The host behind the control API: every [`ApiRequest`] answered from the
//! host's instances and state.

use lode_common::api::{BuildVersion, DaemonInfo, InflightMetrics};

use super::metrics_view::{access, backend_metrics, cache_metrics, fs_metrics};
use super::state::{DaemonState, StateEvent};
use super::{Host, HostEvent};
use crate::api::{ApiRequest, ApiResponse, ControlError, DaemonControl};

fn build_version() -> BuildVersion {
    BuildVersion {
        package: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: env!("LODE_GIT_COMMIT").to_owned(),
        build_time: env!("LODE_BUILD_TIME").to_owned(),
    }
}

impl Host {
    fn info(&self) -> DaemonInfo {
        DaemonInfo {
            id: self.options.id.clone(),
            version: build_version(),
            pid: std::process::id(),
            mode: self.options.mode,
            state: self.state.get(),
            supervisor: self.options.supervisor.clone(),
            instances: self.table.all().iter().map(|i| i.saved().info).collect(),
        }
    }

    /// Refuses `what` (an API action) when the daemon has no supervisor.
    pub(super) fn require_supervisor(&self, what: &str) -> Result<(), ControlError> {
        if self.options.supervisor.is_none() {
            return Err(ControlError::NotSupported(format!(
                "{what} needs a supervisor (start lode-fsd with --supervisor)"
            )));
        }
        Ok(())
    }

    /// `PUT /daemon/fuse/sendfd`: hands the state and connection to the
    /// supervisor now.
    fn send_fd(&self) -> Result<(), ControlError> {
        let state = self.state.get();
        if !matches!(state, DaemonState::Ready | DaemonState::Running) {
            return Err(ControlError::Conflict(format!(
                "daemon is {state}: no FUSE connection to send"
            )));
        }
        self.require_supervisor("sendfd")?;
        self.report()
            .map_err(|e| ControlError::Internal(format!("sendfd: {e}")))
    }
}

fn illegal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Conflict(e.to_string())
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
            } => self
                .remount(&mountpoint, request)
                .map(|()| ApiResponse::Empty),
            ApiRequest::FsMetrics { id } => self
                .with_instance(id.as_deref(), |i| fs_metrics(&i.id, &i.metrics))
                .map(ApiResponse::FsMetrics),
            ApiRequest::CacheMetrics { id } => self
                .with_instance(id.as_deref(), |i| cache_metrics(&i.id, &i.metrics))
                .map(ApiResponse::CacheMetrics),
            ApiRequest::BackendMetrics { id } => self
                .with_instance(id.as_deref(), |i| backend_metrics(&i.id, &i.metrics))
                .map(ApiResponse::BackendMetrics),
            ApiRequest::Access { id } => self
                .with_instance(id.as_deref(), access)?
                .map(ApiResponse::Access),
            ApiRequest::Inflight => Ok(ApiResponse::Inflight(InflightMetrics {
                ops: self.table.inflight.snapshot(),
            })),
            ApiRequest::Ahead(request) => self.ahead(&request).map(|()| ApiResponse::Empty),
            ApiRequest::Start => {
                self.state.apply(StateEvent::Start).map_err(illegal)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Exit => {
                self.state.apply(StateEvent::Stop).map_err(illegal)?;
                let _ = self.events.send(HostEvent::Exit);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::SendFd => self.send_fd().map(|()| ApiResponse::Empty),
            ApiRequest::Takeover => self.take_over_on_request().map(|()| ApiResponse::Empty),
        }
    }
}
