//! The filesystem's logic, free of FUSE plumbing: every operation is a plain
//! method returning `Result<_, FsError>`, so tests call them without a mount
//! and [`crate::fuse`] only converts replies.
//!
//! Nothing here depends on per-process state the kernel could observe: inode
//! numbers are the bootstrap's, file handles are the inode number, and
//! directory offsets are entry positions. A process that takes over the
//! /dev/fuse connection with the same bootstrap answers identically.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileHandle, FileType, FopenFlags, INodeNo};
use lode_common::format::{Bootstrap, Ino, Inode, InodeKind};

use crate::fs::errno::FsError;
use crate::read::fetch::Fetcher;

/// Block size reported by stat and statfs.
const BLOCK_SIZE: u32 = 4096;
/// Longest name the kernel may ask about.
const NAME_MAX: u32 = 255;

/// How long the kernel may cache what we tell it.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    pub entry: Duration,
    pub attr: Duration,
}

/// One directory entry as readdir reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirItem<'a> {
    pub ino: Ino,
    /// The offset the kernel passes back to continue after this entry.
    pub next_offset: u64,
    pub kind: FileType,
    pub name: &'a [u8],
}

/// Answer to getxattr/listxattr: the size when the caller asked for it (size 0),
/// otherwise the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// What statfs reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub bsize: u32,
    pub namelen: u32,
}

impl StatFs {
    /// What a mount with no image reports.
    pub fn empty() -> Self {
        Self {
            blocks: 0,
            files: 0,
            bsize: BLOCK_SIZE,
            namelen: NAME_MAX,
        }
    }

    /// Both images' totals, as a mount serving both reports them.
    pub fn plus(self, other: Self) -> Self {
        Self {
            blocks: self.blocks.saturating_add(other.blocks),
            files: self.files.saturating_add(other.files),
            ..self
        }
    }
}

/// One mounted image instance.
pub struct LodeFs {
    bootstrap: Arc<Bootstrap>,
    fetcher: Arc<Fetcher>,
    pub ttls: Ttls,
}

impl LodeFs {
    pub fn new(fetcher: Arc<Fetcher>, ttls: Ttls) -> Self {
        Self {
            bootstrap: Arc::clone(fetcher.bootstrap()),
            fetcher,
            ttls,
        }
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<FileAttr, FsError> {
        let dir = self.bootstrap.inode(parent)?;
        if dir.kind != InodeKind::Dir {
            return Err(FsError::NotDir(parent.0));
        }
        match self.bootstrap.lookup(parent, name)? {
            Some(inode) => Ok(self.attr(&inode)),
            None => Err(FsError::NotFound {
                dir: parent.0,
                name: String::from_utf8_lossy(name).into_owned(),
            }),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<FileAttr, FsError> {
        Ok(self.attr(&self.bootstrap.inode(ino)?))
    }

    /// Calls `add` for the entries of directory `ino` from `offset` on
    /// (`.` and `..` first) until it returns true (reply buffer full), with
    /// each entry's attributes when `with_attrs` (readdirplus).
    pub fn readdir(
        &self,
        ino: Ino,
        offset: u64,
        with_attrs: bool,
        mut add: impl FnMut(DirItem<'_>, Option<&FileAttr>) -> bool,
    ) -> Result<(), FsError> {
        let dir = self.bootstrap.inode(ino)?;
        if dir.kind != InodeKind::Dir {
            return Err(FsError::NotDir(ino.0));
        }
        let attr_of = |inode: &Inode| with_attrs.then(|| self.attr(inode));
        if offset == 0 {
            let item = DirItem {
                ino,
                next_offset: 1,
                kind: FileType::Directory,
                name: b".",
            };
            if add(item, attr_of(&dir).as_ref()) {
                return Ok(());
            }
        }
        if offset <= 1 {
            let parent = self.bootstrap.parent(ino)?;
            let parent_inode = if with_attrs {
                Some(self.bootstrap.inode(parent)?)
            } else {
                None
            };
            let item = DirItem {
                ino: parent,
                next_offset: 2,
                kind: FileType::Directory,
                name: b"..",
            };
            if add(item, parent_inode.as_ref().and_then(attr_of).as_ref()) {
                return Ok(());
            }
        }
        let first = u32::try_from(offset.saturating_sub(2)).unwrap_or(u32::MAX);
        let mut index = first;
        while let Some(entry) = self.bootstrap.dir_entry(ino, index)? {
            let inode = self.bootstrap.inode(entry.ino)?;
            let item = DirItem {
                ino: entry.ino,
                next_offset: u64::from(index) + 3,
                kind: file_type(inode.kind),
                name: entry.name,
            };
            if add(item, attr_of(&inode).as_ref()) {
                break;
            }
            index += 1;
        }
        Ok(())
    }

    pub fn opendir(&self, ino: Ino) -> Result<(FileHandle, FopenFlags), FsError> {
        let inode = self.bootstrap.inode(ino)?;
        if inode.kind != InodeKind::Dir {
            return Err(FsError::NotDir(ino.0));
        }
        Ok((
            FileHandle(ino.0),
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        ))
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<bytes::Bytes, FsError> {
        Ok(self.fetcher.read(ino, offset, size)?)
    }

    pub fn readlink(&self, ino: Ino) -> Result<&[u8], FsError> {
        let inode = self.bootstrap.inode(ino)?;
        if inode.kind != InodeKind::Symlink {
            return Err(FsError::NotSymlink(ino.0));
        }
        Ok(self.bootstrap.symlink_target(ino)?)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<XattrReply, FsError> {
        match self.bootstrap.xattr(ino, name)? {
            Some(value) => sized_reply(value.to_vec(), size),
            None => Err(FsError::NoXattr {
                ino: ino.0,
                name: String::from_utf8_lossy(name).into_owned(),
            }),
        }
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: Ino, size: u32) -> Result<XattrReply, FsError> {
        let mut list = Vec::new();
        for name in self.bootstrap.xattr_names(ino)? {
            list.extend_from_slice(name);
            list.push(0);
        }
        sized_reply(list, size)
    }

    pub fn statfs(&self) -> StatFs {
        let bytes: u64 = (0..self.bootstrap.blob_count())
            .filter_map(|i| self.bootstrap.blob(lode_common::format::BlobIndex(i)).ok())
            .map(|b| b.uncompressed_size)
            .sum();
        StatFs {
            blocks: bytes.div_ceil(u64::from(BLOCK_SIZE)),
            files: self.bootstrap.inode_count(),
            bsize: BLOCK_SIZE,
            namelen: NAME_MAX,
        }
    }

    /// Permission bits are checked by the kernel (`default_permissions`);
    /// only writing is refused here.
    pub fn access(&self, ino: Ino, mask: i32) -> Result<(), FsError> {
        self.bootstrap.inode(ino)?;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    pub fn attr(&self, inode: &Inode) -> FileAttr {
        let mtime = system_time(inode.mtime_sec, inode.mtime_nsec);
        FileAttr {
            ino: INodeNo(inode.ino.0),
            size: inode.size,
            blocks: inode.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(inode.kind),
            perm: (inode.mode & 0o7777) as u16,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: encode_dev(inode.rdev_major, inode.rdev_minor),
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }
}

fn sized_reply(data: Vec<u8>, size: u32) -> Result<XattrReply, FsError> {
    if size == 0 {
        let len = u32::try_from(data.len()).map_err(|_| FsError::Range {
            needed: data.len(),
            size,
        })?;
        return Ok(XattrReply::Size(len));
    }
    if data.len() > size as usize {
        return Err(FsError::Range {
            needed: data.len(),
            size,
        });
    }
    Ok(XattrReply::Data(data))
}

pub fn file_type(kind: InodeKind) -> FileType {
    match kind {
        InodeKind::Dir => FileType::Directory,
        InodeKind::File => FileType::RegularFile,
        InodeKind::Symlink => FileType::Symlink,
        InodeKind::CharDevice => FileType::CharDevice,
        InodeKind::BlockDevice => FileType::BlockDevice,
        InodeKind::Fifo => FileType::NamedPipe,
        InodeKind::Socket => FileType::Socket,
    }
}

/// The kernel's 32-bit device encoding that FUSE carries (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    let secs = Duration::from_secs(sec.unsigned_abs());
    let whole = if sec >= 0 {
        UNIX_EPOCH.checked_add(secs)
    } else {
        UNIX_EPOCH.checked_sub(secs)
    };
    whole
        .and_then(|t| t.checked_add(nsec))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
