//! Mounts below a directory, from /proc/self/mountinfo (never by touching
//! the mounts themselves: an unserved FUSE mount blocks any access).

use std::path::{Path, PathBuf};

use lode_common::mountinfo;

/// Mountpoints at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<PathBuf> = mountinfo::current()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Lazily detaches every mount at or below `dir`.
pub fn detach_below(dir: &Path) {
    for _ in 0..4 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for mount in mounts {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
