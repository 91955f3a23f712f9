//! Kit for failover tests: a small image whose every byte is known
//! (converted locally, or pushed to a registry and converted there), reader
//! threads in a process of their own that verify those bytes while daemons
//! are killed and replaced, a watch on the mount table, and the pause
//! figures computed from what the readers saw.
//!
//! A test binary that uses [`Readers`] must contain the reader entry:
//!
//! ```ignore
//! #[test]
//! fn reader_process() {
//!     lode_tests::failover::reader_process();
//! }
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lode_common::registry::Reference;

use crate::lode::{fetch_bootstrap, is_fsd_mount, FsdOptions, Lodectl};
use crate::{
    pseudo_random_bytes, skopeo_copy, wait_until, Layer, OciLayoutBuilder, Registry, TarEntry,
};

pub const TAG: &str = "v1";
pub const FILES: u64 = 24;
pub const READ_SIZE: usize = 128 * 1024;
/// Longest a reader may go without completing a read after a takeover.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

pub fn file_len(i: u64) -> usize {
    // 192 KiB to ~2.4 MiB, several 64 KiB chunks and 128 KiB reads each.
    (192 * 1024 + i * 97 * 1024) as usize
}

pub fn file_content(i: u64) -> Vec<u8> {
    pseudo_random_bytes(1000 + i, 0, file_len(i))
}

/// The converted test image: [`FILES`] files `data/fNN` of [`file_content`].
pub struct Image {
    _dir: tempfile::TempDir,
    pub bootstrap: PathBuf,
    /// `dir://` source of its data blobs.
    pub blob_source: String,
    /// An empty cache directory for the daemons serving it.
    pub cache: PathBuf,
}

/// The path of file `i` in the image, `data/fNN`.
pub fn file_name(i: u64) -> String {
    format!("data/f{i:02}")
}

/// The image's layer: [`FILES`] files [`file_name`] of [`file_content`].
pub fn image_entries() -> Vec<TarEntry> {
    (0..FILES)
        .map(|i| TarEntry::file(file_name(i), file_content(i)))
        .collect()
}

/// Builds and converts the image with `lodectl` (no registry needed).
pub fn build_image(lodectl: &Path) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let target = dir.path().join("target");
    OciLayoutBuilder::new()
        .layer(Layer::gzip(image_entries()))
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

/// The test image pushed to a registry and converted there.
pub struct RegistryImage {
    _dir: tempfile::TempDir,
    /// The Lode image.
    pub reference: Reference,
    pub bootstrap: PathBuf,
    /// `registry://` source of its data blobs.
    pub blob_source: String,
    /// An empty cache directory for the daemons serving it.
    pub cache: PathBuf,
}

impl RegistryImage {
    /// Writes to `dir` and returns an `lode-fsd` configuration for fault
    /// tests: reads fail after `deadline`, the registry client retries
    /// once with a 2 s timeout, and only the chunks read are fetched (no
    /// readahead, no neighbours), so that every file is cold until read
    /// and nothing is fetched while a test waits.
    pub fn cold_fsd_config(&self, dir: &Path, deadline: Duration) -> PathBuf {
        let config = dir.join("fsd.toml");
        std::fs::write(
            &config,
            format!(
                "[fetch]\ndeadline_secs = {}\nreadahead_bytes = 0\nmerge_limit_bytes = 65536\n\
                 [registry]\nrequest_timeout_secs = 2\nmax_retries = 1\n",
                deadline.as_secs()
            ),
        )
        .unwrap();
        config
    }

    /// `lode-fsd` options serving the image from the registry.
    pub fn fsd_options(&self, config: Option<PathBuf>) -> FsdOptions {
        FsdOptions {
            bootstrap: self.bootstrap.clone(),
            blob_source: self.blob_source.clone(),
            cache_dir: self.cache.clone(),
            config,
            plain_http: true,
        }
    }
}

/// Pushes the image to `registry` as `repo:v1` with `skopeo` and converts
/// it there with `lodectl convert` (64 KiB chunks) to `repo-lode:v1`.
pub fn push_image(lodectl: &Lodectl, registry: &Registry, repo: &str) -> RegistryImage {
    push_listed_image(lodectl, registry, repo, None)
}

/// [`push_image`], converted with `prefetch` (the text of a prefetch list)
/// if given.
pub fn push_listed_image(
    lodectl: &Lodectl,
    registry: &Registry,
    repo: &str,
    prefetch: Option<&str>,
) -> RegistryImage {
    push_layered_image(lodectl, registry, repo, prefetch, 1)
}

/// [`push_listed_image`] with the files dealt over `layers` layers (file
/// `i` in layer `i % layers`), so that the Lode image has as many data
/// blobs.
pub fn push_layered_image(
    lodectl: &Lodectl,
    registry: &Registry,
    repo: &str,
    prefetch: Option<&str>,
    layers: usize,
) -> RegistryImage {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let mut dealt: Vec<Vec<TarEntry>> = vec![Vec::new(); layers.max(1)];
    for (i, entry) in image_entries().into_iter().enumerate() {
        dealt[i % layers.max(1)].push(entry);
    }
    dealt
        .into_iter()
        .fold(OciLayoutBuilder::new(), |builder, entries| {
            builder.layer(Layer::gzip(entries))
        })
        .write(&layout, TAG)
        .expect("write OCI layout");
    let source = registry.reference(&format!("{repo}:{TAG}"));
    skopeo_copy(&layout, TAG, &source).expect("skopeo copy");
    let reference = registry.reference(&format!("{repo}-lode:{TAG}"));
    let list = dir.path().join("prefetch.list");
    if let Some(text) = prefetch {
        std::fs::write(&list, text).unwrap();
    }
    lodectl
        .convert(
            &source,
            &reference,
            Some(64 * 1024),
            prefetch.map(|_| list.as_path()),
        )
        .expect("lodectl convert");
    let (_, bootstrap) = fetch_bootstrap(&reference, dir.path()).expect("fetch the bootstrap");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    RegistryImage {
        blob_source: format!("registry://{}/{repo}-lode", registry.host()),
        reference,
        bootstrap,
        cache,
        _dir: dir,
    }
}

/// Set in the environment of the reader process: `MOUNTPOINT|THREADS|STATUS`.
const READER_ENV: &str = "LODE_FAILOVER_READER";

/// CLOCK_MONOTONIC in nanoseconds: the clock both processes share.
pub fn monotonic_ns() -> u64 {
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
pub struct Tally {
    pub reads: AtomicU64,
    pub errors: AtomicU64,
    pub wrong: AtomicU64,
    pub slow: Mutex<Vec<(u64, u64)>>,
    pub first_error: Mutex<Option<String>>,
    /// Reads completed by each reader thread.
    pub per_thread: Vec<AtomicU64>,
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
        for reads in &self.per_thread {
            text.push_str(&format!("thread {}\n", reads.load(Ordering::Relaxed)));
        }
        text
    }

    fn decode(text: &str) -> Self {
        let mut tally = Tally::default();
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let number = || value.parse::<u64>().unwrap_or(0);
            match key {
                "reads" => tally.reads.store(number(), Ordering::Relaxed),
                "errors" => tally.errors.store(number(), Ordering::Relaxed),
                "wrong" => tally.wrong.store(number(), Ordering::Relaxed),
                "first_error" => *tally.first_error.lock().unwrap() = Some(value.to_string()),
                "thread" => tally.per_thread.push(AtomicU64::new(number())),
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
pub struct Readers {
    child: Child,
    status: PathBuf,
    _dir: tempfile::TempDir,
}

impl Readers {
    /// Starts `count` reader threads on `mountpoint/data/`.
    pub fn start(mountpoint: &Path, count: u64) -> Self {
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

    pub fn tally(&self) -> Tally {
        Tally::decode(&std::fs::read_to_string(&self.status).unwrap_or_default())
    }

    pub fn reads(&self) -> u64 {
        self.tally().reads.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more reads complete.
    pub fn wait_progress(&self, n: u64, what: &str) {
        let from = self.reads();
        wait_until(PROGRESS_TIMEOUT, what, || self.reads() >= from + n)
            .unwrap_or_else(|e| panic!("readers stuck: {e}"));
    }

    /// Waits until every reader thread completes at least `n` more reads:
    /// one read left hanging shows here, while the others keep the total
    /// growing.
    pub fn wait_each_progress(&self, n: u64, what: &str) {
        let counts = |t: &Tally| -> Vec<u64> {
            t.per_thread
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect()
        };
        let from = counts(&self.tally());
        wait_until(PROGRESS_TIMEOUT, what, || {
            let now = counts(&self.tally());
            now.len() == from.len() && now.iter().zip(&from).all(|(a, b)| *a >= b + n)
        })
        .unwrap_or_else(|e| panic!("a reader is stuck: {e}"));
    }

    pub fn stop(mut self) -> Tally {
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

/// The reader process's entry (see [`Readers`]); returns at once unless
/// this process was started as a reader.
pub fn reader_process() {
    let Ok(spec) = std::env::var(READER_ENV) else {
        return;
    };
    let mut parts = spec.split('|');
    let (Some(mountpoint), Some(count), Some(status)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {READER_ENV}: {spec}");
    };
    let count: u64 = count.parse().unwrap();
    let tally = Arc::new(Tally {
        per_thread: (0..count).map(|_| AtomicU64::new(0)).collect(),
        ..Tally::default()
    });
    let expected: Arc<Vec<Vec<u8>>> = Arc::new((0..FILES).map(file_content).collect());
    for t in 0..count {
        let (tally, expected) = (tally.clone(), expected.clone());
        let dir = Path::new(mountpoint).join("data");
        std::thread::spawn(move || {
            let mut i = t;
            loop {
                let n = i % FILES;
                read_file(
                    &dir.join(format!("f{n:02}")),
                    &expected[n as usize],
                    &tally,
                    t,
                );
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

fn read_file(path: &Path, expected: &[u8], tally: &Tally, thread: u64) {
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
                tally.per_thread[thread as usize].fetch_add(1, Ordering::Relaxed);
                offset += n;
            }
            Err(e) => return fail(format!("read {} at {offset}: {e}", path.display())),
        }
    }
    // SAFETY: a valid descriptor; fadvise only drops clean cached pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Watches the mount table; counts the times the mount was missing. It
/// samples every millisecond rather than spinning: a spinning watch takes
/// a whole core from the daemons whose start-up the tests time.
pub struct MountWatch {
    stop: Arc<AtomicBool>,
    missing: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl MountWatch {
    pub fn start(mountpoint: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let missing = Arc::new(AtomicU64::new(0));
        let (s, m, path) = (stop.clone(), missing.clone(), mountpoint.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if !is_fsd_mount(&path) {
                    m.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            stop,
            missing,
            thread,
        }
    }

    /// Stops the watch; returns how often the mount was missing.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.missing.load(Ordering::Relaxed)
    }
}

/// How long readers were blocked by the outage that began at `kill`: the
/// longest wait of a read in progress at `kill` or started before `served`
/// (monotonic ns).
pub fn pause(slow: &[(u64, u64)], kill: u64, served: u64) -> Duration {
    slow.iter()
        .filter(|&&(start, end)| end > kill && start < served)
        .map(|&(start, end)| Duration::from_nanos(end - start.max(kill)))
        .max()
        .unwrap_or_default()
}
