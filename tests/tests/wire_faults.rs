//! Faults on the wire between `lode-fsd` and the registry, injected by the
//! test kit's emulated link (`lode_tests::link`) in front of a real
//! `docker-registry`, in every mode: connections cut after every 16 KiB, a
//! stalled transfer, flipped bytes, a burst of 503s, a wrong
//! `Content-Range` and a slow drip. What a reader sees
//! is the file's bytes or EIO within the deadline, never other bytes and
//! never a hang; the metrics count the faults; reads succeed again as soon
//! as the fault ends. Root only (FUSE).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lode_tests::failover::{file_content, file_name, push_image, RegistryImage, FILES};
use lode_tests::link::{Fault, Link, LinkProfile};
use lode_tests::lode::{timed_read, Counters, Mode, ModeFsd, READ_HANG_GUARD};
use lode_tests::{bounded, lode_prerequisites, LodeBinaries, Registry};

/// Each read's deadline (`fetch.deadline_secs`).
const DEADLINE: Duration = Duration::from_secs(3);
/// Longest a read that must fail may take: the kernel sends a failed
/// read's page again once (see `fsd_failures.rs`), each bounded by the
/// deadline; then scheduling.
const FAIL_BOUND: Duration = Duration::from_secs(2 * 3 + 3);
/// What a cut link delivers per connection.
const CUT_AFTER: u64 = 16 * 1024;

lode_tests::every_mode!(faults_on_the_wire);

struct Fixture {
    bins: LodeBinaries,
    _registry: Registry,
    image: RegistryImage,
    link: Link,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Option<Self> {
        let bins = lode_prerequisites()?;
        let registry = Registry::start().expect("start docker-registry");
        let image = push_image(&bins.lodectl, &registry, "wire");
        let link = Link::start(registry.addr(), LinkProfile::LAN).expect("start the link");
        Some(Self {
            bins,
            _registry: registry,
            image,
            link,
            work: tempfile::tempdir().unwrap(),
        })
    }

    /// A daemon of `mode` reading the image's blobs through the link, with
    /// a short deadline and one retry, so that faults show within seconds,
    /// fetching only the chunks read (no readahead, no neighbours), so that
    /// each file is cold until it is read.
    fn start(&self, mode: Mode) -> ModeFsd {
        let config = self.image.cold_fsd_config(self.work.path(), DEADLINE);
        let mut options = self.image.fsd_options(Some(config));
        options.blob_source = format!(
            "registry://{}/{}",
            self.link.host(),
            self.image.reference.repository
        );
        ModeFsd::start(&self.bins.fsd, mode, &options, false)
            .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"))
    }
}

fn counters(fsd: &ModeFsd) -> Counters {
    fsd.settled_counters()
        .unwrap_or_else(|e| panic!("[{}] counters: {e}", fsd.mode()))
}

/// Reads the first [`READ`] bytes of `path` in one call on a guarded
/// thread; returns the result and how long it took.
fn timed_pread(path: PathBuf, len: usize) -> (std::io::Result<Vec<u8>>, Duration) {
    use std::os::unix::fs::FileExt as _;
    let what = format!("reading {}", path.display());
    bounded(READ_HANG_GUARD, &what, move || {
        let started = Instant::now();
        let mut buf = vec![0u8; len];
        let read = std::fs::File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, 0))
            .map(|()| buf);
        (read, started.elapsed())
    })
}

/// Bytes of one read while a fault is on.
const READ: usize = 128 * 1024;

/// Reads the start of `file` while `fault` is on: its bytes, or EIO within
/// [`FAIL_BOUND`]; never other bytes. Then clears the fault and reads the
/// whole file: its bytes.
fn fails_while_and_recovers(fx: &Fixture, fsd: &ModeFsd, fault: Fault, file: u64) -> Duration {
    let mode = fsd.mode();
    fx.link.set_fault(Some(fault));
    // A drip delivers, so a long read is many FUSE requests, each bounded
    // by the deadline: under a drip one page is read.
    let len = if matches!(fault, Fault::Drip(_)) {
        4096
    } else {
        READ
    };
    let (result, took) = timed_pread(fsd.join(file_name(file)), len);
    fx.link.set_fault(None);
    match result {
        Ok(data) => assert!(
            data[..] == file_content(file)[..len],
            "[{mode}] {fault:?}: {} read {} bytes that are not the file's",
            file_name(file),
            data.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "[{mode}] {fault:?}: {e}"),
    }
    assert!(
        took <= FAIL_BOUND,
        "[{mode}] {fault:?}: the read took {took:?}, more than {FAIL_BOUND:?}"
    );
    // Requests sent while the fault was on (the kernel's readahead of the
    // file) may still fail: the file is read again once they have ended.
    counters(fsd);
    let (again, _) = timed_read(fsd.join(file_name(file)));
    let again = again.unwrap_or_else(|e| panic!("[{mode}] after {fault:?}: {e}"));
    assert!(
        again == file_content(file),
        "[{mode}] after {fault:?}: wrong bytes"
    );
    took
}

fn faults_on_the_wire(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let fsd = fx.start(mode);
    let mut file = 0;
    let mut next_file = || {
        file += 1;
        assert!(file < FILES, "out of cold files");
        file
    };

    // A link that keeps breaking but keeps delivering: every read completes
    // with the file's bytes, however many connections it takes.
    let before = (fx.link.stats(), counters(&fsd));
    fx.link.set_fault(Some(Fault::CutAfter(CUT_AFTER)));
    let mut cut_bytes = 0;
    let started = Instant::now();
    for _ in 0..3 {
        let file = next_file();
        let (result, took) = timed_read(fsd.join(file_name(file)));
        let data = result.unwrap_or_else(|e| panic!("[{mode}] cut link, {}: {e}", file_name(file)));
        assert!(
            data == file_content(file),
            "[{mode}] cut link, {}: wrong bytes",
            file_name(file)
        );
        assert!(
            took < DEADLINE,
            "[{mode}] cut link: {} took {took:?}",
            file_name(file)
        );
        cut_bytes += data.len();
    }
    fx.link.set_fault(None);
    let (link, after) = (fx.link.stats() - before.0, counters(&fsd));
    eprintln!(
        "[{mode}] cut after {CUT_AFTER} B: {cut_bytes} B read correctly in {:?} over {} connections ({} cut)",
        started.elapsed(),
        link.connections,
        link.faults
    );
    assert!(
        link.faults >= 3 && link.connections > 3,
        "[{mode}] the cut link did not cut: {link:?}"
    );
    assert_eq!(after.digest_errors, before.1.digest_errors, "[{mode}]");

    // A stalled transfer: only the deadline ends the read.
    let before = counters(&fsd);
    let took = fails_while_and_recovers(&fx, &fsd, Fault::Stall, next_file());
    eprintln!("[{mode}] stalled link: the read ended after {took:?}");
    assert!(
        counters(&fsd).backend_errors > before.backend_errors,
        "[{mode}] stall not counted"
    );

    // Flipped bytes: the digest check refuses them; nothing else is served.
    let before = counters(&fsd);
    let took = fails_while_and_recovers(&fx, &fsd, Fault::FlipBytes, next_file());
    eprintln!("[{mode}] flipped bytes: the read ended after {took:?}");
    assert!(
        counters(&fsd).digest_errors > before.digest_errors,
        "[{mode}] flipped bytes not counted as digest errors"
    );

    // A burst of 503s.
    let before = (fx.link.stats(), counters(&fsd));
    let took = fails_while_and_recovers(&fx, &fsd, Fault::ServerError, next_file());
    eprintln!("[{mode}] 503 burst: the read ended after {took:?}");
    assert!(
        fx.link.stats().faults > before.0.faults,
        "[{mode}] no 503 sent"
    );
    assert!(
        counters(&fsd).backend_errors > before.1.backend_errors,
        "[{mode}] 503s not counted"
    );

    // A registry answering with another range than asked for.
    let before = counters(&fsd);
    let took = fails_while_and_recovers(&fx, &fsd, Fault::WrongRange, next_file());
    eprintln!("[{mode}] wrong Content-Range: the read ended after {took:?}");
    assert!(
        counters(&fsd).backend_errors > before.backend_errors,
        "[{mode}] wrong ranges not counted"
    );

    // A slow drip (32 KiB/s): the bytes, or EIO at the deadline.
    let took = fails_while_and_recovers(&fx, &fsd, Fault::Drip(32 << 10), next_file());
    eprintln!("[{mode}] slow drip: the read ended after {took:?}");

    // Everything else reads as it should once the link is sound again.
    for file in next_file()..FILES {
        let (result, _) = timed_read(fsd.join(file_name(file)));
        assert!(
            result.as_deref().ok() == Some(&file_content(file)[..]),
            "[{mode}] {} after the faults",
            file_name(file)
        );
    }
}
