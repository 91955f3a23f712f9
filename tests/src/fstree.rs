//! Capturing a directory tree (every attribute a container image carries)
//! and comparing two captures, e.g. a Lode mount against a reference unpack
//! of the same image.
//!
//! Paths are raw bytes relative to the captured root (the root itself is the
//! empty path), so non-UTF-8 names survive. Nothing is followed: symlinks are
//! recorded, never resolved.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use lode_common::digest::Hasher;
use lode_common::Digest;

use crate::KitError;

/// The type of a file, from its mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Regular,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    fn of(file_type: std::fs::FileType) -> Self {
        if file_type.is_dir() {
            FileKind::Dir
        } else if file_type.is_symlink() {
            FileKind::Symlink
        } else if file_type.is_char_device() {
            FileKind::CharDevice
        } else if file_type.is_block_device() {
            FileKind::BlockDevice
        } else if file_type.is_fifo() {
            FileKind::Fifo
        } else if file_type.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Regular
        }
    }
}

/// What [`TreeSnapshot::capture`] records of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: FileKind,
    /// Full `st_mode`: type bits and permission bits including setuid,
    /// setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub nlink: u64,
    pub dev: u64,
    pub ino: u64,
    /// Device number of character and block devices.
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub symlink_target: Option<Vec<u8>>,
    /// sha256 of a regular file's content.
    pub content: Option<Digest>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Every path below a root with its [`FileInfo`].
#[derive(Clone, Debug)]
pub struct TreeSnapshot {
    pub root: PathBuf,
    /// Relative path (raw bytes, no leading `/`; the root is empty) → info.
    pub entries: BTreeMap<Vec<u8>, FileInfo>,
}

/// Printable form of a relative path for messages.
pub fn show_path(path: &[u8]) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        format!("/{}", path.escape_ascii())
    }
}

impl TreeSnapshot {
    /// Walks `root` depth-first without following symlinks, reading every
    /// regular file's content (through the filesystem under test, which is
    /// the point) and every xattr.
    pub fn capture(root: &Path) -> Result<Self, KitError> {
        let mut entries = BTreeMap::new();
        let mut pending: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(relative) = pending.pop() {
            let path = join(root, &relative);
            let info = capture_one(&path)?;
            if info.kind == FileKind::Dir {
                let listing = std::fs::read_dir(&path)
                    .map_err(KitError::io(format!("list {}", path.display())))?;
                for child in listing {
                    let child = child.map_err(KitError::io(format!("list {}", path.display())))?;
                    let mut child_path = relative.clone();
                    if !child_path.is_empty() {
                        child_path.push(b'/');
                    }
                    child_path.extend_from_slice(&child.file_name().into_vec());
                    pending.push(child_path);
                }
            }
            entries.insert(relative, info);
        }
        Ok(Self {
            root: root.to_path_buf(),
            entries,
        })
    }

    /// For every non-directory path whose inode has more than one name in
    /// this tree: all the names of that inode, sorted.
    pub fn hardlink_groups(&self) -> BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>> {
        let mut by_inode: BTreeMap<(u64, u64), BTreeSet<Vec<u8>>> = BTreeMap::new();
        for (path, info) in &self.entries {
            if info.kind != FileKind::Dir {
                by_inode
                    .entry((info.dev, info.ino))
                    .or_default()
                    .insert(path.clone());
            }
        }
        let mut out = BTreeMap::new();
        for names in by_inode.into_values().filter(|n| n.len() > 1) {
            for name in &names {
                out.insert(name.clone(), names.clone());
            }
        }
        out
    }

    /// The info of `path` (relative, as stored).
    pub fn get(&self, path: &str) -> Option<&FileInfo> {
        self.entries.get(path.as_bytes())
    }

    /// Paths of regular files, for picking files to read.
    pub fn regular_files(&self) -> impl Iterator<Item = (&Vec<u8>, &FileInfo)> {
        self.entries
            .iter()
            .filter(|(_, info)| info.kind == FileKind::Regular)
    }
}

fn join(root: &Path, relative: &[u8]) -> PathBuf {
    if relative.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(relative))
    }
}

fn capture_one(path: &Path) -> Result<FileInfo, KitError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(KitError::io(format!("lstat {}", path.display())))?;
    let kind = FileKind::of(meta.file_type());
    let symlink_target = match kind {
        FileKind::Symlink => Some(
            std::fs::read_link(path)
                .map_err(KitError::io(format!("readlink {}", path.display())))?
                .into_os_string()
                .into_vec(),
        ),
        _ => None,
    };
    let content = match kind {
        FileKind::Regular => {
            Some(sha256_file(path).map_err(KitError::io(format!("read {}", path.display())))?)
        }
        _ => None,
    };
    let (rdev_major, rdev_minor) = match kind {
        FileKind::CharDevice | FileKind::BlockDevice => {
            (libc::major(meta.rdev()), libc::minor(meta.rdev()))
        }
        _ => (0, 0),
    };
    Ok(FileInfo {
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.size(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        nlink: meta.nlink(),
        dev: meta.dev(),
        ino: meta.ino(),
        rdev_major,
        rdev_minor,
        symlink_target,
        content,
        xattrs: read_xattrs(path).map_err(KitError::io(format!("xattrs of {}", path.display())))?,
    })
}

/// sha256 of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<Digest> {
    let mut file = File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))
}

/// All extended attributes of `path` itself (not a symlink's target).
pub fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = c_path(path)?;
    let names = xattr_call(|buf, len| {
        // SAFETY: `c` is a NUL-terminated path; `buf` points to `len`
        // writable bytes (or is null with len 0, the size query).
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })?;
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "xattr name with NUL"))?;
        let value = xattr_call(|buf, len| {
            // SAFETY: as above, with a NUL-terminated attribute name.
            unsafe { libc::lgetxattr(c.as_ptr(), c_name.as_ptr(), buf.cast(), len) }
        })?;
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// Runs a size-query-then-fetch xattr call, retrying if the value grows in
/// between. Filesystems without xattr support give an empty result.
fn xattr_call(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(err),
            };
        }
        let mut buf = vec![0u8; size.unsigned_abs()];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(err);
        }
        buf.truncate(got.unsigned_abs());
        return Ok(buf);
    }
}

/// Differences between `expected` and `actual`, one line each; empty when
/// the trees agree. Compared: the set of paths; per path the type, full
/// mode, owner, mtime to the nanosecond, xattrs, symlink targets, device
/// numbers, regular files' size and content, non-directories' link counts
/// and which paths share an inode. Directory sizes are not compared (they
/// are a property of the filesystem), nor directory link counts when
/// `expected` comes from a filesystem that does not count subdirectories
/// (nlink 1, e.g. btrfs).
pub fn compare_trees(expected: &TreeSnapshot, actual: &TreeSnapshot) -> Vec<String> {
    let mut diffs = Vec::new();
    for path in expected.entries.keys() {
        if !actual.entries.contains_key(path) {
            diffs.push(format!("{}: missing", show_path(path)));
        }
    }
    for path in actual.entries.keys() {
        if !expected.entries.contains_key(path) {
            diffs.push(format!("{}: unexpected", show_path(path)));
        }
    }
    for (path, want) in &expected.entries {
        if let Some(got) = actual.entries.get(path) {
            compare_entry(path, want, got, &mut diffs);
        }
    }
    let want_links = expected.hardlink_groups();
    let got_links = actual.hardlink_groups();
    let empty = BTreeSet::new();
    for path in want_links
        .keys()
        .chain(got_links.keys())
        .collect::<BTreeSet<_>>()
    {
        if !actual.entries.contains_key(path) || !expected.entries.contains_key(path) {
            continue;
        }
        let want = want_links.get(path).unwrap_or(&empty);
        let got = got_links.get(path).unwrap_or(&empty);
        if want != got {
            diffs.push(format!(
                "{}: shares its inode with {:?}, expected {:?}",
                show_path(path),
                got.iter().map(|p| show_path(p)).collect::<Vec<_>>(),
                want.iter().map(|p| show_path(p)).collect::<Vec<_>>(),
            ));
        }
    }
    diffs
}

fn compare_entry(path: &[u8], want: &FileInfo, got: &FileInfo, diffs: &mut Vec<String>) {
    let mut differ = |what: &str, want: String, got: String| {
        if want != got {
            diffs.push(format!(
                "{}: {what} is {got}, expected {want}",
                show_path(path)
            ));
        }
    };
    differ(
        "type",
        format!("{:?}", want.kind),
        format!("{:?}", got.kind),
    );
    if want.kind != got.kind {
        return;
    }
    differ(
        "mode",
        format!("{:o}", want.mode),
        format!("{:o}", got.mode),
    );
    differ("uid", want.uid.to_string(), got.uid.to_string());
    differ("gid", want.gid.to_string(), got.gid.to_string());
    differ(
        "mtime",
        format!("{}.{:09}", want.mtime_sec, want.mtime_nsec),
        format!("{}.{:09}", got.mtime_sec, got.mtime_nsec),
    );
    differ(
        "xattrs",
        show_xattrs(&want.xattrs),
        show_xattrs(&got.xattrs),
    );
    match want.kind {
        FileKind::Regular => {
            differ("size", want.size.to_string(), got.size.to_string());
            differ(
                "content sha256",
                format!("{:?}", want.content),
                format!("{:?}", got.content),
            );
        }
        FileKind::Symlink => {
            differ("size", want.size.to_string(), got.size.to_string());
            differ(
                "symlink target",
                show_opt(&want.symlink_target),
                show_opt(&got.symlink_target),
            );
        }
        FileKind::CharDevice | FileKind::BlockDevice => differ(
            "device",
            format!("{}:{}", want.rdev_major, want.rdev_minor),
            format!("{}:{}", got.rdev_major, got.rdev_minor),
        ),
        _ => {}
    }
    if want.kind != FileKind::Dir || want.nlink != 1 {
        differ("nlink", want.nlink.to_string(), got.nlink.to_string());
    }
}

fn show_opt(bytes: &Option<Vec<u8>>) -> String {
    match bytes {
        Some(b) => format!("{:?}", b.escape_ascii().to_string()),
        None => "none".to_owned(),
    }
}

fn show_xattrs(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let parts: Vec<String> = xattrs
        .iter()
        .map(|(k, v)| format!("{}={}", k.escape_ascii(), v.escape_ascii()))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    use super::*;

    fn sample(dir: &Path) {
        std::fs::create_dir(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/a"), "alpha").unwrap();
        std::fs::hard_link(dir.join("d/a"), dir.join("b")).unwrap();
        symlink("d/a", dir.join("s")).unwrap();
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"n-\xff")), "").unwrap();
    }

    #[test]
    fn identical_trees_compare_equal_and_hardlinks_are_grouped() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sample(a.path());
        sample(b.path());
        let (sa, sb) = (
            TreeSnapshot::capture(a.path()).unwrap(),
            TreeSnapshot::capture(b.path()).unwrap(),
        );
        let keys: Vec<String> = sa.entries.keys().map(|k| show_path(k)).collect();
        assert_eq!(keys, ["/", "/b", "/d", "/d/a", "/n-\\xff", "/s"]);
        assert_eq!(
            sa.get("s").unwrap().symlink_target.as_deref(),
            Some(&b"d/a"[..])
        );
        assert_eq!(sa.get("d/a").unwrap().content, Some(Digest::of(b"alpha")));
        assert_eq!(sa.hardlink_groups()[&b"b".to_vec()].len(), 2);
        // mtimes of freshly made trees differ; align them to compare the rest.
        let mut sb = sb;
        for (path, info) in &mut sb.entries {
            let want = &sa.entries[path];
            (info.mtime_sec, info.mtime_nsec) = (want.mtime_sec, want.mtime_nsec);
        }
        assert_eq!(compare_trees(&sa, &sb), Vec::<String>::new());
    }

    #[test]
    fn differences_are_reported_per_attribute() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        sample(a.path());
        sample(b.path());
        std::fs::write(b.path().join("d/a"), "other").unwrap();
        std::fs::set_permissions(b.path().join("d"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::remove_file(b.path().join("b")).unwrap();
        std::fs::write(b.path().join("b"), "alpha").unwrap();
        std::fs::write(b.path().join("extra"), "").unwrap();
        let sa = TreeSnapshot::capture(a.path()).unwrap();
        let sb = TreeSnapshot::capture(b.path()).unwrap();
        let diffs = compare_trees(&sa, &sb).join("\n");
        assert!(diffs.contains("/extra: unexpected"), "{diffs}");
        assert!(
            diffs.contains("/d: mode is 40700, expected 40755"),
            "{diffs}"
        );
        assert!(diffs.contains("/d/a: content sha256"), "{diffs}");
        assert!(diffs.contains("/d/a: nlink is 1, expected 2"), "{diffs}");
        assert!(
            diffs.contains("/b: shares its inode with [], expected"),
            "{diffs}"
        );
    }

    #[test]
    fn xattrs_are_read_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let c = c_path(&file).unwrap();
        // SAFETY: NUL-terminated path and name, value of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"user.k".as_ptr(),
                b"v\0w".as_ptr().cast(),
                3,
                0,
            )
        };
        if rc != 0 {
            // tmpfs before 6.6 and some overlay setups refuse user xattrs.
            let err = io::Error::last_os_error();
            crate::skip_unless(false, &format!("user xattrs unsupported here: {err}"));
            return;
        }
        symlink("f", dir.path().join("s")).unwrap();
        assert_eq!(
            read_xattrs(&file).unwrap(),
            BTreeMap::from([(b"user.k".to_vec(), b"v\0w".to_vec())])
        );
        assert!(read_xattrs(&dir.path().join("s")).unwrap().is_empty());
    }
}
