//! Faults on disk, with real components, under `lode-fsd` in every mode:
//! - the chunk cache on a filesystem that fills up (a 1 MiB tmpfs): reads
//!   go on being served, verified, uncached; the failures are counted and
//!   logged once, not once per chunk;
//! - the cache files of a mounted image removed (as the snapshotter's size
//!   limit does): the daemon lets them go, so their space is freed, and
//!   serves the image's files correctly again, fetching them anew.
//!
//! Root only (FUSE, tmpfs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lode_tests::failover::{file_content, file_name, push_image, FILES};
use lode_tests::lode::{
    cache_disk_bytes, remove_cached_blobs, removed_cache_files_held, Mode, ModeFsd,
};
use lode_tests::{bounded, lode_prerequisites, Registry};

const HANG_GUARD: Duration = Duration::from_secs(60);
/// The log line of a failed cache write.
const CACHE_FAILURE_LINE: &str = "cannot cache chunks";

lode_tests::every_mode!(full_cache_disk, removed_cache_files);

/// The daemon's `cache.flush_interval_ms` (default): how often it looks
/// for removed cache files.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Reads every file of the image under `fsd` (from the daemon, not the
/// kernel's page cache) and checks its bytes.
fn read_all(fsd: &ModeFsd, what: &str) {
    let mode = fsd.mode();
    for file in 0..FILES {
        let path = fsd.join(file_name(file));
        let data = bounded(HANG_GUARD, "reading a file", move || {
            drop_page_cache(&path);
            std::fs::read(&path)
        })
        .unwrap_or_else(|e| panic!("[{mode}] {what}: file {file}: {e}"));
        assert!(
            data == file_content(file),
            "[{mode}] {what}: file {file}: wrong bytes"
        );
    }
}

fn removed_cache_files(mode: Mode) {
    let Some(bins) = lode_prerequisites() else {
        return;
    };
    let registry = Registry::start().expect("start docker-registry");
    let image = push_image(&bins.lodectl, &registry, "evicted");
    let fsd = ModeFsd::start(&bins.fsd, mode, &image.fsd_options(None), false)
        .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"));
    let pid = fsd.pid().expect("the daemon's pid") as u32;

    read_all(&fsd, "first read");
    let first = fsd.settled_counters().unwrap();
    let cached = cache_disk_bytes(&image.cache);
    assert!(cached > 1 << 20, "[{mode}] {cached} bytes cached");

    // The files go while the image is mounted and its blob open.
    let removed = remove_cached_blobs(&image.cache).unwrap();
    assert!(removed >= 1, "[{mode}] no cached blob to remove");
    assert!(removed_cache_files_held(&[pid], &image.cache) > 0);
    let start = std::time::Instant::now();
    lode_tests::wait_until(
        FLUSH_INTERVAL * 5,
        "the daemon to let the removed cache files go",
        || removed_cache_files_held(&[pid], &image.cache) == 0,
    )
    .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", fsd.log_text()));
    let let_go = start.elapsed();

    read_all(&fsd, "after the cache files were removed");
    let second = fsd.settled_counters().unwrap();
    let refetched = second.backend_bytes - first.backend_bytes;
    eprintln!(
        "[{mode}] {cached} cached bytes removed under a mounted image: let go after {let_go:?}; \
         every file read correctly again, {refetched} bytes fetched anew"
    );
    assert!(
        refetched >= first.backend_bytes / 2,
        "[{mode}] {refetched} bytes fetched again of {} (the removed cache still served?)",
        first.backend_bytes
    );
    assert_eq!(second.digest_errors, 0, "[{mode}] {second:?}");
    assert!(
        cache_disk_bytes(&image.cache) > 1 << 20,
        "[{mode}] the blob was not cached afresh"
    );
}

/// A tmpfs of `size` at `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount a tmpfs at {}: {e}", path.display()));
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn full_cache_disk(mode: Mode) {
    let Some(bins) = lode_prerequisites() else {
        return;
    };
    let registry = Registry::start().expect("start docker-registry");
    let image = push_image(&bins.lodectl, &registry, "diskfull");
    let work = tempfile::tempdir().unwrap();
    let cache = Tmpfs::mount(&work.path().join("cache"), "1m");
    let mut options = image.fsd_options(None);
    options.cache_dir = cache.0.clone();
    let fsd = ModeFsd::start(&bins.fsd, mode, &options, false)
        .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"));

    let mut read = 0;
    for file in 0..FILES {
        let path = fsd.join(file_name(file));
        let what = format!("reading {}", path.display());
        let data = bounded(HANG_GUARD, &what, move || std::fs::read(&path))
            .unwrap_or_else(|e| panic!("[{mode}] file {file} with the cache disk full: {e}"));
        assert!(
            data == file_content(file),
            "[{mode}] file {file}: wrong bytes"
        );
        read += data.len();
    }
    let counters = fsd
        .settled_counters()
        .unwrap_or_else(|e| panic!("[{mode}] counters: {e}"));
    let lines = fsd.log_text().matches(CACHE_FAILURE_LINE).count();
    eprintln!(
        "[{mode}] {read} B read correctly through a 1 MiB cache: {} chunks not cached, {lines} log line(s)",
        counters.cache_write_errors
    );
    assert!(
        counters.cache_write_errors > 10,
        "[{mode}] the full cache disk was not counted: {counters:?}"
    );
    assert_eq!(counters.digest_errors, 0, "[{mode}] {counters:?}");
    assert_eq!(
        lines,
        1,
        "[{mode}] one line for {} failed cache writes:\n{}",
        counters.cache_write_errors,
        fsd.log_text()
    );
    // Served from the registry again, verified, after the page cache goes.
    let path = fsd.join("data/f00");
    let again = bounded(HANG_GUARD, "reading f00 again", move || {
        drop_page_cache(&path);
        std::fs::read(&path)
    })
    .unwrap_or_else(|e| panic!("[{mode}] f00 again: {e}"));
    assert!(again == file_content(0), "[{mode}] f00 again: wrong bytes");
}

/// Asks the kernel to drop `path`'s cached pages.
fn drop_page_cache(path: &Path) {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a valid open descriptor; advice only.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}
