//! Bootstrap files: each pull of a Lode image fetches the image's
//! bootstrap into a file of its own (`<root>/bootstraps/<hex>.<random>`,
//! see [`crate::lazy`]). A file goes when the instance serving it is
//! released; one no record names (a pull that failed after the fetch, a
//! second pull of an image whose instance was still mounted, a crash)
//! goes at the next sweep ([`sweep`], on containerd's Cleanup and at
//! start) once it is old enough that no pull can still be about to record
//! it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::instances::LodeImage;

/// How old an unnamed bootstrap file must be to be swept: well beyond the
/// time a pull takes from the fetch to recording the file, and beyond the
/// two minutes an early fetch waits for its pull.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(10 * 60);

/// Removes a released instance's bootstrap file: each pull fetches one of
/// its own, so no other instance uses it.
pub fn remove(released: &LodeImage) {
    let path = &released.bootstrap_path;
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "bootstrap of released image removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot remove the bootstrap of a released image")
        }
    }
}

/// Removes the files in `dir` that are not in `named` and were last
/// modified at least [`SWEEP_MIN_AGE`] ago; returns how many.
pub fn sweep(dir: &Path, named: &HashSet<PathBuf>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age >= SWEEP_MIN_AGE);
        if !old || named.contains(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a bootstrap file no image names");
                removed += 1;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot remove a bootstrap file no image names")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, age: Duration) -> PathBuf {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        path
    }

    #[test]
    fn only_old_files_no_image_names_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let named = file(dir.path(), "aa.named", hour);
        let stray = file(dir.path(), "bb.stray", hour);
        let fresh = file(dir.path(), "cc.fresh", Duration::ZERO);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let keep = HashSet::from([named.clone()]);
        assert_eq!(sweep(dir.path(), &keep), 1);
        assert!(named.exists() && fresh.exists() && dir.path().join("sub").exists());
        assert!(!stray.exists());
        assert_eq!(sweep(&dir.path().join("missing"), &keep), 0);
    }
}
