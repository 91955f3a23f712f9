//! Snapshot directories on disk. Walks and removals of whole trees run on
//! the blocking pool, never on the runtime's threads.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ServiceError;

pub fn create_snapshot_dirs(dir: &Path, writable: bool) -> Result<(), ServiceError> {
    use std::os::unix::fs::PermissionsExt as _;
    let fs = dir.join("fs");
    std::fs::create_dir_all(&fs).map_err(ServiceError::io(&fs))?;
    // The root of a container's filesystem, whatever the process umask.
    std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755))
        .map_err(ServiceError::io(&fs))?;
    if writable {
        let work = dir.join("work");
        std::fs::create_dir_all(&work).map_err(ServiceError::io(&work))?;
    }
    Ok(())
}

/// Removes a snapshot directory; a failure is logged, not returned, since
/// the record is already gone and Cleanup retries.
pub async fn remove_dir(dir: PathBuf) {
    let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
        _ => Ok(()),
    })
    .await;
    if let Ok(Err((dir, error))) = result {
        tracing::warn!(path = %dir.display(), %error, "cannot remove snapshot directory");
    }
}

/// (bytes allocated, inodes) of a tree, counting hardlinked inodes once.
pub async fn usage(dir: PathBuf) -> Result<(i64, i64), ServiceError> {
    tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::new();
        let mut totals = (0i64, 0i64);
        walk(&dir, &mut seen, &mut totals)?;
        Ok(totals)
    })
    .await
    .map_err(|e| ServiceError::InvalidArgument(format!("usage walk failed: {e}")))?
}

fn walk(
    path: &Path,
    seen: &mut HashSet<(u64, u64)>,
    totals: &mut (i64, i64),
) -> Result<(), ServiceError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ServiceError::io(path)(e)),
    };
    if seen.insert((meta.dev(), meta.ino())) {
        totals.0 += meta.blocks() as i64 * 512;
        totals.1 += 1;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(ServiceError::io(path))? {
            let entry = entry.map_err(ServiceError::io(path))?;
            walk(&entry.path(), seen, totals)?;
        }
    }
    Ok(())
}
