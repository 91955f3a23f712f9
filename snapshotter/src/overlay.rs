//! Overlay mounts as containerd's own overlay snapshotter builds them, and
//! the start-up check that the root directory can hold overlay upper dirs.

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

const OVERLAYFS_MAGIC: i64 = 0x794c_7630;
const ZFS_MAGIC: i64 = 0x2fc1_2fc1;

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{path}: {message}")]
    Unsuitable { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootError + '_ {
    move |source| RootError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a snapshot's mounts are made of, nearest layer first.
pub struct Layers {
    /// The snapshot's own directories, when it is writable.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Its own directory when it is a view or has no parents.
    pub own: PathBuf,
    /// Lower directories, the nearest parent first.
    pub lowers: Vec<PathBuf>,
}

/// The mounts for a snapshot, following containerd's overlay snapshotter:
/// a bind mount when there is a single directory to show, overlay otherwise.
pub fn mounts(layers: &Layers) -> Vec<Mount> {
    let bind = |source: &Path, mode: &str| Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    };
    if layers.lowers.is_empty() {
        let mode = if layers.upper.is_some() { "rw" } else { "ro" };
        return vec![bind(&layers.own, mode)];
    }
    let mut options = Vec::new();
    match &layers.upper {
        Some((upper, work)) => {
            options.push(format!("workdir={}", work.display()));
            options.push(format!("upperdir={}", upper.display()));
        }
        None if layers.lowers.len() == 1 => return vec![bind(&layers.lowers[0], "ro")],
        None => {}
    }
    let lowers: Vec<String> = layers
        .lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    options.push(format!("lowerdir={}", lowers.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

/// Refuses a root directory overlayfs cannot use for upper dirs: one on
/// overlayfs or zfs, or on a filesystem without d_type. Then mounts a tiny
/// overlay there once, so a kernel without overlayfs fails here, clearly,
/// rather than at the first container.
pub fn validate_root(root: &Path) -> Result<(), RootError> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let stat = nix::sys::statfs::statfs(root).map_err(|e| io(root)(e.into()))?;
    let magic = stat.filesystem_type().0 as i64;
    let unsuitable = |message: &str| RootError::Unsuitable {
        path: root.display().to_string(),
        message: message.to_string(),
    };
    if magic == OVERLAYFS_MAGIC {
        return Err(unsuitable(
            "is on overlayfs, which cannot hold overlay upper directories; choose a root on ext4 or xfs",
        ));
    }
    if magic == ZFS_MAGIC {
        return Err(unsuitable(
            "is on zfs, which overlayfs does not support as an upper filesystem; choose a root on ext4 or xfs",
        ));
    }
    let probe = tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(root)
        .map_err(io(root))?;
    check_d_type(probe.path())?;
    probe_overlay(probe.path())
}

fn check_d_type(dir: &Path) -> Result<(), RootError> {
    std::fs::create_dir(dir.join("entry")).map_err(io(dir))?;
    let mut dir_stream = nix::dir::Dir::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io(dir)(e.into()))?;
    for entry in dir_stream.iter() {
        let entry = entry.map_err(|e| io(dir)(e.into()))?;
        if entry.file_name().to_bytes() == b"entry" {
            return match entry.file_type() {
                Some(nix::dir::Type::Directory) => Ok(()),
                _ => Err(RootError::Unsuitable {
                    path: dir.display().to_string(),
                    message: "the filesystem does not report d_type in directory entries, which overlayfs needs (xfs: format with ftype=1)".into(),
                }),
            };
        }
    }
    Err(RootError::Unsuitable {
        path: dir.display().to_string(),
        message: "a directory entry just created is missing from its directory".into(),
    })
}

fn probe_overlay(dir: &Path) -> Result<(), RootError> {
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|n| dir.join(n));
    for d in [&lower, &upper, &work, &merged] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| RootError::Unsuitable {
        path: dir.display().to_string(),
        message: format!("cannot mount overlayfs here ({e}); is the overlay module loaded?"),
    })?;
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| io(&merged)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn an_active_snapshot_without_parents_is_a_writable_bind() {
        let m = mounts(&Layers {
            upper: Some((p("/s/1/fs"), p("/s/1/work"))),
            own: p("/s/1/fs"),
            lowers: vec![],
        });
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].options, ["rw", "rbind"]);
    }

    #[test]
    fn a_view_of_one_layer_is_a_read_only_bind_of_it() {
        let m = mounts(&Layers {
            upper: None,
            own: p("/s/2/fs"),
            lowers: vec![p("/s/1/fs")],
        });
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/s/1/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn layers_are_listed_nearest_first() {
        let m = mounts(&Layers {
            upper: Some((p("/s/3/fs"), p("/s/3/work"))),
            own: p("/s/3/fs"),
            lowers: vec![p("/s/2/fs"), p("/s/1/fs")],
        });
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "workdir=/s/3/work",
                "upperdir=/s/3/fs",
                "lowerdir=/s/2/fs:/s/1/fs"
            ]
        );
    }

    #[test]
    fn a_root_on_tmpfs_or_ext4_passes_when_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: overlay probe needs root");
            return;
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        validate_root(dir.path()).unwrap();
    }
}
