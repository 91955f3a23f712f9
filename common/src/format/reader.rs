//! Bounds-checked, zero-copy access to a bootstrap held in an mmap (or a Vec).
//!
//! Nothing is parsed up front beyond the header and section table: every
//! accessor reads the one record it needs and checks every offset, index and
//! length it follows, so a corrupt or hostile bootstrap yields a
//! [`FormatError`], never a panic or an out-of-bounds read.

use std::path::Path;

use super::{BlobIndex, BlobRecord, ChunkIndex, ChunkRecord, FormatError, Ino};

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// The attributes of one inode, copied out of its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub kind: InodeKind,
    /// Full `st_mode`: file type bits and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// File size; for symlinks the target length; for directories 0.
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// One directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: Ino,
}

/// An open bootstrap.
pub struct Bootstrap {
    // Filled in by the implementation (mmap or owned bytes + parsed header).
}

impl Bootstrap {
    /// Maps the file at `path` and validates header, checksum and section table.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let _ = path;
        todo!()
    }

    /// Same as [`Bootstrap::open`] over bytes in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        let _ = bytes;
        todo!()
    }

    /// Chunk size of the image (every chunk but a file's last has this size).
    pub fn chunk_size(&self) -> u32 {
        todo!()
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        todo!()
    }

    /// The checksum recorded in the header (identifies this bootstrap).
    pub fn checksum(&self) -> u32 {
        todo!()
    }

    pub fn inode(&self, ino: Ino) -> Result<Inode, FormatError> {
        let _ = ino;
        todo!()
    }

    /// Looks `name` up in directory `dir` (binary search over sorted entries).
    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Inode>, FormatError> {
        let _ = (dir, name);
        todo!()
    }

    /// Parent directory of directory `dir` (the root is its own parent).
    pub fn parent(&self, dir: Ino) -> Result<Ino, FormatError> {
        let _ = dir;
        todo!()
    }

    /// Number of entries of directory `dir` (without `.` and `..`).
    pub fn dir_len(&self, dir: Ino) -> Result<u32, FormatError> {
        let _ = dir;
        todo!()
    }

    /// Entry number `index` of directory `dir`, in name order; `None` past the end.
    pub fn dir_entry(&self, dir: Ino, index: u32) -> Result<Option<DirEntry<'_>>, FormatError> {
        let _ = (dir, index);
        todo!()
    }

    pub fn symlink_target(&self, ino: Ino) -> Result<&[u8], FormatError> {
        let _ = ino;
        todo!()
    }

    /// Value of extended attribute `name` of `ino`, if set.
    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<&[u8]>, FormatError> {
        let _ = (ino, name);
        todo!()
    }

    /// Names of all extended attributes of `ino`, in name order.
    pub fn xattr_names(&self, ino: Ino) -> Result<Vec<&[u8]>, FormatError> {
        let _ = ino;
        todo!()
    }

    /// Number of chunks of regular file `ino`.
    pub fn file_chunk_count(&self, ino: Ino) -> Result<u32, FormatError> {
        let _ = ino;
        todo!()
    }

    /// The chunk holding bytes `index * chunk_size ..` of regular file `ino`.
    pub fn file_chunk(&self, ino: Ino, index: u32) -> Result<ChunkIndex, FormatError> {
        let _ = (ino, index);
        todo!()
    }

    pub fn chunk_count(&self) -> u32 {
        todo!()
    }

    pub fn chunk(&self, index: ChunkIndex) -> Result<ChunkRecord, FormatError> {
        let _ = index;
        todo!()
    }

    pub fn blob_count(&self) -> u32 {
        todo!()
    }

    pub fn blob(&self, index: BlobIndex) -> Result<BlobRecord, FormatError> {
        let _ = index;
        todo!()
    }

    /// Files to prefetch, in order.
    pub fn prefetch_list(&self) -> Result<Vec<Ino>, FormatError> {
        todo!()
    }

    /// Walks and checks every record (all inodes, entries, names, chunks,
    /// xattrs and cross references). Used by `lodectl` after writing and by the
    /// fuzz target; fsd relies on per-access checks instead.
    pub fn verify_all(&self) -> Result<(), FormatError> {
        todo!()
    }
}
