//! Removing cached chunks of images that are gone. The cache holds, per
//! data blob, a file named by the blob digest's hex and its presence map
//! `<hex>.map`; a blob is removed only when no recorded instance's image
//! uses it, so a mounted image never loses its cache.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lode_common::format::{BlobIndex, Bootstrap};

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
    let mut freed = 0;
    for hex in gone.difference(kept) {
        for path in [cache_dir.join(hex), cache_dir.join(format!("{hex}.map"))] {
            freed += remove(&path);
        }
    }
    freed
}

/// Keeps the cache under `limit` bytes (0: no limit) by removing, oldest
/// first, blobs that `referenced` does not name; never a referenced one, so
/// the cache may stay above the limit when mounted images need it all.
/// Returns the bytes freed.
pub fn enforce_limit(cache_dir: &Path, referenced: &HashSet<String>, limit: u64) -> u64 {
    if limit == 0 {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return 0;
    };
    let mut total = 0u64;
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let size = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        total += size;
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = name.strip_suffix(".map").unwrap_or(&name).to_string();
        if !referenced.contains(&hex) {
            candidates.push((meta.modified().ok(), entry.path()));
        }
    }
    candidates.sort();
    let mut freed = 0;
    for (_, path) in candidates {
        if total <= limit {
            break;
        }
        let size = remove(&path);
        total = total.saturating_sub(size);
        freed += size;
    }
    freed
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_removes_only_unreferenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["aa", "bb", "cc"] {
            std::fs::write(dir.path().join(name), vec![1u8; 64 << 10]).unwrap();
        }
        let referenced: HashSet<String> = ["aa"].map(String::from).into();
        assert_eq!(enforce_limit(dir.path(), &referenced, 0), 0, "no limit");
        let freed = enforce_limit(dir.path(), &referenced, 1);
        assert!(freed >= 128 << 10, "{freed}");
        assert!(
            dir.path().join("aa").exists(),
            "in use: kept over the limit"
        );
        assert!(!dir.path().join("bb").exists() && !dir.path().join("cc").exists());
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
