//! Lode's foundation end to end with real components: an OCI image built
//! here is pushed with skopeo to a docker-registry, converted with `lodectl
//! convert`, mounted with `lodectl mount` (lode-fsd over FUSE), compared in
//! every attribute against umoci's unpack of the same image, and read
//! lazily with the registry's access log as the witness.
//!
//! The two tests share one image (its 64 MiB file and 5,000 small files make
//! it the expensive part) and take turns on it: both read through the same
//! registry, and the laziness test counts that registry's traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use lode_common::format::Bootstrap;
use lode_common::registry::Reference;
use lode_common::Digest;
use lode_tests::fstree::{sha256_file, show_path};
use lode_tests::lode::{counter, data_blobs, fetch_bootstrap, file_chunks};
use lode_tests::{
    compare_trees, lode_prerequisites, pseudo_random_bytes, skip_unless, skopeo_copy,
    umoci_available, umoci_unpack, BuiltImage, Compression, FileKind, Layer, LodeBinaries,
    OciLayoutBuilder, Registry, TreeSnapshot,
};

mod e2e_image;

use e2e_image::{
    base_layer, long_file, many_path, middle_layer, top_layer, BIG_FILE, BIG_SEED, BIG_SIZE,
    CAPABILITY, FOUR_K_FILE, FOUR_K_SEED, MANY_DIRS, MANY_PER_DIR, MIB,
};

const TAG: &str = "v1";
/// Tag of the same image with every layer gzip-compressed, for umoci, which
/// (0.4.7) refuses zstd layers. The tar streams are identical, so is the
/// filesystem they describe.
const REFERENCE_TAG: &str = "reference";

struct Fixture {
    bins: LodeBinaries,
    registry: Registry,
    _layout: tempfile::TempDir,
    image: BuiltImage,
    lode: Reference,
    /// Data blobs of the Lode image with their stored sizes, in order.
    blobs: Vec<(Digest, u64)>,
    bootstrap: Bootstrap,
    /// Taken by a test while it reads through the registry, so that the
    /// laziness test's traffic counts are its own.
    traffic: Mutex<()>,
    _work: tempfile::TempDir,
}

static SHARED: Mutex<Weak<Fixture>> = Mutex::new(Weak::new());

/// The shared image, built on first use and dropped (registry stopped,
/// files removed) once no test holds it.
fn fixture() -> Option<Arc<Fixture>> {
    let bins = lode_prerequisites()?;
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(fixture) = shared.upgrade() {
        return Some(fixture);
    }
    let fixture = Arc::new(Fixture::build(bins));
    *shared = Arc::downgrade(&fixture);
    Some(fixture)
}

impl Fixture {
    fn build(bins: LodeBinaries) -> Self {
        let start = Instant::now();
        let registry = Registry::start().expect("start docker-registry");
        let layout = tempfile::tempdir().unwrap();
        let builder = |middle: Layer| {
            OciLayoutBuilder::new()
                .layer(base_layer())
                .layer(middle)
                .layer(top_layer())
                .cmd(["/bin/sh"])
        };
        let image = builder(middle_layer())
            .write(layout.path(), TAG)
            .expect("write OCI layout");
        let mut middle_gzip = middle_layer();
        middle_gzip.compression = Compression::Gzip;
        let reference = builder(middle_gzip)
            .write(layout.path(), REFERENCE_TAG)
            .expect("write the reference OCI layout");
        assert_eq!(
            image.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>(),
            reference
                .layers
                .iter()
                .map(|l| l.diff_id)
                .collect::<Vec<_>>(),
            "the reference has the same uncompressed layers"
        );
        let built = start.elapsed();
        let source = registry.reference(&format!("e2e/source:{TAG}"));
        skopeo_copy(layout.path(), TAG, &source).expect("skopeo copy");
        let pushed = start.elapsed();
        let lode = registry.reference(&format!("e2e/lode:{TAG}"));
        let digest = bins
            .lodectl
            .convert(&source, &lode, None, None)
            .expect("lodectl convert");
        let converted = start.elapsed();
        let work = tempfile::tempdir().unwrap();
        let (resolved, bootstrap_path) =
            fetch_bootstrap(&lode, &work.path().join("bootstraps")).expect("fetch bootstrap");
        assert_eq!(
            resolved, digest,
            "lodectl printed the pushed manifest's digest"
        );
        let bootstrap = Bootstrap::open(&bootstrap_path).expect("open bootstrap");
        let blobs = data_blobs(&bootstrap).unwrap();
        eprintln!(
            "fixture: layout {built:?}, push {:?}, convert {:?} → {digest}; data blobs {blobs:?}",
            pushed - built,
            converted - pushed,
        );
        Self {
            bins,
            registry,
            _layout: layout,
            image,
            lode,
            blobs,
            bootstrap,
            traffic: Mutex::new(()),
            _work: work,
        }
    }

    fn lock_traffic(&self) -> std::sync::MutexGuard<'_, ()> {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The data blob holding `path`'s first chunk.
    fn blob_of(&self, path: &str) -> Digest {
        file_chunks(&self.bootstrap, path.as_bytes()).unwrap()[0].blob
    }

    /// (requests, body bytes) the registry served for data blobs so far.
    fn data_traffic(&self) -> BTreeMap<Digest, (usize, u64)> {
        let requests = self.registry.requests();
        self.blobs
            .iter()
            .map(|(digest, _)| {
                let needle = digest.to_string();
                let mine: Vec<_> = requests
                    .iter()
                    .filter(|r| r.path.contains(&needle))
                    .collect();
                (*digest, (mine.len(), mine.iter().map(|r| r.bytes).sum()))
            })
            .collect()
    }
}

/// Per-blob traffic between two [`Fixture::data_traffic`] readings.
fn traffic_delta(
    before: &BTreeMap<Digest, (usize, u64)>,
    after: &BTreeMap<Digest, (usize, u64)>,
) -> BTreeMap<Digest, (usize, u64)> {
    after
        .iter()
        .map(|(digest, (requests, bytes))| {
            let (r0, b0) = before.get(digest).copied().unwrap_or_default();
            (*digest, (requests - r0, bytes - b0))
        })
        .collect()
}

fn total(delta: &BTreeMap<Digest, (usize, u64)>) -> (usize, u64) {
    delta
        .values()
        .fold((0, 0), |(r, b), (dr, db)| (r + dr, b + db))
}

#[test]
fn mounted_image_matches_umoci_unpack_in_every_attribute() {
    let Some(f) = fixture() else { return };
    if !skip_unless(
        umoci_available(),
        "umoci is not installed (apt-get install umoci)",
    ) {
        return;
    }
    let _turn = f.lock_traffic();
    let work = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let rootfs = umoci_unpack(
        &f.image.layout_dir,
        REFERENCE_TAG,
        &work.path().join("bundle"),
    )
    .expect("umoci unpack");
    let unpacked = start.elapsed();
    let mount = f
        .bins
        .lodectl
        .mount(&f.lode, &work.path().join("cache"), &[])
        .expect("lodectl mount");
    let mounted = start.elapsed();

    let expected = TreeSnapshot::capture(&rootfs).expect("capture umoci rootfs");
    let captured_reference = start.elapsed();
    let actual = TreeSnapshot::capture(mount.path()).expect("capture the mount");
    let captured_mount = start.elapsed();
    eprintln!(
        "umoci unpack {unpacked:?}, mount {:?}, walk reference {:?}, walk mount {:?} ({} paths)",
        mounted - unpacked,
        captured_reference - mounted,
        captured_mount - captured_reference,
        actual.entries.len(),
    );

    let metrics = mount.metrics().expect("metrics");
    eprintln!(
        "reading the whole image cold: {} range requests, {} bytes",
        counter(&metrics, "backend_requests"),
        counter(&metrics, "bytes_fetched")
    );
    check_reference_is_meaningful(&expected);
    let diffs = compare_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "{} differences between the mount and umoci's unpack, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for attempt in [
        std::fs::write(mount.join("new-file"), "x"),
        std::fs::OpenOptions::new()
            .append(true)
            .open(mount.join("etc/hostname"))
            .map(drop),
        std::fs::create_dir(mount.join("new-dir")),
        std::fs::remove_file(mount.join("etc/hostname")),
    ] {
        let err = attempt.expect_err("the mount is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    mount.umount().expect("lodectl umount");
}

/// The comparison is only as good as the reference: check that umoci's tree
/// has what the layers define, so that a reference missing a feature does
/// not make the comparison vacuous.
fn check_reference_is_meaningful(tree: &TreeSnapshot) {
    let get = |path: &str| {
        tree.get(path)
            .unwrap_or_else(|| panic!("reference lacks /{path}"))
    };
    for gone in [
        "old",
        "gone",
        "gone/file",
        "opq/lower",
        "opq/sub",
        "dir2file/child",
        "etc/hostname-copy",
    ] {
        assert!(tree.get(gone).is_none(), "reference still has /{gone}");
    }
    assert!(tree.get("opq/upper").is_some());
    assert_eq!(get("replace/thing").kind, FileKind::Dir);
    assert_eq!(get("dir2file").kind, FileKind::Regular);
    assert_eq!(get("bin/su").mode & 0o7777, 0o4755);
    assert_eq!(get("tmp").mode & 0o7777, 0o1777);
    assert_eq!(get("data/big-ids").uid, 3_000_000);
    assert_eq!(get("data/nanos").mtime_nsec, 123_456_789);
    assert_eq!(
        get("bin/ping").xattrs.get(&b"security.capability"[..]),
        Some(&CAPABILITY.to_vec())
    );
    assert_eq!(get("data/user-xattrs").xattrs.len(), 2);
    assert_eq!(
        (
            get("dev/large-minor").rdev_major,
            get("dev/large-minor").rdev_minor
        ),
        (240, 300_000)
    );
    assert_eq!(get("dev/fifo").kind, FileKind::Fifo);
    let names: BTreeSet<Vec<u8>> = tree.hardlink_groups()[&b"links/target".to_vec()].clone();
    assert_eq!(
        names.len(),
        4,
        "{:?}",
        names.iter().map(|n| show_path(n)).collect::<Vec<_>>()
    );
    assert_eq!(
        get(BIG_FILE).content,
        Some(Digest::of(&pseudo_random_bytes(
            BIG_SEED,
            0,
            BIG_SIZE as usize
        )))
    );
    assert_eq!(
        tree.entries
            .keys()
            .filter(|p| p.starts_with(b"many/d") && p.len() == "many/d00/f000".len())
            .count(),
        MANY_DIRS * MANY_PER_DIR
    );
    assert!(tree.entries.contains_key(long_file().as_bytes()));
    assert!(tree.entries.contains_key(&b"names/bad-\xff\xfe"[..]));
}

#[test]
fn mount_fetches_only_what_is_read_and_keeps_it_across_remounts() {
    let Some(f) = fixture() else { return };
    let _turn = f.lock_traffic();
    let merge_limit = lode_config::FsdConfig::default().fetch.merge_limit_bytes;
    let cache = tempfile::tempdir().unwrap();
    let four_k_blob = f.blob_of(FOUR_K_FILE);
    let big_blob = f.blob_of(BIG_FILE);
    let many_blob = f.blob_of(&many_path(0, 0));
    assert!(
        four_k_blob != big_blob && big_blob != many_blob && many_blob != four_k_blob,
        "the three files come from three layers, hence three data blobs"
    );

    let start = f.data_traffic();
    let bootstrap_digest = {
        let mount = f
            .bins
            .lodectl
            .mount(&f.lode, cache.path(), &[])
            .expect("lodectl mount");
        let mounted = f.data_traffic();
        assert_eq!(
            total(&traffic_delta(&start, &mounted)),
            (0, 0),
            "mounting fetched data blobs"
        );
        // Metadata only: every path's attributes, links and xattrs.
        let mut paths = 0;
        walk_metadata(mount.path(), &mut paths);
        assert!(paths > MANY_DIRS * MANY_PER_DIR, "walked {paths} paths");
        let walked = f.data_traffic();
        assert_eq!(
            total(&traffic_delta(&mounted, &walked)),
            (0, 0),
            "stat, readdir, readlink and xattrs fetched data"
        );

        let data = std::fs::read(mount.join(FOUR_K_FILE)).unwrap();
        assert_eq!(data, pseudo_random_bytes(FOUR_K_SEED, 0, 4096));
        mount.wait_fetches_settled().unwrap();
        let after_small = f.data_traffic();
        let delta = traffic_delta(&walked, &after_small);
        let (requests, bytes) = total(&delta);
        assert_eq!(requests, 1, "one range request for a 4 KiB file: {delta:?}");
        assert!(
            (4096..=merge_limit).contains(&bytes),
            "a 4 KiB read fetched {bytes} bytes (merge limit {merge_limit})"
        );
        assert_eq!(delta[&four_k_blob].0, 1, "{delta:?}");

        let read_start = Instant::now();
        let digest = sha256_file(&mount.join(BIG_FILE)).unwrap();
        let read_time = read_start.elapsed();
        assert_eq!(
            digest,
            Digest::of(&pseudo_random_bytes(BIG_SEED, 0, BIG_SIZE as usize))
        );
        mount.wait_fetches_settled().unwrap();
        let after_big = f.data_traffic();
        let delta = traffic_delta(&after_small, &after_big);
        let (_, bytes) = total(&delta);
        eprintln!(
            "64 MiB cold read: {read_time:?}, {} requests, {bytes} bytes",
            delta[&big_blob].0
        );
        // Random data is stored raw; the slack covers the layer's other
        // small file merged into a request.
        assert!(
            (BIG_SIZE..=BIG_SIZE + merge_limit + 64 * 1024).contains(&bytes),
            "reading 64 MiB fetched {bytes} bytes: {delta:?}"
        );

        let whole = traffic_delta(&start, &after_big);
        assert_eq!(
            whole[&many_blob],
            (0, 0),
            "the blob of the unread small files was touched"
        );
        let (_, fetched) = total(&whole);
        let image_size: u64 = f.blobs.iter().map(|(_, size)| size).sum();
        let many_size = f
            .blobs
            .iter()
            .find(|(d, _)| *d == many_blob)
            .map(|(_, s)| *s)
            .unwrap();
        assert!(
            fetched + many_size <= image_size + merge_limit,
            "fetched {fetched} of {image_size} bytes, the unread files' blob has {many_size}"
        );
        let metrics = mount.metrics().expect("metrics");
        assert_eq!(
            counter(&metrics, "bytes_fetched"),
            fetched,
            "the daemon's count of fetched bytes agrees with the registry's: {metrics}"
        );
        assert_eq!(counter(&metrics, "digest_errors"), 0, "{metrics}");
        let bootstrap = mount.record().bootstrap.clone();
        mount.umount().expect("lodectl umount");
        bootstrap
    };
    assert!(
        bootstrap_digest.exists(),
        "the bootstrap stays in the cache"
    );

    let before = f.data_traffic();
    let mount = f
        .bins
        .lodectl
        .mount(&f.lode, cache.path(), &[])
        .expect("second lodectl mount");
    let digest = sha256_file(&mount.join(BIG_FILE)).unwrap();
    assert_eq!(
        digest,
        Digest::of(&pseudo_random_bytes(BIG_SEED, 0, BIG_SIZE as usize))
    );
    let data = std::fs::read(mount.join(FOUR_K_FILE)).unwrap();
    assert_eq!(data, pseudo_random_bytes(FOUR_K_SEED, 0, 4096));
    mount.wait_fetches_settled().unwrap();
    let delta = traffic_delta(&before, &f.data_traffic());
    assert_eq!(
        total(&delta),
        (0, 0),
        "cached data fetched again: {delta:?}"
    );
    let metrics = mount.metrics().expect("metrics");
    assert_eq!(counter(&metrics, "bytes_fetched"), 0, "{metrics}");
    assert!(
        counter(&metrics, "cache_hits") >= BIG_SIZE / MIB,
        "{metrics}"
    );
    mount.umount().expect("lodectl umount");
}

/// lstat, readdir, readlink and listxattr of everything below `dir`.
fn walk_metadata(dir: &Path, count: &mut usize) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        *count += 1;
        lode_tests::fstree::read_xattrs(&path).unwrap();
        if meta.file_type().is_symlink() {
            std::fs::read_link(&path).unwrap();
        } else if meta.is_dir() {
            walk_metadata(&path, count);
        }
    }
}
