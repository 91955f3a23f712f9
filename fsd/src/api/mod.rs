//! The daemon's HTTP control API on a unix socket.
//!
//! Layers: [`parse`] turns method, URI and body into an [`ApiRequest`];
//! [`router::handle`] hands it to a [`DaemonControl`] and maps the typed
//! answer or [`ControlError`] to a status and JSON body; [`server`] serves
//! that over a socket. The HTTP layer never touches daemon internals, so
//! tests drive the router with a fake control and no socket.

pub mod parse;
pub mod router;
pub mod server;

use std::path::PathBuf;

use lode_common::api::{
    AheadRequest, BackendMetrics, CacheMetrics, DaemonInfo, FsMetrics, InflightMetrics,
    InstanceAccess, MountRequest,
};

/// Requests bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1 << 20;

/// One API call, parsed and validated for syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    GetDaemon,
    Mount {
        mountpoint: PathBuf,
        request: MountRequest,
    },
    Umount {
        mountpoint: PathBuf,
    },
    Remount {
        mountpoint: PathBuf,
        request: MountRequest,
    },
    FsMetrics {
        id: Option<String>,
    },
    CacheMetrics {
        id: Option<String>,
    },
    BackendMetrics {
        id: Option<String>,
    },
    Access {
        id: Option<String>,
    },
    Inflight,
    /// Fetch data blob fronts before their image is mounted.
    Ahead(AheadRequest),
    Start,
    Exit,
    SendFd,
    Takeover,
}

/// The daemon's answer to an [`ApiRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiResponse {
    Daemon(Box<DaemonInfo>),
    FsMetrics(FsMetrics),
    CacheMetrics(CacheMetrics),
    BackendMetrics(BackendMetrics),
    Access(InstanceAccess),
    Inflight(InflightMetrics),
    /// Done; nothing to report (204).
    Empty,
}

/// Why the daemon refused or failed a request; each maps to one status.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    Internal(String),
}

/// What the daemon exposes to the API.
pub trait DaemonControl: Send + Sync {
    /// Carries out `request`. May block (mounting does I/O); the server calls
    /// it off its async threads.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ControlError>;
}
