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
