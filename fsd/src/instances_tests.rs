use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lode_common::api::InstanceConfig;

use super::*;
use crate::testutil::{pattern, wait_until, ImageBuilder};

fn options(mode: DaemonMode, mountpoint: &Path) -> HostOptions {
    HostOptions {
        id: "d1".into(),
        mode,
        mountpoint: mountpoint.to_path_buf(),
        config: FsdConfig::default(),
        supervisor: None,
        takeover: false,
    }
}

fn request(source: &Path, blob_source: &str, seq: u32) -> MountRequest {
    MountRequest {
        source: source.to_path_buf(),
        config: InstanceConfig {
            blob_source: blob_source.into(),
            plain_http: false,
            docker_config: None,
        },
        seq,
        image_ref: Some("example/app:1".into()),
    }
}

fn mount(mountpoint: &Path, request: MountRequest) -> ApiRequest {
    ApiRequest::Mount {
        mountpoint: mountpoint.to_path_buf(),
        request,
    }
}

#[derive(Default)]
struct FakeSupervision {
    takeovers: AtomicUsize,
    sent: Mutex<Vec<DaemonSnapshot>>,
}

impl Supervision for FakeSupervision {
    fn send_fd(&self, snapshot: &DaemonSnapshot) -> Result<(), String> {
        self.sent.lock().unwrap().push(snapshot.clone());
        Ok(())
    }

    fn takeover(&self) -> Result<(), String> {
        self.takeovers.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn idle_daemon_reports_init_and_refuses_by_state() {
    let mnt = Path::new("/nonexistent/mnt");
    let (events, received) = mpsc::channel();
    let host = Host::new(options(DaemonMode::Dedicated, mnt), events, None);
    let Ok(ApiResponse::Daemon(info)) = host.handle(ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert_eq!(info.state, DaemonState::Init);
    assert_eq!(info.mode, DaemonMode::Dedicated);
    assert_eq!(info.pid, std::process::id());
    assert_eq!(info.version.package, env!("CARGO_PKG_VERSION"));
    assert!(!info.version.git_commit.is_empty());
    assert!(info.instances.is_empty());

    assert!(matches!(
        host.handle(ApiRequest::Start),
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        host.handle(ApiRequest::FsMetrics { id: None }),
        Err(ControlError::NotReady(_))
    ));
    assert!(matches!(
        host.handle(ApiRequest::SendFd),
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        host.handle(ApiRequest::Takeover),
        Err(ControlError::NotSupported(_))
    ));
    assert!(matches!(
        host.handle(ApiRequest::Umount {
            mountpoint: mnt.into()
        }),
        Err(ControlError::NotFound(_))
    ));
    assert_eq!(
        host.handle(ApiRequest::Inflight),
        Ok(ApiResponse::Inflight(InflightMetrics::default()))
    );

    assert_eq!(host.handle(ApiRequest::Exit), Ok(ApiResponse::Empty));
    assert!(matches!(received.try_recv(), Ok(HostEvent::Exit)));
    assert_eq!(host.state().get(), DaemonState::Stopped);
    assert!(matches!(
        host.handle(ApiRequest::Exit),
        Err(ControlError::Conflict(_))
    ));
}

#[test]
fn mount_requests_are_validated_before_mounting() {
    let mnt = Path::new("/nonexistent/mnt");
    let (events, _received) = mpsc::channel();
    let host = Host::new(options(DaemonMode::Dedicated, mnt), events, None);
    let boot = Path::new("/nonexistent/bootstrap");
    let cases = [
        mount(Path::new("/elsewhere"), request(boot, "dir:///b", 0)),
        mount(mnt, request(boot, "dir:///b", MAX_SEQ)),
        mount(mnt, request(boot, "ftp://x", 0)),
        mount(mnt, request(boot, "dir:///b", 1)),
    ];
    for case in cases {
        let result = host.handle(case.clone());
        assert!(
            matches!(result, Err(ControlError::InvalidArgument(_))),
            "{case:?}: {result:?}"
        );
    }
    assert_eq!(host.state().get(), DaemonState::Init);

    let (events, _received) = mpsc::channel();
    let shared = Host::new(options(DaemonMode::Shared, mnt), events, None);
    // Instances live at <mnt>/<id>, and only once the shared mount serves.
    assert!(matches!(
        shared.handle(mount(mnt, request(boot, "dir:///b", 1))),
        Err(ControlError::InvalidArgument(_))
    ));
    assert!(matches!(
        shared.handle(mount(&mnt.join("a"), request(boot, "dir:///b", 1))),
        Err(ControlError::NotReady(_))
    ));
}

#[test]
fn supervision_hooks_are_called_in_the_right_state() {
    let supervision = Arc::new(FakeSupervision::default());
    let (events, _received) = mpsc::channel();
    let host = Host::new(
        options(DaemonMode::Dedicated, Path::new("/m")),
        events,
        Some(Arc::clone(&supervision) as Arc<dyn Supervision>),
    );
    assert_eq!(host.handle(ApiRequest::Takeover), Ok(ApiResponse::Empty));
    assert_eq!(supervision.takeovers.load(Ordering::SeqCst), 1);
    host.state().apply(StateEvent::FuseReady).unwrap();
    assert!(matches!(
        host.handle(ApiRequest::Takeover),
        Err(ControlError::Conflict(_))
    ));
    assert_eq!(host.handle(ApiRequest::SendFd), Ok(ApiResponse::Empty));
    let sent = supervision.sent.lock().unwrap();
    assert_eq!(sent[0].id, "d1");
    assert_eq!(sent[0].state, DaemonState::Ready);
    drop(sent);
    assert_eq!(host.handle(ApiRequest::Start), Ok(ApiResponse::Empty));
    assert_eq!(host.state().get(), DaemonState::Running);
}

#[test]
fn dedicated_instance_mounts_serves_metrics_and_unmounts() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping dedicated_instance_mounts_serves_metrics_and_unmounts: needs root and /dev/fuse");
        return;
    }
    let data = pattern(300_000, 4);
    let mut b = ImageBuilder::new(64 * 1024, true);
    b.file("data/file", &data);
    let image = b.build();
    let mnt = tempfile::tempdir().unwrap();
    let mut host_options = options(DaemonMode::Dedicated, mnt.path());
    host_options.config.cache.dir = Some(image.cache_dir.clone());
    let (events, received) = mpsc::channel();
    let host = Host::new(host_options, events, None);
    let source = format!("dir://{}", image.blob_dir.display());
    let req = request(&image.bootstrap_path, &source, 5);
    assert_eq!(
        host.handle(mount(mnt.path(), req.clone())),
        Ok(ApiResponse::Empty)
    );
    assert_eq!(host.state().get(), DaemonState::Running);
    assert_eq!(std::fs::read(mnt.path().join("data/file")).unwrap(), data);

    let Ok(ApiResponse::Daemon(info)) = host.handle(ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert_eq!(info.instances.len(), 1);
    assert_eq!(info.instances[0].seq, 5);
    assert_eq!(
        info.instances[0].image_ref.as_deref(),
        Some("example/app:1")
    );
    let Ok(ApiResponse::FsMetrics(fs)) = host.handle(ApiRequest::FsMetrics { id: None }) else {
        panic!("no fs metrics");
    };
    assert_eq!(fs.bytes_read, data.len() as u64);
    assert!(fs.read_latency.counts.iter().sum::<u64>() > 0);
    assert!(fs.fops["read"].count > 0);
    let backend_metrics = || {
        let Ok(ApiResponse::BackendMetrics(be)) = host.handle(ApiRequest::BackendMetrics {
            id: Some("d1".into()),
        }) else {
            panic!("no backend metrics");
        };
        be
    };
    assert!(backend_metrics().requests > 0);
    // Chunks reach readers while their request still streams; its latency
    // is recorded when it ends.
    wait_until("every request's latency recorded", || {
        let be = backend_metrics();
        be.latency.counts.iter().sum::<u64>() == be.requests
    });
    assert!(matches!(
        host.handle(ApiRequest::CacheMetrics {
            id: Some("other".into())
        }),
        Err(ControlError::NotFound(_))
    ));
    assert!(matches!(
        host.handle(mount(mnt.path(), req)),
        Err(ControlError::Conflict(_))
    ));

    assert_eq!(
        host.handle(ApiRequest::Umount {
            mountpoint: mnt.path().into()
        }),
        Ok(ApiResponse::Empty)
    );
    loop {
        match received.recv_timeout(Duration::from_secs(10)) {
            Ok(HostEvent::Daemon(Event::SessionEnded)) => break,
            Ok(_) => continue,
            Err(e) => panic!("session did not end: {e}"),
        }
    }
    host.take_daemon().unwrap().wait().unwrap();
}
