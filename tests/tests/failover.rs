//! Failover with real processes: `lode-fsd` hands its /dev/fuse descriptor to
//! a supervisor (here in-process), is killed with SIGKILL while readers keep
//! reading, and a successor started with `--takeover` serves the same mount.
//! Readers must see no error and no wrong byte, and the mount must never
//! leave the mount table. Also: a hot upgrade (the first daemon leaves on
//! SIGUSR2 after the successor took over) and a refused plain start on a
//! mount a supervisor keeps.
//!
//! `LODE_FAILOVER_ITERATIONS=N` runs N kill/takeover cycles instead of 20.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lode_common::supervisor::SupervisorServer;
use lode_tests::lode::{force_unmount, is_fsd_mount};
use lode_tests::{
    bin_path, fuse_available, pseudo_random_bytes, require_root, skip_unless, wait_until, Layer,
    OciLayoutBuilder, TarEntry,
};

const TAG: &str = "v1";
const FILES: u64 = 24;
const READ_SIZE: usize = 128 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a reader may go without completing a read after a takeover.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

fn file_len(i: u64) -> usize {
    // 192 KiB to ~2.4 MiB, several 64 KiB chunks and 128 KiB reads each.
    (192 * 1024 + i * 97 * 1024) as usize
}

fn file_content(i: u64) -> Vec<u8> {
    pseudo_random_bytes(1000 + i, 0, file_len(i))
}

struct Image {
    _dir: tempfile::TempDir,
    bootstrap: PathBuf,
    blob_source: String,
    cache: PathBuf,
}

fn build_image(lodectl: &Path) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let target = dir.path().join("target");
    let entries = (0..FILES)
        .map(|i| TarEntry::file(format!("data/f{i:02}"), file_content(i)))
        .collect();
    OciLayoutBuilder::new()
        .layer(Layer::gzip(entries))
        .write(&source, TAG)
        .expect("write OCI layout");
    let bootstrap = dir.path().join("bootstrap");
    let out = Command::new(lodectl)
        .arg("convert")
        .arg("--chunk-size")
        .arg("64K")
        .arg("--bootstrap-out")
        .arg(&bootstrap)
        .arg(format!("oci:{}:{TAG}", source.display()))
        .arg(format!("oci:{}:{TAG}", target.display()))
        .output()
        .expect("run lodectl convert");
    assert!(
        out.status.success(),
        "lodectl convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    Image {
        blob_source: format!("dir://{}", target.join("blobs/sha256").display()),
        bootstrap,
        cache,
        _dir: dir,
    }
}

/// One `lode-fsd` process of the test.
struct Fsd {
    child: Child,
}

impl Fsd {
    fn spawn(bin: &Path, image: &Image, env: &Env, takeover: bool) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&env.log)
            .unwrap();
        let mut command = Command::new(bin);
        command
            .arg("--bootstrap")
            .arg(&image.bootstrap)
            .arg("--blob-source")
            .arg(&image.blob_source)
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
        if takeover {
            command.arg("--takeover");
        }
        command.spawn().expect("start lode-fsd")
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

/// Set in the environment of the reader process: `MOUNTPOINT|THREADS|STATUS`.
const READER_ENV: &str = "LODE_FAILOVER_READER";

/// CLOCK_MONOTONIC in nanoseconds: the clock both processes share.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid `t`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(r, 0, "clock_gettime");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What the readers saw. Read calls that took over 2 ms are kept (start and
/// end, monotonic ns) for the pause figures.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    slow: Mutex<Vec<(u64, u64)>>,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn encode(&self) -> String {
        let mut text = format!(
            "reads {}\nerrors {}\nwrong {}\n",
            self.reads.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.wrong.load(Ordering::Relaxed)
        );
        if let Some(e) = self.first_error.lock().unwrap().as_ref() {
            text.push_str(&format!("first_error {}\n", e.replace('\n', " ")));
        }
        for (start, end) in self.slow.lock().unwrap().iter() {
            text.push_str(&format!("slow {start} {end}\n"));
        }
        text
    }

    fn decode(text: &str) -> Self {
        let tally = Tally::default();
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let number = || value.parse::<u64>().unwrap_or(0);
            match key {
                "reads" => tally.reads.store(number(), Ordering::Relaxed),
                "errors" => tally.errors.store(number(), Ordering::Relaxed),
                "wrong" => tally.wrong.store(number(), Ordering::Relaxed),
                "first_error" => *tally.first_error.lock().unwrap() = Some(value.to_string()),
                "slow" => {
                    if let Some((a, b)) = value.split_once(' ') {
                        let (a, b) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                        tally.slow.lock().unwrap().push((a, b));
                    }
                }
                _ => {}
            }
        }
        tally
    }
}

/// Reader threads in a process of their own (this test binary, run with
/// [`READER_ENV`]): a thread blocked on the mount while no daemon serves it
/// must never share an address space with the test, which has to start the
/// successor (a fork and exec) during exactly that time. Each thread reads
/// every file in 128 KiB reads, compares the bytes and drops the file from
/// the page cache, so every pass reaches the daemon. The process writes its
/// tally to a status file every few milliseconds until it is killed.
struct Readers {
    child: Child,
    status: PathBuf,
    _dir: tempfile::TempDir,
}

impl Readers {
    fn start(mountpoint: &Path, count: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("status");
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "reader_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                READER_ENV,
                format!("{}|{count}|{}", mountpoint.display(), status.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            status,
            _dir: dir,
        }
    }

    fn tally(&self) -> Tally {
        Tally::decode(&std::fs::read_to_string(&self.status).unwrap_or_default())
    }

    fn reads(&self) -> u64 {
        self.tally().reads.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more reads complete.
    fn wait_progress(&self, n: u64, what: &str) {
        let from = self.reads();
        wait_until(PROGRESS_TIMEOUT, what, || self.reads() >= from + n)
            .unwrap_or_else(|e| panic!("readers stuck: {e}"));
    }

    fn stop(mut self) -> Tally {
        // The last status write is at most a few ms old; let one more land.
        let last = self.tally().reads.load(Ordering::Relaxed);
        let _ = wait_until(Duration::from_secs(2), "a final status", || {
            self.reads() > last
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.tally()
    }
}

/// The reader process's entry (see [`Readers`]); returns at once in
/// ordinary test runs.
#[test]
fn reader_process() {
    let Ok(spec) = std::env::var(READER_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (Some(mountpoint), Some(count), Some(status)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {READER_ENV}: {spec}");
    };
    let count: u64 = count.parse().unwrap();
    let tally = Arc::new(Tally::default());
    let expected: Arc<Vec<Vec<u8>>> = Arc::new((0..FILES).map(file_content).collect());
    for t in 0..count {
        let (tally, expected) = (tally.clone(), expected.clone());
        let dir = Path::new(mountpoint).join("data");
        std::thread::spawn(move || {
            let mut i = t;
            loop {
                let n = i % FILES;
                read_file(&dir.join(format!("f{n:02}")), &expected[n as usize], &tally);
                i += 1;
            }
        });
    }
    let tmp = format!("{status}.tmp");
    loop {
        std::fs::write(&tmp, tally.encode()).unwrap();
        std::fs::rename(&tmp, status).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_file(path: &Path, expected: &[u8], tally: &Tally) {
    let fail = |what: String| {
        tally.errors.fetch_add(1, Ordering::Relaxed);
        tally
            .first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| what);
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(format!("open {}: {e}", path.display())),
    };
    let mut buf = vec![0u8; READ_SIZE];
    let mut offset = 0usize;
    while offset < expected.len() {
        let start = monotonic_ns();
        let got = file.read_at(&mut buf, offset as u64);
        let end = monotonic_ns();
        if end - start > 2_000_000 {
            tally.slow.lock().unwrap().push((start, end));
        }
        match got {
            Ok(0) => return fail(format!("{}: early EOF at {offset}", path.display())),
            Ok(n) => {
                if expected.get(offset..offset + n) != Some(&buf[..n]) {
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                    return fail(format!("{}: wrong bytes at {offset}", path.display()));
                }
                tally.reads.fetch_add(1, Ordering::Relaxed);
                offset += n;
            }
            Err(e) => return fail(format!("read {} at {offset}: {e}", path.display())),
        }
    }
    // SAFETY: a valid descriptor; fadvise only drops clean cached pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Watches the mount table; counts the times the mount was missing.
struct MountWatch {
    stop: Arc<AtomicBool>,
    missing: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl MountWatch {
    fn start(mountpoint: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(AtomicU64::new(0));
        let (s, m, path) = (stop.clone(), missing.clone(), mountpoint.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if !is_fsd_mount(&path) {
                    m.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::yield_now();
            }
        });
        Self {
            stop,
            missing,
            thread,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.missing.load(Ordering::Relaxed)
    }
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

/// How long readers were blocked by the outage that began at `kill`: the
/// longest wait of a read in progress at `kill` or started before `served`
/// (monotonic ns).
fn pause(slow: &[(u64, u64)], kill: u64, served: u64) -> Duration {
    slow.iter()
        .filter(|&&(start, end)| end > kill && start < served)
        .map(|&(start, end)| Duration::from_nanos(end - start.max(kill)))
        .max()
        .unwrap_or_default()
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
    let iterations: usize = std::env::var("LODE_FAILOVER_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let image = build_image(&lodectl);
    let env = Env::new();
    let mut daemon = Fsd::start(&fsd, &image, &env, false);
    let watch = MountWatch::start(&env.mountpoint);
    let readers = Readers::start(&env.mountpoint, 3);
    readers.wait_progress(50, "first reads");

    let mut outages = Vec::with_capacity(iterations);
    let mut killed = Vec::with_capacity(iterations);
    for i in 0..iterations {
        readers.wait_progress(20, "reads before the kill");
        let kill = monotonic_ns();
        killed.push(daemon.kill());
        assert!(
            is_fsd_mount(&env.mountpoint),
            "mount gone after SIGKILL {i}"
        );
        if i == 0 {
            // A plain start must not mount over the kept mount.
            let mut plain = Fsd::spawn(&fsd, &image, &env, false);
            let status = plain.wait().unwrap();
            assert!(!status.success(), "plain start over a kept mount succeeded");
            assert!(
                env.log_text().contains("--takeover"),
                "no hint to take over: {}",
                env.log_text()
            );
        }
        daemon = Fsd::start(&fsd, &image, &env, true);
        let served = monotonic_ns();
        readers.wait_progress(20, "reads after the takeover");
        outages.push((kill, served));
    }
    let tally = readers.stop();
    let missing = watch.stop();
    for mut child in killed {
        child.wait().expect("reap a killed lode-fsd");
    }
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait().success(), "{}", env.log_text());
    assert!(
        !is_fsd_mount(&env.mountpoint),
        "still mounted after SIGTERM"
    );

    let slow = tally.slow.lock().unwrap().clone();
    let mut pauses: Vec<Duration> = outages
        .iter()
        .map(|&(kill, served)| pause(&slow, kill, served))
        .collect();
    pauses.sort();
    let restart: Vec<Duration> = outages
        .iter()
        .map(|&(k, s)| Duration::from_nanos(s - k))
        .collect();
    println!(
        "failover: {iterations} SIGKILL/takeover cycles, {} reads of {} KiB, {} errors, {} wrong; \
         reader pause median {:?} max {:?}; kill-to-served max {:?}",
        tally.reads.load(Ordering::Relaxed),
        READ_SIZE / 1024,
        tally.errors.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        restart.iter().max().unwrap(),
    );
    assert_clean(&tally, missing, &env);
}

#[test]
fn hot_upgrade_hands_a_live_mount_to_a_successor() {
    let Some((fsd, lodectl)) = prerequisites() else {
        return;
    };
    let image = build_image(&lodectl);
    let env = Env::new();
    let old = Fsd::start(&fsd, &image, &env, false);
    let watch = MountWatch::start(&env.mountpoint);
    let readers = Readers::start(&env.mountpoint, 3);
    readers.wait_progress(50, "reads from the first daemon");

    // Both serve the connection for a while; then the old one leaves.
    let new = Fsd::start(&fsd, &image, &env, true);
    readers.wait_progress(20, "reads with both daemons");
    old.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(old.wait().success(), "{}", env.log_text());
    readers.wait_progress(50, "reads from the successor alone");

    let tally = readers.stop();
    let missing = watch.stop();
    assert_eq!(
        env.supervisor.state("failover").map(|s| s.pid),
        Some(new.child.id()),
        "the supervisor should hold the successor's state"
    );
    new.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(new.wait().success(), "{}", env.log_text());
    assert!(
        env.supervisor.state("failover").is_none(),
        "a clean stop should clear the supervisor's state"
    );
    assert_clean(&tally, missing, &env);
}
