//! Mounting and unmounting the FUSE filesystem, apart from the filesystem
//! type: we open /dev/fuse and call mount(2) ourselves so that the daemon owns
//! the connection's descriptor (a later process can take it over).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lode_common::contract;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tracing::{info, warn};

/// Largest read request we ask the kernel for (it also caps it at its page limit).
pub const MAX_READ: u32 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("open /dev/fuse: {0}")]
    Device(#[source] std::io::Error),
    #[error("mount FUSE at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("unmount {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// How the filesystem appears in the mount table.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The mount's source column (`fsname`).
    pub fsname: String,
    /// Appended to the type: `fuse.<subtype>`.
    pub subtype: String,
    /// `st_mode` of the root directory, as the kernel needs it before INIT.
    pub root_mode: u32,
}

impl MountOptions {
    pub fn lode(root_mode: u32) -> Self {
        Self {
            fsname: contract::FUSE_FS_NAME.into(),
            subtype: contract::FUSE_SUBTYPE.into(),
            root_mode,
        }
    }

    /// The kernel's option string. The kernel checks permissions from the
    /// image's modes (`default_permissions`) and lets every user in
    /// (`allow_other`): containers run as any uid.
    fn data(&self, fd: i32) -> String {
        format!(
            "fd={fd},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other,max_read={MAX_READ}",
            libc::S_IFDIR | (self.root_mode & 0o7777),
        )
    }

    fn flags() -> MsFlags {
        // nosuid/nodev here do not affect containers (overlayfs checks its own
        // mount); they keep the bare mount from becoming a way in for the host.
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
    }
}

/// Mounts a FUSE filesystem at `mountpoint` and returns the connection's
/// /dev/fuse descriptor; the kernel's INIT request is waiting on it.
pub fn mount_fuse(mountpoint: &Path, options: &MountOptions) -> Result<OwnedFd, MountError> {
    let device: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(MountError::Device)?;
    let data = options.data(device.as_raw_fd());
    nix::mount::mount(
        Some(options.fsname.as_str()),
        mountpoint,
        Some(format!("fuse.{}", options.subtype).as_str()),
        MountOptions::flags(),
        Some(data.as_str()),
    )
    .map_err(|source| MountError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    info!(mountpoint = %mountpoint.display(), "mounted");
    Ok(OwnedFd::from(device))
}

/// Unmounts; when the mount is busy (a container or overlay still uses it)
/// detaches it instead, and the kernel ends the connection when the last user
/// lets go. Not being mounted is not an error.
pub fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    let err = |source| MountError::Unmount {
        path: mountpoint.to_path_buf(),
        source,
    };
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => {}
        Err(Errno::EBUSY) => {
            warn!(mountpoint = %mountpoint.display(), "mount busy; detaching it lazily");
            nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH).map_err(err)?;
        }
        Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(err(e)),
    }
    info!(mountpoint = %mountpoint.display(), "unmounted");
    Ok(())
}

/// The device number of the filesystem mounted at `mountpoint`.
pub fn mounted_dev(mountpoint: &Path) -> std::io::Result<u64> {
    std::fs::metadata(mountpoint).map(|m| m.dev())
}

/// Sets the readahead window of the mount with device `dev` (the FUSE INIT
/// reply cannot raise it above the kernel's default). Best effort: sysfs may
/// be read-only here.
pub fn set_read_ahead(dev: u64, kib: u32) {
    if kib == 0 {
        return;
    }
    let path = bdi_path(dev);
    match std::fs::write(&path, format!("{kib}\n")) {
        Ok(()) => info!(path = %path.display(), kib, "readahead set"),
        Err(e) => warn!(path = %path.display(), error = %e, "cannot set readahead"),
    }
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts the FUSE connection of the mount with device `dev`: every pending
/// and future request fails with ENOTCONN and the session's readers see
/// ENODEV. The way out when a lazily detached mount is still in use. Mounts
/// the fusectl filesystem if it is not mounted yet.
pub fn abort_connection(dev: u64) -> std::io::Result<()> {
    let dir = PathBuf::from(FUSECTL).join(libc::minor(dev).to_string());
    if !dir.exists() {
        nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
    }
    std::fs::write(dir.join("abort"), "1\n")?;
    warn!(connection = %dir.display(), "FUSE connection aborted");
    Ok(())
}

fn bdi_path(dev: u64) -> PathBuf {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    PathBuf::from(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
}

/// Whether `path` is the mountpoint of a Lode mount
/// ([`contract::FUSE_FS_TYPE`]), per /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        left.split(' ').nth(4) == Some(&*want)
            && right.split(' ').next() == Some(contract::FUSE_FS_TYPE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_string_has_the_root_mode_and_access_options() {
        let data = MountOptions::lode(libc::S_IFDIR | 0o755).data(7);
        assert_eq!(
            data,
            "fd=7,rootmode=40755,user_id=0,group_id=0,default_permissions,allow_other,max_read=1048576"
        );
        assert!(MountOptions::flags().contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn bdi_path_uses_major_and_minor() {
        assert_eq!(
            bdi_path(libc::makedev(0, 52)),
            PathBuf::from("/sys/class/bdi/0:52/read_ahead_kb")
        );
    }

    #[test]
    fn unmounted_paths_are_not_reported_mounted() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(dir.path()));
    }
}
