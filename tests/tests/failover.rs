//! Failover with real processes: `lode-fsd` hands its /dev/fuse descriptor to
//! a supervisor (here in-process), is killed with SIGKILL while readers keep
//! reading, and a successor started with `--takeover` serves the same mount.
//! Readers must see no error and no wrong byte, and the mount must never
//! leave the mount table. Also: a hot upgrade (the first daemon leaves on
//! SIGUSR2 after the successor took over), a refused plain start on a mount
//! a supervisor keeps, and the same hand-overs driven through the control
//! API of shared daemons.
//!
//! `LODE_FAILOVER_ITERATIONS=N` runs N kill/takeover cycles instead of 20.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lode_common::api::{DaemonClient, DaemonState, InstanceConfig, MountRequest};
use lode_common::supervisor::SupervisorServer;
use lode_tests::failover::{
    build_image, monotonic_ns, pause, Image, MountWatch, Readers, Tally, READ_SIZE,
};
use lode_tests::lode::{force_unmount, is_fsd_mount};
use lode_tests::{bin_path, fuse_available, require_root, skip_unless, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `lode-fsd` process of the test.
struct Fsd {
    child: Child,
}

impl Fsd {
    /// The arguments every daemon of these tests shares.
    fn command(bin: &Path, image: &Image, env: &Env) -> Command {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&env.log)
            .unwrap();
        let mut command = Command::new(bin);
        command
            .arg("--cache-dir")
            .arg(&image.cache)
            .arg("--mountpoint")
            .arg(&env.mountpoint)
            .arg("--supervisor")
            .arg(env.supervisor.path())
            .arg("--id")
            .arg("failover")
            .arg("--threads")
            .arg("4")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command
    }

    /// A daemon serving the image at the mount root.
    fn spawn(bin: &Path, image: &Image, env: &Env, takeover: bool) -> Child {
        let mut command = Self::command(bin, image, env);
        command
            .arg("--bootstrap")
            .arg(&image.bootstrap)
            .arg("--blob-source")
            .arg(&image.blob_source);
        if takeover {
            command.arg("--takeover");
        }
        command.spawn().expect("start lode-fsd")
    }

    /// A shared daemon driven through its API socket `apisock`.
    fn spawn_shared(bin: &Path, image: &Image, env: &Env, apisock: &Path) -> Self {
        let mut command = Self::command(bin, image, env);
        command
            .arg("--apisock")
            .arg(apisock)
            .args(["--mode", "shared"]);
        Self {
            child: command.spawn().expect("start lode-fsd"),
        }
    }

    /// Starts a daemon and waits until it has handed its state to the
    /// supervisor, which it does once serving.
    fn start(bin: &Path, image: &Image, env: &Env, takeover: bool) -> Self {
        let mut child = Self::spawn(bin, image, env, takeover);
        let pid = child.id();
        let mut exited = None;
        wait_until(
            START_TIMEOUT,
            "lode-fsd to report to the supervisor",
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    return true;
                }
                env.supervisor
                    .state("failover")
                    .is_some_and(|s| s.pid == pid)
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {}", env.log_text()));
        if let Some(status) = exited {
            panic!("lode-fsd exited with {status}: {}", env.log_text());
        }
        Self { child }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal lode-fsd");
    }

    /// SIGKILL without waiting: a killed daemon's thread can stay blocked
    /// until the successor answers the connection, so it is reaped later.
    fn kill(self) -> Child {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.child
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("reap lode-fsd")
    }

    /// Sends `signal` and asserts that the daemon exits cleanly.
    fn exit_on(self, signal: nix::sys::signal::Signal, env: &Env) {
        self.signal(signal);
        assert!(self.wait().success(), "{}", env.log_text());
    }
}

struct Env {
    _dir: tempfile::TempDir,
    mountpoint: PathBuf,
    log: PathBuf,
    supervisor: SupervisorServer,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let supervisor = SupervisorServer::bind(&dir.path().join("supervisor.sock")).unwrap();
        Self {
            log: dir.path().join("fsd.log"),
            mountpoint,
            supervisor,
            _dir: dir,
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self._dir.path().join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if is_fsd_mount(&self.mountpoint) {
            force_unmount(&self.mountpoint);
        }
    }
}

/// Starts a daemon on the image and three readers on its mount; returns
/// once they have read from it.
fn serve_and_read(fsd: &Path, image: &Image, env: &Env) -> (Fsd, MountWatch, Readers) {
    let daemon = Fsd::start(fsd, image, env, false);
    let watch = MountWatch::start(&env.mountpoint);
    let readers = Readers::start(&env.mountpoint, 3);
    readers.wait_progress(50, "reads from the first daemon");
    (daemon, watch, readers)
}

/// Kill cycles per test: `LODE_FAILOVER_ITERATIONS`, default 20.
fn iterations() -> usize {
    std::env::var("LODE_FAILOVER_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    if !require_root() || !skip_unless(fuse_available(), "/dev/fuse cannot be opened") {
        return None;
    }
    match (bin_path("lode-fsd"), bin_path("lodectl")) {
        (Some(fsd), Some(ctl)) => Some((fsd, ctl)),
        _ => {
            skip_unless(false, "lode-fsd and lodectl are not built");
            None
        }
    }
}

/// Prints the reads and the reader pauses of `outages` (kill, served),
/// monotonic ns.
fn report_pauses(what: &str, tally: &Tally, outages: &[(u64, u64)]) {
    let slow = tally.slow.lock().unwrap().clone();
    let mut pauses: Vec<Duration> = outages
        .iter()
        .map(|&(kill, served)| pause(&slow, kill, served))
        .collect();
    pauses.sort();
    let restart = outages
        .iter()
        .map(|&(k, s)| Duration::from_nanos(s - k))
        .max()
        .unwrap_or_default();
    let at = |q: usize| {
        pauses
            .get(q.min(pauses.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "failover: {} {what} cycles, {} reads of {} KiB, {} errors, {} wrong; \
         reader pause median {:.1} ms, p90 {:.1} ms, max {:.1} ms; kill-to-served max {:.1} ms",
        outages.len(),
        tally.reads.load(Ordering::Relaxed),
        READ_SIZE / 1024,
        tally.errors.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        ms(at(pauses.len() / 2)),
        ms(at(pauses.len() * 9 / 10)),
        ms(at(pauses.len())),
        ms(restart),
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn assert_clean(tally: &Tally, missing: u64, env: &Env) {
    let errors = tally.errors.load(Ordering::Relaxed);
    assert_eq!(
        errors,
        0,
        "read errors; first: {:?}\n{}",
        tally.first_error.lock().unwrap(),
        env.log_text()
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "wrong bytes");
    assert_eq!(missing, 0, "the mount left the mount table");
}

#[test]
fn sigkill_and_takeover_cycles_lose_no_read() {
    let Some((fsd, lodectl)) = prerequisites() else {
        return;
    };
    let iterations = iterations();
    let image = build_image(&lodectl);
    let env = Env::new();
    let (mut daemon, watch, readers) = serve_and_read(&fsd, &image, &env);

    // A plain start must not mount over the mount a supervisor keeps after
    // a crash. Checked once, outside the measured cycles, since that start
    // lengthens the outage.
    readers.wait_progress(20, "reads before the first kill");
    let mut killed = vec![daemon.kill()];
    assert!(is_fsd_mount(&env.mountpoint), "mount gone after SIGKILL");
    let mut plain = Fsd::spawn(&fsd, &image, &env, false);
    let status = plain.wait().unwrap();
    assert!(!status.success(), "plain start over a kept mount succeeded");
    assert!(
        env.log_text().contains("--takeover"),
        "no hint to take over: {}",
        env.log_text()
    );
    daemon = Fsd::start(&fsd, &image, &env, true);

    let mut outages = Vec::with_capacity(iterations);
    for i in 0..iterations {
        readers.wait_progress(20, "reads before the kill");
        let kill = monotonic_ns();
        killed.push(daemon.kill());
        assert!(
            is_fsd_mount(&env.mountpoint),
            "mount gone after SIGKILL {i}"
        );
        daemon = Fsd::start(&fsd, &image, &env, true);
        let served = monotonic_ns();
        readers.wait_each_progress(1, "every reader after the takeover");
        outages.push((kill, served));
    }
    let tally = readers.stop();
    let missing = watch.stop();
    for mut child in killed {
        child.wait().expect("reap a killed lode-fsd");
    }
    daemon.exit_on(nix::sys::signal::Signal::SIGTERM, &env);
    assert!(
        !is_fsd_mount(&env.mountpoint),
        "still mounted after SIGTERM"
    );

    report_pauses("SIGKILL/takeover", &tally, &outages);
    assert_clean(&tally, missing, &env);
}

/// Failover with a standby: a second daemon already serves the connection
/// (it took it over from the live first one, as in an upgrade) when the
/// first is killed. It resends what the dead one left unanswered as soon as
/// that one is gone, and the next standby is started afterwards, outside
/// the outage. Readers only wait for the resend. A killed standby needs the
/// supervisor's resend instead, since the older daemon does not watch it.
#[test]
fn sigkill_with_a_standby_successor_is_a_short_pause() {
    let Some((fsd, lodectl)) = prerequisites() else {
        return;
    };
    let iterations = iterations();
    let image = build_image(&lodectl);
    let env = Env::new();
    let (mut active, watch, readers) = serve_and_read(&fsd, &image, &env);
    let mut standby = Fsd::start(&fsd, &image, &env, true);

    let mut outages = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        readers.wait_progress(20, "reads before the kill");
        let kill = monotonic_ns();
        let mut killed = active.kill();
        killed.wait().expect("reap the killed lode-fsd");
        let gone = monotonic_ns();
        readers.wait_each_progress(1, "every reader after the kill");
        outages.push((kill, gone));
        active = standby;
        standby = Fsd::start(&fsd, &image, &env, true);
    }
    // A standby that dies is the supervisor's to clean up after: the
    // requests it had read wait in the kernel until the supervisor asks for
    // them again, and the active daemon answers them.
    readers.wait_progress(20, "reads before the standby's kill");
    let mut killed = standby.kill();
    killed.wait().expect("reap the killed standby");
    assert!(
        env.supervisor.resend("failover").unwrap(),
        "the supervisor holds the connection"
    );
    readers.wait_each_progress(2, "every reader after the standby's death");
    standby = Fsd::start(&fsd, &image, &env, true);

    let tally = readers.stop();
    let missing = watch.stop();
    active.exit_on(nix::sys::signal::Signal::SIGUSR2, &env);
    standby.exit_on(nix::sys::signal::Signal::SIGTERM, &env);
    assert!(
        !is_fsd_mount(&env.mountpoint),
        "still mounted after SIGTERM"
    );
    report_pauses("SIGKILL-with-standby", &tally, &outages);
    assert_clean(&tally, missing, &env);
}

#[test]
fn hot_upgrade_hands_a_live_mount_to_a_successor() {
    let Some((fsd, lodectl)) = prerequisites() else {
        return;
    };
    let image = build_image(&lodectl);
    let env = Env::new();
    let (old, watch, readers) = serve_and_read(&fsd, &image, &env);

    // Both serve the connection for a while; then the old one leaves.
    let new = Fsd::start(&fsd, &image, &env, true);
    readers.wait_progress(20, "reads with both daemons");
    old.exit_on(nix::sys::signal::Signal::SIGUSR2, &env);
    readers.wait_each_progress(3, "reads from the successor alone");

    let tally = readers.stop();
    let missing = watch.stop();
    assert_eq!(
        env.supervisor.state("failover").map(|s| s.pid),
        Some(new.child.id()),
        "the supervisor should hold the successor's state"
    );
    new.exit_on(nix::sys::signal::Signal::SIGTERM, &env);
    assert!(
        env.supervisor.state("failover").is_none(),
        "a clean stop should clear the supervisor's state"
    );
    assert_clean(&tally, missing, &env);
}

/// The reader process's entry (see [`Readers`]).
#[test]
fn reader_process() {
    lode_tests::failover::reader_process();
}

/// The nydusd-style flow through the API of shared daemons: a successor
/// started on a mount the supervisor keeps waits in INIT; `takeover`, then
/// the old daemon's `exit`, then `start` hands the live mount over. Then the
/// successor is killed and a third daemon recovers the mount the same way.
#[test]
fn api_driven_upgrade_and_recovery_of_a_shared_daemon() {
    let Some((fsd, lodectl)) = prerequisites() else {
        return;
    };
    let image = build_image(&lodectl);
    let env = Env::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = || Instant::now() + START_TIMEOUT;
    let state_of = |api: &DaemonClient| rt.block_on(api.daemon_info()).unwrap();

    let first = Fsd::spawn_shared(&fsd, &image, &env, &env.socket("first.sock"));
    let first_api = DaemonClient::new(env.socket("first.sock"));
    rt.block_on(first_api.wait_for_state(DaemonState::Ready, deadline()))
        .unwrap_or_else(|e| panic!("{e}: {}", env.log_text()));
    rt.block_on(first_api.start()).unwrap();
    let instance = env.mountpoint.join("img");
    let request = MountRequest {
        source: image.bootstrap.clone(),
        config: InstanceConfig {
            blob_source: image.blob_source.clone(),
            plain_http: false,
            docker_config: None,
            hosts: Vec::new(),
        },
        seq: 7,
        image_ref: Some("127.0.0.1:5000/failover:v1".into()),
        credentials: None,
    };
    rt.block_on(first_api.mount(&instance, &request)).unwrap();
    let watch = MountWatch::start(&env.mountpoint);
    let readers = Readers::start(&instance, 3);
    readers.wait_progress(50, "reads from the first daemon");
    rt.block_on(first_api.send_fd()).unwrap();

    // A plain start of a successor: the mount is kept, so it waits.
    let successor_api = |name: &str| {
        let api = DaemonClient::new(env.socket(name));
        let info = rt
            .block_on(api.wait_for_state(DaemonState::Init, deadline()))
            .unwrap_or_else(|e| panic!("{e}: {}", env.log_text()));
        assert!(info.instances.is_empty(), "{info:?}");
        api
    };
    let take_over = |api: &DaemonClient, pid: u32| {
        rt.block_on(api.takeover())
            .unwrap_or_else(|e| panic!("takeover: {e}: {}", env.log_text()));
        let info = state_of(api);
        assert_eq!(info.state, DaemonState::Ready);
        let instances: Vec<_> = info
            .instances
            .iter()
            .map(|i| (i.id.as_str(), i.seq))
            .collect();
        assert_eq!(instances, [("img", 7)]);
        assert_eq!(info.instances[0].image_ref, request.image_ref);
        let again = rt.block_on(api.takeover()).unwrap_err();
        assert_eq!(again.api_code(), Some("conflict"), "{again}");
        assert_eq!(
            env.supervisor.state("failover").map(|s| s.pid),
            Some(pid),
            "the successor reports to the supervisor once it serves"
        );
    };
    let second = Fsd::spawn_shared(&fsd, &image, &env, &env.socket("second.sock"));
    let second_api = successor_api("second.sock");
    // The API answers (in INIT) before the daemon has logged its choice.
    wait_until(
        Duration::from_secs(10),
        "the successor to wait in INIT",
        || env.log_text().contains("waiting in INIT"),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", env.log_text()));
    take_over(&second_api, second.child.id());
    rt.block_on(first_api.exit()).unwrap();
    assert!(first.wait().success(), "{}", env.log_text());
    rt.block_on(second_api.start()).unwrap();
    assert_eq!(state_of(&second_api).state, DaemonState::Running);
    readers.wait_each_progress(3, "reads from the upgraded daemon");

    // Crash recovery the same way.
    let killed = second.kill();
    let third = Fsd::spawn_shared(&fsd, &image, &env, &env.socket("third.sock"));
    let third_api = successor_api("third.sock");
    take_over(&third_api, third.child.id());
    rt.block_on(third_api.start()).unwrap();
    readers.wait_each_progress(3, "reads after the recovery");

    let tally = readers.stop();
    let missing = watch.stop();
    killed.wait_with_output().expect("reap the killed daemon");
    let metrics = rt.block_on(third_api.fs_metrics(Some("img"))).unwrap();
    assert!(metrics.bytes_read > 0, "{metrics:?}");
    third.exit_on(nix::sys::signal::Signal::SIGTERM, &env);
    assert!(
        !is_fsd_mount(&env.mountpoint),
        "still mounted after SIGTERM"
    );
    assert_clean(&tally, missing, &env);
}
