//! The host's API answers without a mount: states, validation, refusals.

use std::path::Path;
use std::sync::mpsc;

use lode_common::api::{InflightMetrics, InstanceConfig};

use super::*;
use crate::api::{ApiRequest, ApiResponse, DaemonControl};

pub(super) fn options(mode: DaemonMode, mountpoint: &Path) -> HostOptions {
    let mut config = FsdConfig::default();
    config.cache.dir = Some("/nonexistent/cache".into());
    HostOptions {
        id: "d1".into(),
        mode,
        mountpoint: mountpoint.to_path_buf(),
        config,
        supervisor: None,
        takeover: false,
        api: true,
    }
}

pub(super) fn request(source: &Path, blob_source: &str, seq: u32) -> MountRequest {
    MountRequest {
        source: source.to_path_buf(),
        config: InstanceConfig {
            blob_source: blob_source.into(),
            plain_http: false,
            docker_config: None,
            hosts: Vec::new(),
        },
        seq,
        image_ref: Some("example/app:1".into()),
        credentials: None,
    }
}

pub(super) fn mount(mountpoint: &Path, request: MountRequest) -> ApiRequest {
    ApiRequest::Mount {
        mountpoint: mountpoint.to_path_buf(),
        request,
    }
}

/// A host on its own runtime, and the receiver of its events.
pub(super) struct TestHost {
    pub host: std::sync::Arc<Host>,
    pub events: mpsc::Receiver<HostEvent>,
    _runtime: tokio::runtime::Runtime,
}

impl TestHost {
    pub fn new(options: HostOptions) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (events, received) = mpsc::channel();
        let host = Host::new(options, runtime.handle().clone(), events).unwrap();
        Self {
            host: std::sync::Arc::new(host),
            events: received,
            _runtime: runtime,
        }
    }
}

#[test]
fn idle_daemon_reports_init_and_refuses_by_state() {
    let mnt = Path::new("/nonexistent/mnt");
    let t = TestHost::new(options(DaemonMode::Dedicated, mnt));
    let host = &t.host;
    let Ok(ApiResponse::Daemon(info)) = host.handle(ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert_eq!(info.state, DaemonState::Init);
    assert_eq!(info.mode, DaemonMode::Dedicated);
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.version.package, env!("CARGO_PKG_VERSION"));
    assert!(!info.version.git_commit.is_empty());
    assert!(info.instances.is_empty());

    let refusals = [
        (ApiRequest::Start, "conflict"),
        (ApiRequest::FsMetrics { id: None }, "not ready"),
        (ApiRequest::SendFd, "conflict"),
        (ApiRequest::Takeover, "not supported"),
        (
            ApiRequest::Umount {
                mountpoint: mnt.into(),
            },
            "not found",
        ),
    ];
    for (request, expected) in refusals {
        let result = host.handle(request.clone());
        let kind = match result {
            Err(ControlError::Conflict(_)) => "conflict",
            Err(ControlError::NotReady(_)) => "not ready",
            Err(ControlError::NotSupported(_)) => "not supported",
            Err(ControlError::NotFound(_)) => "not found",
            _ => "other",
        };
        assert_eq!(kind, expected, "{request:?}: {result:?}");
    }
    assert_eq!(
        host.handle(ApiRequest::Inflight),
        Ok(ApiResponse::Inflight(InflightMetrics::default()))
    );
    assert_eq!(host.handle(ApiRequest::Exit), Ok(ApiResponse::Empty));
    assert!(matches!(t.events.try_recv(), Ok(HostEvent::Exit)));
    assert_eq!(host.state().get(), DaemonState::Stopped);
    assert!(matches!(
        host.handle(ApiRequest::Exit),
        Err(ControlError::Conflict(_))
    ));
}

#[test]
fn mount_requests_are_validated_before_mounting() {
    let mnt = Path::new("/nonexistent/mnt");
    let t = TestHost::new(options(DaemonMode::Dedicated, mnt));
    let boot = Path::new("/nonexistent/bootstrap");
    let cases = [
        mount(Path::new("/elsewhere"), request(boot, "dir:///b", 0)),
        mount(
            mnt,
            request(boot, "dir:///b", crate::fs::inode_map::SEQ_LIMIT),
        ),
        mount(mnt, request(boot, "ftp://x", 0)),
        mount(mnt, request(boot, "dir:///b", 1)),
    ];
    for case in cases {
        let result = t.host.handle(case.clone());
        assert!(
            matches!(result, Err(ControlError::InvalidArgument(_))),
            "{case:?}: {result:?}"
        );
    }
    assert_eq!(t.host.state().get(), DaemonState::Init);
    assert!(!t.host.serving());

    let shared = TestHost::new(options(DaemonMode::Shared, mnt));
    // Instances live at <mnt>/<id>, and only once the shared mount serves.
    assert!(matches!(
        shared.host.handle(mount(mnt, request(boot, "dir:///b", 1))),
        Err(ControlError::InvalidArgument(_))
    ));
    assert!(matches!(
        shared
            .host
            .handle(mount(&mnt.join("a"), request(boot, "dir:///b", 1))),
        Err(ControlError::NotReady(_))
    ));
}

#[test]
fn host_errors_map_to_api_errors_in_one_place() {
    let seq = HostError::Table(TableError::Seq(crate::fs::inode_map::InodeMapError::Seq(0)));
    assert!(matches!(
        ControlError::from(seq),
        ControlError::InvalidArgument(_)
    ));
    let dup = HostError::Table(TableError::DuplicateId("a".into()));
    assert!(matches!(ControlError::from(dup), ControlError::Conflict(_)));
    let io = io_err("x")(std::io::Error::other("y"));
    assert!(matches!(ControlError::from(io), ControlError::Internal(_)));
}
