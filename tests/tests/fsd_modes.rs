//! The same behaviour from `lode-fsd` in each of its modes: standalone,
//! dedicated (one instance through the API) and shared (the instance as a
//! subdirectory of the mount). Every test runs once per mode
//! (`verified_reads::shared` and so on) but three about the API's instances
//! (dedicated and shared only, or shared only); the image is the failover
//! kit's, converted with `lodectl convert` in a throw-away `docker-registry`
//! and read from there.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use lode_common::api::AheadRequest;
use lode_common::format::Bootstrap;
use lode_common::image::BlobFront;
use lode_common::Digest;
use lode_tests::failover::{
    file_content, file_len, file_name, push_layered_image, MountWatch, Readers, RegistryImage,
    Tally, FILES,
};
use lode_tests::lode::{
    cache_durable, data_blobs, file_chunks, proc_stat_fields, process_alive, request_metrics,
    ChunkLocation, Counters, Mode, ModeFsd,
};
use lode_tests::{bounded, lode_prerequisites, wait_until, LodeBinaries, Registry};
use nix::sys::signal::Signal;

/// Guard against a read that never returns.
const HANG_GUARD: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Kill and takeover cycles of the failover test.
const CYCLES: usize = 3;
const FLUSH_INTERVAL_MS: u64 = 200;

lode_tests::every_mode!(
    verified_reads,
    metrics_count_reads_and_fetches,
    sigusr1_logs_metrics_and_serves_on,
    sigusr2_leaves_the_mount_to_a_successor,
    sigterm_unmounts_and_exits_0,
    sigkill_and_takeover_lose_no_read,
    cache_survives_sigkill_after_a_flush_interval,
    the_prefetch_list_fetches_the_listed_chunks,
);
// A standalone daemon has no API to be asked with (`DELETE /mount`,
// `PUT /ahead`).
lode_tests::mode_tests!(removed_instance_and_files_held_open: dedicated => Dedicated, shared => Shared);
lode_tests::mode_tests!(fronts_of_two_blobs_fetched_ahead_serve_the_prefetch_list: dedicated => Dedicated, shared => Shared);
lode_tests::mode_tests!(a_front_fetched_ahead_serves_the_prefetch_list: dedicated => Dedicated, shared => Shared);

/// The reader process's entry (see [`Readers`]).
#[test]
fn reader_process() {
    lode_tests::failover::reader_process();
}

/// A registry holding the converted image, and its bootstrap.
struct Fixture {
    bins: LodeBinaries,
    registry: Registry,
    image: RegistryImage,
    bootstrap: Bootstrap,
}

impl Fixture {
    /// `None` (the reason printed) when the machine lacks something.
    fn new() -> Option<Self> {
        Self::listed(None)
    }

    /// The image converted with `prefetch`, a prefetch list's text.
    fn listed(prefetch: Option<&str>) -> Option<Self> {
        Self::layered(prefetch, 1)
    }

    /// [`Fixture::listed`], its files dealt over `layers` layers.
    fn layered(prefetch: Option<&str>, layers: usize) -> Option<Self> {
        let bins = lode_prerequisites()?;
        let registry = Registry::start().expect("start docker-registry");
        let image = push_layered_image(&bins.lodectl, &registry, "modes", prefetch, layers);
        let bootstrap = Bootstrap::open(&image.bootstrap).expect("open the bootstrap");
        Some(Self {
            bins,
            registry,
            image,
            bootstrap,
        })
    }

    fn start(&self, mode: Mode, config: Option<PathBuf>, supervised: bool) -> ModeFsd {
        let options = self.image.fsd_options(config);
        ModeFsd::start(&self.bins.fsd, mode, &options, supervised)
            .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"))
    }

    fn data_blobs(&self) -> Vec<Digest> {
        let blobs = data_blobs(&self.bootstrap).expect("data blobs");
        blobs.into_iter().map(|(digest, _)| digest).collect()
    }

    /// Body bytes the registry has sent of the image's data blobs.
    fn data_bytes_served(&self) -> u64 {
        let requests = self.registry.requests();
        let blobs: Vec<String> = self.data_blobs().iter().map(Digest::hex).collect();
        requests
            .iter()
            .filter(|r| blobs.iter().any(|hex| r.path.contains(hex.as_str())))
            .map(|r| r.bytes)
            .sum()
    }

    /// Successful GETs of the image's data blobs.
    fn data_gets(&self) -> usize {
        let blobs: Vec<String> = self.data_blobs().iter().map(Digest::hex).collect();
        let requests = self.registry.requests();
        let gets = requests.iter().filter(|r| {
            r.method == "GET"
                && r.status / 100 == 2
                && blobs.iter().any(|hex| r.path.contains(hex.as_str()))
        });
        gets.count()
    }

    fn chunks(&self, file: u64) -> Vec<ChunkLocation> {
        file_chunks(&self.bootstrap, file_name(file).as_bytes()).expect("file chunks")
    }
}

/// Reads `path` whole on a guarded thread.
fn read(path: PathBuf) -> std::io::Result<Vec<u8>> {
    let what = format!("reading {}", path.display());
    bounded(HANG_GUARD, &what, move || std::fs::read(&path))
}

/// Reads file `file` of the image and checks every byte.
fn assert_reads(fsd: &ModeFsd, file: u64) {
    let mode = fsd.mode();
    let path = fsd.join(file_name(file));
    let data =
        read(path.clone()).unwrap_or_else(|e| panic!("[{mode}] read {}: {e}", path.display()));
    assert!(
        data == file_content(file),
        "[{mode}] {}: {} bytes read, not the image's {}",
        path.display(),
        data.len(),
        file_len(file)
    );
}

/// Drops `path`'s pages from the page cache, so that the next read reaches
/// the daemon.
fn drop_page_cache(path: &Path) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a valid descriptor; fadvise only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "fadvise {}", path.display());
}

fn assert_eio(result: std::io::Result<Vec<u8>>, what: &str) {
    match result {
        Ok(data) => panic!("{what}: read {} bytes, expected EIO", data.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
}

/// XORs 16 bytes at `offset` of `path` with 0xff (twice restores them).
fn flip(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = [0u8; 16];
    file.read_exact_at(&mut buf, offset).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    file.write_all_at(&buf, offset).unwrap();
    file.sync_all().unwrap();
}

fn counters(fsd: &ModeFsd) -> Counters {
    fsd.settled_counters()
        .unwrap_or_else(|e| panic!("[{}] counters: {e}", fsd.mode()))
}

/// Every file reads back byte for byte; a chunk corrupted in the registry
/// is EIO (counted as a digest error), is fetched again on the next read
/// rather than served from the cache, and reads once repaired.
fn verified_reads(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let victim = FILES - 1;
    let chunks = fx.chunks(victim);
    let bad = chunks[2];
    // Random data is stored raw, so flipped bytes reach the digest check.
    assert!(!bad.compressed, "{bad:?}");
    let blob = fx.registry.blob_path(&bad.blob);
    let middle = bad.offset + u64::from(bad.stored_size) / 2;
    flip(&blob, middle);

    let fsd = fx.start(mode, None, false);
    for file in 0..victim {
        assert_reads(&fsd, file);
    }
    let path = fsd.join(file_name(victim));
    assert_eio(read(path.clone()), &format!("[{mode}] the corrupted file"));
    let first = counters(&fsd).digest_errors;
    assert!(first >= 1, "[{mode}] digest_errors {first}");
    let file = File::open(&path).unwrap();
    let mut head = vec![0u8; chunks[0].uncompressed_size as usize];
    file.read_exact_at(&mut head, 0)
        .unwrap_or_else(|e| panic!("[{mode}] the intact first chunk: {e}"));
    assert!(
        head == file_content(victim)[..head.len()],
        "[{mode}] first chunk"
    );
    drop(file);

    assert_eio(
        read(path.clone()),
        &format!("[{mode}] the corrupted file again"),
    );
    let second = counters(&fsd).digest_errors;
    assert!(
        second > first,
        "[{mode}] digest_errors {first} → {second}: the bad chunk was not fetched again"
    );
    flip(&blob, middle);
    assert_reads(&fsd, victim);
    assert_eq!(
        counters(&fsd).digest_errors,
        second,
        "[{mode}] after repair"
    );
}

/// After reading N bytes the daemon counts N bytes read, and exactly the
/// range requests and bytes the registry logged; a re-read from the cache
/// adds reads but no fetch.
fn metrics_count_reads_and_fetches(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let fsd = fx.start(mode, None, false);
    let (served, gets) = (fx.data_bytes_served(), fx.data_gets());
    let files = 0..4;
    let n: u64 = files.clone().map(|i| file_len(i) as u64).sum();
    let stored: u64 = files
        .clone()
        .flat_map(|i| fx.chunks(i))
        .map(|c| u64::from(c.stored_size))
        .sum();
    for file in files.clone() {
        assert_reads(&fsd, file);
    }
    let after = counters(&fsd);
    println!("[{mode}] after reading {n} bytes: {after:?}");
    assert_eq!(after.bytes_read, n, "[{mode}] bytes_read");
    assert_eq!(
        after.backend_bytes,
        fx.data_bytes_served() - served,
        "[{mode}] backend bytes vs the registry's access log"
    );
    assert_eq!(
        after.backend_requests as usize,
        fx.data_gets() - gets,
        "[{mode}] backend requests vs the registry's access log"
    );
    assert!(
        after.backend_bytes >= stored,
        "[{mode}] {} backend bytes for {stored} stored bytes read",
        after.backend_bytes
    );
    assert_eq!(
        (after.backend_errors, after.digest_errors),
        (0, 0),
        "[{mode}] errors"
    );

    for file in files.clone() {
        drop_page_cache(&fsd.join(file_name(file)));
        assert_reads(&fsd, file);
    }
    let again = counters(&fsd);
    assert_eq!(
        again.bytes_read,
        2 * n,
        "[{mode}] bytes_read after a re-read"
    );
    assert_eq!(
        (again.backend_requests, again.backend_bytes),
        (after.backend_requests, after.backend_bytes),
        "[{mode}] a re-read of cached chunks fetched"
    );
}

/// SIGUSR1 logs the metrics as a JSON line, and the daemon serves on.
fn sigusr1_logs_metrics_and_serves_on(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let fsd = fx.start(mode, None, false);
    assert_reads(&fsd, 0);
    let pid = fsd.pid().unwrap();
    let logged = request_metrics(pid, &fsd.log())
        .unwrap_or_else(|e| panic!("[{mode}] SIGUSR1 logged no metrics: {e}"));
    assert!(
        logged["bytes_read"].as_u64() >= Some(file_len(0) as u64),
        "[{mode}] logged metrics: {logged}"
    );
    assert!(process_alive(pid), "[{mode}] gone after SIGUSR1");
    assert_reads(&fsd, 1);
}

/// With a supervisor, SIGUSR2 exits 0 without unmounting, and a successor
/// started with `--takeover` serves the mount.
fn sigusr2_leaves_the_mount_to_a_successor(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let mut fsd = fx.start(mode, None, true);
    assert_reads(&fsd, 0);
    fsd.signal(Signal::SIGUSR2).unwrap();
    let status = fsd.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(
        status.success(),
        "[{mode}] SIGUSR2: lode-fsd exited with {status}, expected 0 (exit without unmounting)"
    );
    assert!(fsd.is_mounted(), "[{mode}] SIGUSR2 unmounted");
    fsd.take_over()
        .unwrap_or_else(|e| panic!("[{mode}] take over after SIGUSR2: {e}"));
    assert_reads(&fsd, 1);
    drop_page_cache(&fsd.join(file_name(0)));
    assert_reads(&fsd, 0);
}

/// SIGTERM unmounts and exits 0.
fn sigterm_unmounts_and_exits_0(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let mut fsd = fx.start(mode, None, true);
    assert_reads(&fsd, 0);
    fsd.signal(Signal::SIGTERM).unwrap();
    let status = fsd.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "[{mode}] SIGTERM: exited with {status}");
    assert!(!fsd.is_mounted(), "[{mode}] still mounted after SIGTERM");
}

fn assert_clean(mode: Mode, tally: &Tally, missing: u64, fsd: &ModeFsd) {
    assert!(tally.reads.load(Ordering::Relaxed) > 0, "[{mode}] no reads");
    assert_eq!(
        tally.errors.load(Ordering::Relaxed),
        0,
        "[{mode}] read errors; first: {:?}\n{}",
        tally.first_error.lock().unwrap(),
        fsd.log_text()
    );
    assert_eq!(
        tally.wrong.load(Ordering::Relaxed),
        0,
        "[{mode}] wrong bytes"
    );
    assert_eq!(missing, 0, "[{mode}] the mount left the mount table");
}

/// Readers run while the daemon is killed with SIGKILL and a successor
/// takes over, [`CYCLES`] times: no error, no wrong byte, and the mount
/// never leaves the mount table.
fn sigkill_and_takeover_lose_no_read(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let mut fsd = fx.start(mode, None, true);
    let watch = MountWatch::start(fsd.mountpoint());
    let readers = Readers::start(&fsd.root(), 3);
    readers.wait_progress(50, "reads from the first daemon");
    for cycle in 0..CYCLES {
        readers.wait_progress(20, "reads before the kill");
        fsd.kill().unwrap();
        assert!(
            fsd.is_mounted(),
            "[{mode}] mount gone after SIGKILL {cycle}"
        );
        fsd.take_over()
            .unwrap_or_else(|e| panic!("[{mode}] takeover {cycle}: {e}"));
        readers.wait_each_progress(1, "every reader after the takeover");
    }
    let tally = readers.stop();
    let missing = watch.stop();
    assert_clean(mode, &tally, missing, &fsd);
    fsd.signal(Signal::SIGTERM).unwrap();
    let status = fsd.wait_exit(EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "[{mode}] SIGTERM: exited with {status}");
}

/// Chunks read are made durable within a few flush intervals, so a
/// successor after a SIGKILL serves them again from the cache: the
/// registry sends no byte of a data blob for the re-read.
fn cache_survives_sigkill_after_a_flush_interval(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("fsd.toml");
    let text = format!("[cache]\nflush_interval_ms = {FLUSH_INTERVAL_MS}\n");
    std::fs::write(&config, text).unwrap();
    let mut fsd = fx.start(mode, Some(config), true);
    let files = 0..8;
    for file in files.clone() {
        assert_reads(&fsd, file);
    }
    // The cache's presence maps say what a successor will find; a chunk is
    // marked there only after a flush made its bytes durable.
    let chunks: Vec<ChunkLocation> = files.clone().flat_map(|i| fx.chunks(i)).collect();
    let durable = || {
        chunks
            .iter()
            .filter(|c| cache_durable(&fx.image.cache, c))
            .count()
    };
    let limit = Duration::from_millis(25 * FLUSH_INTERVAL_MS);
    let flushed = wait_until(limit, "the chunks read to be durable", || {
        durable() == chunks.len()
    });
    assert!(
        flushed.is_ok(),
        "[{mode}] {} of {} chunks read are durable {limit:?} after the reads \
         (flush_interval_ms = {FLUSH_INTERVAL_MS}): no periodic flush",
        durable(),
        chunks.len()
    );

    fsd.kill().unwrap();
    fsd.take_over()
        .unwrap_or_else(|e| panic!("[{mode}] takeover: {e}"));
    let served = fx.data_bytes_served();
    for file in files.clone() {
        drop_page_cache(&fsd.join(file_name(file)));
        assert_reads(&fsd, file);
    }
    let n: u64 = files.map(|i| file_len(i) as u64).sum();
    let successor = counters(&fsd);
    assert!(
        successor.bytes_read >= n,
        "[{mode}] the re-read did not reach the successor: {successor:?}"
    );
    assert_eq!(
        fx.data_bytes_served() - served,
        0,
        "[{mode}] data blob bytes the registry sent for the re-read"
    );
}

/// An image converted with a list of byte ranges: from the mount on, before
/// any read, the daemon fetches the chunks that hold them and nothing else,
/// and the converter has put those chunks at the front of their blob in
/// list order, so they come in one request. Reads of them are correct.
fn the_prefetch_list_fetches_the_listed_chunks(mode: Mode) {
    let Some((fx, listed)) = listed_fixture() else {
        return;
    };
    let mut offset = 0;
    for chunk in &listed {
        assert_eq!(
            chunk.offset, offset,
            "[{mode}] listed chunks lead the blob: {listed:?}"
        );
        offset += u64::from(chunk.stored_size);
    }
    let (served, gets) = (fx.data_bytes_served(), fx.data_gets());
    let fsd = fx.start(mode, None, false);
    wait_until(HANG_GUARD, "the listed chunks to be fetched", || {
        fsd.counters()
            .is_ok_and(|c| c.settled() && c.backend_bytes >= offset)
    })
    .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", fsd.log_text()));
    let after = counters(&fsd);
    assert_eq!(after.bytes_read, 0, "[{mode}] nothing was read");
    assert_eq!(
        (after.backend_bytes, fx.data_bytes_served() - served),
        (offset, offset),
        "[{mode}] the daemon fetched the listed chunks and nothing else"
    );
    assert_eq!(fx.data_gets() - gets, 1, "[{mode}] in one request");
    // The thread that ran it is still 10 nicer than the daemon (the
    // default `fetch.background_nice`): nobody waited for those chunks.
    let pid = fsd.pid().expect("a daemon");
    let background = (nice_of(format!("/proc/{pid}/stat")).unwrap() + 10).min(19);
    let nices = fetch_thread_nices(pid);
    assert!(
        nices.contains(&background),
        "[{mode}] no fetch thread at niceness {background}: {nices:?}"
    );

    assert_listed_read_back(&fsd);
}

/// The image converted with a list of chunks 1 and 2 of f05, then chunk 0
/// of f02 (64 KiB chunks), and those chunks in list order.
fn listed_fixture() -> Option<(Fixture, [ChunkLocation; 3])> {
    layered_listed_fixture(1)
}

/// [`listed_fixture`] with the files dealt over `layers` layers: with two,
/// f02 and f05 lie in different data blobs.
fn layered_listed_fixture(layers: usize) -> Option<(Fixture, [ChunkLocation; 3])> {
    let list = format!("{}\t65536-196608\n{}\t0-1\n", file_name(5), file_name(2));
    let fx = Fixture::layered(Some(&list), layers)?;
    let listed = [fx.chunks(5)[1], fx.chunks(5)[2], fx.chunks(2)[0]];
    Some((fx, listed))
}

/// The listed stretch of f05 (its chunks 1 and 2) reads back.
fn assert_listed_read_back(fsd: &ModeFsd) {
    let file = File::open(fsd.join(file_name(5))).unwrap();
    let mut middle = vec![0u8; 128 * 1024];
    file.read_exact_at(&mut middle, 65536).unwrap();
    assert!(
        middle == file_content(5)[65536..196608],
        "[{}] the listed chunks read back",
        fsd.mode()
    );
}

/// A daemon asked for an image's blob front before the image is mounted
/// (while the snapshotter fetches its bootstrap) fetches it at once; the
/// image, once mounted, takes its prefetch list's chunks from those bytes,
/// verified, so the registry sends them once.
fn a_front_fetched_ahead_serves_the_prefetch_list(mode: Mode) {
    if let Some((fx, listed)) = listed_fixture() {
        fronts_fetched_ahead_serve_the_prefetch_list(mode, &fx, &listed, 1);
    }
}

/// The same with the listed chunks in two data blobs: each blob's front is
/// fetched in a request of its own, and the prefetch takes each chunk from
/// its own blob's bytes.
fn fronts_of_two_blobs_fetched_ahead_serve_the_prefetch_list(mode: Mode) {
    if let Some((fx, listed)) = layered_listed_fixture(2) {
        assert_ne!(listed[0].blob, listed[2].blob, "f05 and f02 in two blobs");
        fronts_fetched_ahead_serve_the_prefetch_list(mode, &fx, &listed, 2);
    }
}

/// Asks a daemon for the fronts of the blobs holding `listed` (the list's
/// chunks, `blobs` blobs of them), then mounts the image.
fn fronts_fetched_ahead_serve_the_prefetch_list(
    mode: Mode,
    fx: &Fixture,
    listed: &[ChunkLocation],
    blobs: usize,
) {
    let fronts: Vec<BlobFront> = data_blobs(&fx.bootstrap)
        .expect("data blobs")
        .into_iter()
        .filter_map(|(digest, size)| {
            let mine = listed.iter().filter(|c| c.blob == digest);
            let bytes: u64 = mine.map(|c| u64::from(c.stored_size)).sum();
            (bytes > 0).then_some(BlobFront {
                digest,
                size,
                bytes,
            })
        })
        .collect();
    assert_eq!(fronts.len(), blobs, "[{mode}] blobs with a front");
    let front: u64 = fronts.iter().map(|f| f.bytes).sum();
    let (served, gets) = (fx.data_bytes_served(), fx.data_gets());
    let options = fx.image.fsd_options(None);
    let fsd = ModeFsd::start_unmounted(&fx.bins.fsd, mode, &options, false)
        .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"));
    let request = AheadRequest {
        config: fsd.instance_config(),
        credentials: None,
        image_ref: None,
        blobs: fronts,
    };
    let api = fsd.api().expect("a managed daemon");
    fsd.block_on("PUT /ahead", api.ahead(&request)).unwrap();
    wait_until(HANG_GUARD, "the fronts to be fetched", || {
        fx.data_bytes_served() - served == front
    })
    .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", fsd.log_text()));
    assert_eq!(fx.data_gets() - gets, blobs, "[{mode}] a request per blob");

    fsd.mount_image().unwrap();
    wait_until(HANG_GUARD, "the listed chunks to be verified", || {
        fsd.counters()
            .is_ok_and(|c| c.settled() && c.backend_bytes >= front)
    })
    .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", fsd.log_text()));
    let after = counters(&fsd);
    assert_eq!(
        (after.backend_bytes, after.ahead_bytes),
        (front, front),
        "[{mode}] the prefetch took the front fetched ahead"
    );
    assert_eq!(
        (fx.data_bytes_served() - served, fx.data_gets() - gets),
        (front, blobs),
        "[{mode}] the registry sent the fronts once"
    );
    assert_listed_read_back(&fsd);
}

/// The niceness of each fetch worker thread (`lode-fetch-N`) of `pid`.
fn fetch_thread_nices(pid: i32) -> Vec<i64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("lode-fetch"))
        })
        .filter_map(|task| nice_of(task.path().join("stat")))
        .collect()
}

/// The niceness in a `/proc/.../stat` file.
fn nice_of(stat: impl AsRef<std::path::Path>) -> Option<i64> {
    proc_stat_fields(stat)?.get(16)?.parse().ok()
}

/// Shared mode: an instance removed and mounted again under the same id
/// (with a new seq) reads at once, while another instance's readers see no
/// error.
#[test]
fn shared_instance_remounted_under_its_id_reads_at_once() {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let fsd = fx.start(Mode::Shared, None, false);
    let a = fsd.mount_shared("a", 2).unwrap();
    let b = fsd.mount_shared("b", 3).unwrap();
    let readers = Readers::start(&b, 3);
    readers.wait_progress(50, "reads from b");
    let path = a.join(file_name(0));
    assert_eq!(read(path.clone()).unwrap(), file_content(0), "a before");

    fsd.unmount(&a).unwrap();
    fsd.mount_shared("a", 4).unwrap();
    let again = read(path.clone());
    readers.wait_each_progress(2, "reads from b after a's remount");
    let tally = readers.stop();
    assert_eq!(
        tally.errors.load(Ordering::Relaxed),
        0,
        "b's readers: first error {:?}",
        tally.first_error.lock().unwrap()
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "b's readers");
    match again {
        Ok(data) => assert!(data == file_content(0), "a after the remount: wrong bytes"),
        Err(e) => panic!("{} right after a's remount: {e}", path.display()),
    }
}

/// A read on a file opened before its instance was removed (`DELETE
/// /mount`) fails, and the image's paths are gone.
fn removed_instance_and_files_held_open(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let mut fsd = fx.start(mode, None, false);
    let opened = File::open(fsd.join(file_name(5))).unwrap();
    fsd.unmount(&fsd.root()).unwrap();

    let (result, opened) = bounded(HANG_GUARD, "a read after the removal", move || {
        let mut buf = vec![0u8; 4096];
        let result = opened.read_at(&mut buf, 0);
        (result.map(|n| buf[..n].to_vec()), opened)
    });
    // Removing a shared instance ends its inodes: a read the kernel cannot
    // answer from its cache gets ESTALE. Removing a dedicated instance
    // unmounts the whole mount, lazily when it is busy: files still open
    // are served until they are closed.
    match (mode, &result) {
        (Mode::Shared, Err(e)) => assert_eq!(
            e.raw_os_error(),
            Some(libc::ESTALE),
            "[{mode}] read on a file opened before the removal: {e}"
        ),
        (Mode::Dedicated, Ok(data)) => assert!(
            !data.is_empty() && data[..] == file_content(5)[..data.len()],
            "[{mode}] wrong bytes from a file held open across a lazy unmount"
        ),
        (_, other) => panic!("[{mode}] read on a file opened before the removal: {other:?}"),
    }
    let fresh = File::open(fsd.join(file_name(6))).map(|_| ());
    assert_eq!(
        fresh.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOENT)),
        "[{mode}] opening a file of the removed instance"
    );
    drop(opened);
    if mode == Mode::Dedicated {
        let status = fsd.wait_exit(EXIT_TIMEOUT).unwrap();
        assert!(
            status.success(),
            "[{mode}] exit after DELETE: {status}\n{}",
            fsd.log_text()
        );
    } else {
        assert!(fsd.is_mounted(), "[{mode}] the shared mount went away");
        let listed: Vec<_> = std::fs::read_dir(fsd.mountpoint())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            listed.is_empty(),
            "[{mode}] listed after the removal: {listed:?}"
        );
    }
}
