//! The lode-fsd control API through the real binaries: the daemon's socket,
//! the typed client and `lodectl daemon`. Needs `lode-fsd` and `lodectl`
//! built (no root: an idle daemon mounts nothing).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lode_common::api::{DaemonClient, DaemonMode, DaemonState};
use lode_tests::lode::{Lodectl, LODECTL, LODE_FSD};
use lode_tests::{bin_path, skip_unless, wait_until};

/// Kills the daemon if the test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start_idle(fsd: &Path, dir: &Path) -> Daemon {
    let child = Command::new(fsd)
        .arg("--apisock")
        .arg(dir.join("api.sock"))
        .arg("--mountpoint")
        .arg(dir.join("mnt"))
        .args(["--id", "api-test", "--mode", "dedicated"])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("fsd.log")).unwrap())
        .spawn()
        .unwrap();
    Daemon(child)
}

#[test]
fn idle_daemon_answers_on_its_socket_and_exits_on_request() {
    let fsd = bin_path(LODE_FSD);
    let lodectl = bin_path(LODECTL);
    if !skip_unless(
        fsd.is_some() && lodectl.is_some(),
        "lode-fsd and lodectl are not built (cargo build --workspace --bins)",
    ) {
        return;
    }
    let (fsd, lodectl) = (fsd.unwrap(), Lodectl::new(lodectl.unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut daemon = start_idle(&fsd, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = DaemonClient::new(&sock);

    let info = rt
        .block_on(
            client.wait_for_state(DaemonState::Init, Instant::now() + Duration::from_secs(20)),
        )
        .unwrap();
    assert_eq!(info.id, "api-test");
    assert_eq!(info.mode, DaemonMode::Dedicated);
    assert_eq!(info.pid, daemon.0.id());
    assert!(info.instances.is_empty());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let run = lodectl
        .run([
            Path::new("daemon").as_os_str(),
            "info".as_ref(),
            sock.as_os_str(),
        ])
        .unwrap();
    assert!(run.success, "{}", run.stderr);
    let printed: lode_common::api::DaemonInfo = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(printed.id, "api-test");
    assert_eq!(printed.state, DaemonState::Init);

    // Nothing mounted yet: metrics are refused as not ready, naming the code.
    let run = lodectl
        .run([
            Path::new("daemon").as_os_str(),
            "metrics".as_ref(),
            sock.as_os_str(),
        ])
        .unwrap();
    assert!(!run.success);
    assert!(run.stderr.contains("not_ready"), "{}", run.stderr);

    rt.block_on(client.exit()).unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(20), "lode-fsd to exit", || {
        status = daemon.0.try_wait().unwrap();
        status.is_some()
    })
    .unwrap();
    assert!(status.unwrap().success());
    assert!(!sock.exists(), "the socket is removed at exit");
}
