//! The cache size limit reaching blobs of mounted images, with real
//! components (docker-registry, containerd 1.6, lode-snapshotter, lode-fsd),
//! in both daemon modes: an image that is mounted but no longer read gives
//! its cached blobs up to the limit, its daemon lets the removed files go
//! (their space is freed), and its next container reads correct bytes,
//! fetched anew. Root only.

use std::time::{Duration, Instant};

use lode_tests::lode::{cache_disk_bytes, removed_cache_files_held};
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::stack;
use lode_tests::wait_until;

/// The limit: far less than what a read of the app's 24 MiB file caches.
const LIMIT: u64 = 1 << 20;
/// `lode-snapshotter` spares blobs used this recently (with the daemons'
/// default flush interval).
const IN_USE: Duration = Duration::from_secs(10);

#[test]
fn mounted_idle_image_gives_its_cache_up_to_the_limit_shared() {
    mounted_idle_image_gives_its_cache_up("shared");
}

#[test]
fn mounted_idle_image_gives_its_cache_up_to_the_limit_dedicated() {
    mounted_idle_image_gives_its_cache_up("dedicated");
}

fn mounted_idle_image_gives_its_cache_up(mode: &'static str) {
    let Some(s) = stack(SnapshotterOptions {
        daemon_mode: mode,
        cache_size_limit_bytes: LIMIT,
        cache_check_interval_secs: Some(1),
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let app = s.app.clone();
    let cache = s.snapshotter.root().join("cache");
    s.pull_lazily("lazy", &app.lode);
    let out = s.run("lazy", &app.lode, "first", "sha256sum /data/big");
    let read_at = Instant::now();
    assert!(out.contains(&app.big_sha256()), "{mode}: {out}");
    let cached = cache_disk_bytes(&cache);
    let served = s.data_bytes_served(&app.lode);

    // Mounted (its snapshots stay), not read: trimmed once idle.
    wait_until(
        IN_USE + Duration::from_secs(20),
        "the idle image's cache trimmed to the limit and let go",
        || {
            cache_disk_bytes(&cache) <= LIMIT
                && removed_cache_files_held(&s.snapshotter.daemon_pids(), &cache) == 0
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{mode}: {e}: {} bytes cached, {} removed files held\n{}",
            cache_disk_bytes(&cache),
            removed_cache_files_held(&s.snapshotter.daemon_pids(), &cache),
            s.logs()
        )
    });
    let trimmed_after = read_at.elapsed();
    assert!(
        trimmed_after >= IN_USE - Duration::from_secs(2),
        "{mode}: trimmed {trimmed_after:?} after the read: it was in use"
    );
    assert!(
        s.drop_cached_pages("data/big") >= 1,
        "{mode}: the image is no longer mounted"
    );

    let out = s.run("lazy", &app.lode, "again", "sha256sum /data/big");
    assert!(out.contains(&app.big_sha256()), "{mode}: {out}");
    let refetched = s.data_bytes_served(&app.lode) - served;
    eprintln!(
        "{mode}: {cached} bytes cached by a read, trimmed to <= {LIMIT} {trimmed_after:?} \
         after it while mounted; read again correctly, {refetched} bytes fetched anew"
    );
    assert!(
        cached > 4 * LIMIT,
        "{mode}: only {cached} bytes were cached"
    );
    assert!(
        refetched >= app.big_size / 2,
        "{mode}: {refetched} bytes fetched again for a {} byte file",
        app.big_size
    );
}
