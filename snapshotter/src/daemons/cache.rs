//! Removing cached chunks: of images that are gone, and of any blob not in
//! use when the cache is over its size limit. The cache holds, per data
//! blob, a file named by the blob digest's hex and its presence map
//! `<hex>.map`. A blob's files may be removed while daemons hold them open:
//! they go on reading correct bytes from them, notice the removal within a
//! flush interval (`cache.flush_interval_ms` of `lode-fsd`), let the files
//! go and start the blob's cache afresh on its next read.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lode_common::format::{BlobIndex, Bootstrap};

use super::DaemonManager;
use crate::instances::LodeImage;

/// A blob that daemons marked used (the map file's modification time, set
/// once per flush interval while it is read) within this time is being
/// read, and the size limit leaves it alone: 10 s, or two of the daemons'
/// flush intervals (`cache.flush_interval_ms`) if that is longer.
pub fn in_use(flush_interval: Duration) -> Duration {
    Duration::from_secs(10).max(flush_interval.saturating_mul(2))
}

/// Hex digests of the data blobs a bootstrap names (empty if unreadable).
pub fn blobs_of(bootstrap: &Path) -> HashSet<String> {
    let Ok(bootstrap) = Bootstrap::open(bootstrap) else {
        return HashSet::new();
    };
    (0..bootstrap.blob_count())
        .filter_map(|i| bootstrap.blob(BlobIndex(i)).ok())
        .map(|blob| blob.digest.hex())
        .collect()
}

/// Removes the cache files of `gone` blobs that `kept` does not name;
/// returns the bytes freed.
pub fn remove_unreferenced(
    cache_dir: &Path,
    gone: &HashSet<String>,
    kept: &HashSet<String>,
) -> u64 {
    gone.difference(kept)
        .map(|hex| remove_blob(cache_dir, hex))
        .sum()
}

/// One blob's files in the cache directory.
#[derive(Default)]
struct CachedBlob {
    bytes: u64,
    /// When a daemon last wrote or marked it used.
    last_used: Option<SystemTime>,
}

/// Keeps the cache under `limit` bytes (0: no limit) by removing blobs,
/// least recently used first: those no recorded image names (`referenced`),
/// then those of mounted images not used for `in_use` ([`in_use`]). A blob being read
/// is never removed, so the cache may stay above the limit while readers
/// need it all. Returns the bytes freed.
pub fn enforce_limit(
    cache_dir: &Path,
    referenced: &HashSet<String>,
    limit: u64,
    in_use: Duration,
) -> u64 {
    if limit == 0 {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return 0;
    };
    let mut blobs: HashMap<String, CachedBlob> = HashMap::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = name.strip_suffix(".map").unwrap_or(&name).to_string();
        let blob = blobs.entry(hex).or_default();
        blob.bytes += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        blob.last_used = blob.last_used.max(meta.modified().ok());
    }
    let mut total: u64 = blobs.values().map(|b| b.bytes).sum();
    if total <= limit {
        return 0;
    }
    let now = SystemTime::now();
    let idle = |b: &CachedBlob| {
        b.last_used
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age >= in_use)
    };
    // Unreferenced blobs first, then the least recently used.
    let mut candidates: Vec<_> = blobs
        .iter()
        .filter(|(hex, b)| !referenced.contains(*hex) || idle(b))
        .map(|(hex, b)| (referenced.contains(hex), b.last_used, hex))
        .collect();
    candidates.sort();
    let mut freed = 0;
    for (_, _, hex) in candidates {
        if total <= limit {
            break;
        }
        let size = remove_blob(cache_dir, hex);
        total = total.saturating_sub(size);
        freed += size;
    }
    freed
}

/// Removes a blob's map, then its data file (a data file without its map is
/// harmless; a map whose data file is replaced must not be kept). Returns
/// the bytes freed.
fn remove_blob(cache_dir: &Path, hex: &str) -> u64 {
    [cache_dir.join(format!("{hex}.map")), cache_dir.join(hex)]
        .iter()
        .map(remove)
        .sum()
}

fn remove(path: &PathBuf) -> u64 {
    let size = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    match std::fs::remove_file(path) {
        Ok(()) => size,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot remove cache file");
            0
        }
    }
}

impl DaemonManager {
    /// Removes the cached blobs of a released image that no other recorded
    /// instance uses.
    pub(super) fn clean_cache(&self, released: &LodeImage) {
        let gone = blobs_of(&released.bootstrap_path);
        let Some(kept) = self.referenced_blobs() else {
            return;
        };
        let freed = remove_unreferenced(&self.config.cache_dir(), &gone, &kept);
        tracing::info!(image_ref = %released.image_ref, freed_bytes = freed, "cache of released image removed");
    }

    /// Blobs of every recorded instance's image; `None` (logged) while a
    /// record cannot be read: its image's blobs would look unused.
    fn referenced_blobs(&self) -> Option<std::collections::HashSet<String>> {
        let instances = match self.readable_instances() {
            Ok(instances) => instances,
            Err(error) => {
                tracing::warn!(%error, "not removing cached blobs");
                return None;
            }
        };
        Some(
            instances
                .iter()
                .flat_map(|i| blobs_of(&i.image.bootstrap_path))
                .collect(),
        )
    }

    /// Applies the cache's size limit every `cache.check_interval_secs`.
    pub(super) fn watch_cache(&self) {
        if let Some(interval) = self.config.cache.check_interval() {
            self.every(interval, |manager| async move {
                // Walks the cache directory and opens bootstraps.
                let _ = tokio::task::spawn_blocking(move || manager.enforce_cache_limit()).await;
            });
        }
    }

    /// Applies `cache.size_limit_bytes`: unreferenced blobs go first, then
    /// blobs of mounted images not being read, least recently used first.
    pub(super) fn enforce_cache_limit(&self) {
        let limit = self.config.cache.size_limit_bytes;
        if limit == 0 {
            // Without a bound there is nothing to trim: don't open every
            // bootstrap on each mount to find out.
            return;
        }
        let Some(referenced) = self.referenced_blobs() else {
            return;
        };
        let freed = enforce_limit(&self.config.cache_dir(), &referenced, limit, self.in_use);
        if freed > 0 {
            tracing::info!(
                freed_bytes = freed,
                limit,
                "cache trimmed to its size limit"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the daemons' default flush interval (1 s) gives.
    const IN_USE: Duration = Duration::from_secs(10);

    #[test]
    fn a_blob_is_in_use_for_two_flush_intervals_and_at_least_10_s() {
        assert_eq!(in_use(Duration::from_secs(1)), IN_USE);
        assert_eq!(in_use(Duration::from_secs(20)), Duration::from_secs(40));
    }

    /// A blob's data and map files, `size` bytes of data, last used `ago`.
    fn blob(dir: &Path, hex: &str, size: usize, ago: Duration) {
        let when = SystemTime::now() - ago;
        for (name, len) in [(hex.to_string(), size), (format!("{hex}.map"), 64)] {
            let path = dir.join(name);
            std::fs::write(&path, vec![1u8; len]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(when).unwrap();
        }
    }

    fn kept(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_limit_removes_unreferenced_blobs_then_idle_ones_never_busy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let minutes = |m: u64| Duration::from_secs(60 * m);
        blob(dir.path(), "aa", 64 << 10, minutes(1)); // referenced, idle, newer
        blob(dir.path(), "bb", 64 << 10, Duration::ZERO); // referenced, being read
        blob(dir.path(), "cc", 64 << 10, minutes(5)); // referenced, idle, older
        blob(dir.path(), "dd", 64 << 10, Duration::ZERO); // unreferenced, recent
        let referenced: HashSet<String> = ["aa", "bb", "cc"].map(String::from).into();
        assert_eq!(
            enforce_limit(dir.path(), &referenced, 0, IN_USE),
            0,
            "no limit"
        );
        assert_eq!(
            enforce_limit(dir.path(), &referenced, 1 << 30, IN_USE),
            0,
            "under the limit"
        );

        // Room for three blobs: the unreferenced one goes.
        let freed = enforce_limit(dir.path(), &referenced, 3 * (68 << 10) + 4096, IN_USE);
        assert!(freed >= 64 << 10, "{freed}");
        assert_eq!(
            kept(dir.path()),
            ["aa", "aa.map", "bb", "bb.map", "cc", "cc.map"]
        );
        // Room for two: the least recently used of the idle ones.
        enforce_limit(dir.path(), &referenced, 2 * (68 << 10) + 4096, IN_USE);
        assert_eq!(kept(dir.path()), ["aa", "aa.map", "bb", "bb.map"]);
        // No room: the one being read stays, over the limit.
        enforce_limit(dir.path(), &referenced, 1, IN_USE);
        assert_eq!(kept(dir.path()), ["bb", "bb.map"]);
    }

    #[test]
    fn only_blobs_no_image_keeps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["aa", "aa.map", "bb", "bb.map", "cc"] {
            std::fs::write(dir.path().join(name), vec![1u8; 8192]).unwrap();
        }
        let gone: HashSet<String> = ["aa", "bb"].map(String::from).into();
        let kept: HashSet<String> = ["bb"].map(String::from).into();
        let freed = remove_unreferenced(dir.path(), &gone, &kept);
        assert!(freed > 0);
        assert!(!dir.path().join("aa").exists() && !dir.path().join("aa.map").exists());
        assert!(dir.path().join("bb").exists() && dir.path().join("cc").exists());
    }
}
