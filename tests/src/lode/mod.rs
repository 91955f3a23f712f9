//! Driving Lode's own binaries from tests: `lodectl convert`, `lodectl
//! mount`/`umount` ([`ctl`]), `lode-fsd` started directly and its metrics
//! ([`fsd`]), in any of its modes with successors taking over ([`modes`]),
//! and finding a file's chunks in a bootstrap and in the chunk cache
//! ([`image`]). Mount guards unmount on drop, falling back to killing the
//! daemon and a lazy unmount, so a failing test leaves no mount behind.

use std::path::PathBuf;
use std::time::Duration;

use crate::{bin_path, fuse_available, require_root, skip_unless, skopeo_available, Registry};

pub mod ctl;
pub mod fsd;
pub mod image;
pub mod modes;

pub use ctl::{LodeMount, Lodectl, MountRecord, Run};
pub use fsd::{
    counter, force_unmount, is_fsd_mount, proc_stat_fields, process_alive, request_metrics,
    FsdDaemon, FsdOptions,
};
pub use image::{
    cache_disk_bytes, cache_durable, data_blobs, fetch_bootstrap, file_chunks, remove_cached_blobs,
    removed_cache_files_held, ChunkLocation,
};
pub use modes::{Counters, Mode, ModeFsd};

pub const LODECTL: &str = "lodectl";
pub const LODE_FSD: &str = "lode-fsd";

/// The built binaries a real-component Lode test runs.
#[derive(Clone, Debug)]
pub struct LodeBinaries {
    pub lodectl: Lodectl,
    pub fsd: PathBuf,
}

/// Checks what tests that convert, push and mount need (root, `/dev/fuse`,
/// `docker-registry`, `skopeo`, the built `lodectl` and `lode-fsd`); prints
/// why the test is skipped and returns `None` when something is missing.
pub fn lode_prerequisites() -> Option<LodeBinaries> {
    if !require_root()
        || !skip_unless(fuse_available(), "/dev/fuse cannot be opened")
        || !skip_unless(
            Registry::available(),
            "docker-registry is not installed (apt-get install docker-registry)",
        )
        || !skip_unless(
            skopeo_available(),
            "skopeo is not installed (apt-get install skopeo)",
        )
    {
        return None;
    }
    let lodectl = bin_path(LODECTL);
    let fsd = bin_path(LODE_FSD);
    let built = skip_unless(
        lodectl.is_some() && fsd.is_some(),
        "lodectl and lode-fsd are not built (cargo build --release --workspace --bins)",
    );
    match (lodectl, fsd) {
        (Some(lodectl), Some(fsd)) if built => Some(LodeBinaries {
            lodectl: Lodectl::new(lodectl),
            fsd,
        }),
        _ => None,
    }
}

/// How long a read in a test may take before it counts as hung.
pub const READ_HANG_GUARD: Duration = Duration::from_secs(60);

/// Reads `path` whole on a guarded thread (see [`bounded`],
/// [`READ_HANG_GUARD`]); returns the result and how long it took.
pub fn timed_read(path: PathBuf) -> (std::io::Result<Vec<u8>>, Duration) {
    let what = format!("reading {}", path.display());
    bounded(READ_HANG_GUARD, &what, move || {
        let started = std::time::Instant::now();
        (std::fs::read(&path), started.elapsed())
    })
}

/// Runs `work` on its own thread and waits at most `limit` for it, so that
/// a read stuck in a FUSE request fails the test instead of hanging it.
/// Panics (naming `what`) on timeout; the stuck thread is left behind.
pub fn bounded<T: Send + 'static>(
    limit: Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}
