use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use lode_common::api::{DaemonClient, DaemonMode, DaemonState, InstanceConfig, MountRequest};
use lode_config::FsdConfig;

use super::*;
use crate::host::{Host, HostOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_client_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let (events, _received) = mpsc::channel();
    let host = Arc::new(
        Host::new(
            HostOptions {
                id: "sock-test".into(),
                mode: DaemonMode::Dedicated,
                mountpoint: dir.path().join("mnt"),
                config: FsdConfig {
                    cache: lode_config::CacheConfig {
                        dir: Some(dir.path().join("cache")),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                supervisor: None,
                takeover: false,
                api: true,
            },
            tokio::runtime::Handle::current(),
            events,
        )
        .unwrap(),
    );
    let listener = bind(&sock).unwrap();
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let server = tokio::spawn(serve(
        listener,
        Arc::clone(&host) as Arc<dyn DaemonControl>,
        Arc::default(),
    ));

    let client = DaemonClient::new(&sock);
    let info = client
        .wait_for_state(DaemonState::Init, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(info.id, "sock-test");
    assert_eq!(info.mode, DaemonMode::Dedicated);

    let e = client.start().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT));
    assert_eq!(e.api_code(), Some("conflict"));
    let e = client.fs_metrics(None).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    let e = client.takeover().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_IMPLEMENTED));
    let bad = MountRequest {
        source: "/nonexistent/bootstrap".into(),
        config: InstanceConfig {
            blob_source: "dir:///nonexistent".into(),
            plain_http: false,
            docker_config: None,
            hosts: Vec::new(),
        },
        seq: 0,
        image_ref: None,
        credentials: None,
    };
    let e = client
        .mount(&dir.path().join("elsewhere with space"), &bad)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
    assert!(e.to_string().contains("elsewhere with space"), "{e}");
    assert!(client.inflight().await.unwrap().ops.is_empty());

    // A body over the limit is refused before the daemon sees it.
    let huge = MountRequest {
        image_ref: Some("x".repeat(MAX_BODY)),
        ..bad
    };
    let e = client
        .mount(&dir.path().join("mnt"), &huge)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::PAYLOAD_TOO_LARGE));

    client.exit().await.unwrap();
    let e = client
        .wait_for_state(
            DaemonState::Running,
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("STOPPED"), "{e}");
    server.abort();
}
