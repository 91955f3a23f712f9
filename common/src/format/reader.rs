//! Bounds-checked, zero-copy access to a bootstrap held in an mmap (or a Vec).
//!
//! Nothing is parsed up front beyond the header and section table: every
//! accessor reads the one record it needs and checks every offset, index and
//! length it follows, so a corrupt or hostile bootstrap yields a
//! [`FormatError`], never a panic or an out-of-bounds read.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use super::layout::{
    self, DirentRecord, InodeRecord, PrefetchRecord, RawBlob, RawChunk, Section, XattrRecord,
    CHUNK_FLAG_ZSTD, HEADER_SIZE, PERM_MASK, SECTION_COUNT,
};
use super::open::check_header;
use super::rules::{chunks_for_size, name_problem, symlink_problem};
use super::{
    BlobIndex, BlobRecord, ChunkDigest, ChunkHash, ChunkIndex, ChunkRecord, FormatError, Ino,
};
use crate::Digest;

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

impl InodeKind {
    /// The kind named by the file type bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & layout::S_IFMT {
            layout::S_IFDIR => InodeKind::Dir,
            layout::S_IFREG => InodeKind::File,
            layout::S_IFLNK => InodeKind::Symlink,
            layout::S_IFCHR => InodeKind::CharDevice,
            layout::S_IFBLK => InodeKind::BlockDevice,
            layout::S_IFIFO => InodeKind::Fifo,
            layout::S_IFSOCK => InodeKind::Socket,
            _ => return None,
        })
    }
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

/// Where the bootstrap bytes live.
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// An open bootstrap.
pub struct Bootstrap {
    backing: Backing,
    version: u32,
    chunk_size: u32,
    checksum: u32,
    chunk_hash: ChunkHash,
    /// Byte range of each section, checked to lie inside the file.
    sections: [Range<usize>; SECTION_COUNT],
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("len", &self.bytes().len())
            .field("chunk_size", &self.chunk_size)
            .field("checksum", &format_args!("{:08x}", self.checksum))
            .finish()
    }
}

impl Bootstrap {
    /// Maps the file at `path` and validates header, checksum and section table.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_SIZE as u64 {
            // Mapping an empty file fails; a short one is rejected anyway.
            return Err(FormatError::Truncated(format!(
                "{}: {len} bytes, shorter than the {HEADER_SIZE}-byte header",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and private. Bootstrap files live in
        // the daemon's own state directory and are written once before being
        // opened, and every byte is treated as untrusted input (all reads are
        // bounds-checked against the mapping's length), so unexpected content
        // cannot cause undefined behaviour. The remaining risk is another
        // process truncating the file while it is mapped, which makes reads of
        // the lost pages raise SIGBUS; nothing in Lode does that.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let b = Self::validate(Backing::Mmap(map), true)?;
        tracing::debug!(
            path = %path.display(),
            inodes = b.inode_count(),
            checksum = format_args!("{:08x}", b.checksum),
            "opened bootstrap"
        );
        Ok(b)
    }

    /// Same as [`Bootstrap::open`] over bytes in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::validate(Backing::Owned(bytes), true)
    }

    /// Like [`Bootstrap::from_bytes`] but without comparing the checksum, so
    /// that a fuzzer can reach the code behind it. Everything else is checked
    /// as usual.
    #[doc(hidden)]
    pub fn from_bytes_unchecked_checksum(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::validate(Backing::Owned(bytes), false)
    }

    fn validate(backing: Backing, check_crc: bool) -> Result<Self, FormatError> {
        let bytes = match &backing {
            Backing::Mmap(m) => &m[..],
            Backing::Owned(v) => &v[..],
        };
        let checked = check_header(bytes, check_crc)?;
        let b = Bootstrap {
            backing,
            version: checked.version,
            chunk_size: checked.chunk_size,
            checksum: checked.checksum,
            chunk_hash: checked.chunk_hash,
            sections: checked.sections,
        };
        if b.inode_count() == 0 {
            return Err(corrupt("no inodes (a root directory is required)".into()));
        }
        if b.inode_count() > u64::from(u32::MAX) {
            return Err(corrupt("more inodes than 32-bit indices can name".into()));
        }
        if b.inode(Ino::ROOT)?.kind != InodeKind::Dir {
            return Err(corrupt("root inode is not a directory".into()));
        }
        Ok(b)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }

    fn section(&self, s: Section) -> &[u8] {
        self.sections
            .get(s as usize)
            .and_then(|r| self.bytes().get(r.clone()))
            .unwrap_or_default()
    }

    /// Number of records in section `s`.
    pub(crate) fn records(&self, s: Section) -> u64 {
        (self.section(s).len() / s.record_size(self.version)) as u64
    }

    /// Record `index` of section `s` as a fixed-size array.
    pub(super) fn record<const N: usize>(
        &self,
        s: Section,
        index: u64,
    ) -> Result<&[u8; N], FormatError> {
        let bytes = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(N))
            .and_then(|start| self.section(s).get(start..)?.first_chunk::<N>());
        bytes.ok_or_else(|| {
            corrupt(format!(
                "{} record {index} out of range ({} records)",
                s.name(),
                self.records(s)
            ))
        })
    }

    /// `len` bytes at `offset` of the string heap.
    pub(crate) fn heap(&self, offset: u32, len: u32, what: &str) -> Result<&[u8], FormatError> {
        let start = offset as usize;
        start
            .checked_add(len as usize)
            .and_then(|end| self.section(Section::Strings).get(start..end))
            .ok_or_else(|| {
                corrupt(format!(
                    "{what}: heap range {offset}+{len} outside the {}-byte string heap",
                    self.section(Section::Strings).len()
                ))
            })
    }

    /// The raw record of `ino`.
    pub(crate) fn inode_record(&self, ino: Ino) -> Result<InodeRecord, FormatError> {
        let index = ino
            .0
            .checked_sub(1)
            .filter(|&i| i < self.inode_count())
            .ok_or(FormatError::NoSuchInode(ino.0))?;
        Ok(InodeRecord::decode(self.record(Section::Inodes, index)?))
    }

    /// The record of `ino` if it is of kind `want`.
    fn inode_of_kind(
        &self,
        ino: Ino,
        want: InodeKind,
        expected: &'static str,
    ) -> Result<InodeRecord, FormatError> {
        let rec = self.inode_record(ino)?;
        if kind_of(ino, rec.mode)? != want {
            return Err(FormatError::WrongKind {
                ino: ino.0,
                expected,
            });
        }
        Ok(rec)
    }

    /// Checks that `start..start + count` lies inside section `s` and returns it.
    pub(crate) fn range_in(
        &self,
        s: Section,
        start: u32,
        count: u32,
        ino: Ino,
    ) -> Result<Range<u64>, FormatError> {
        let end = u64::from(start) + u64::from(count);
        if end > self.records(s) {
            return Err(corrupt(format!(
                "inode {}: {} range {start}+{count} beyond the table's {} records",
                ino.0,
                s.name(),
                self.records(s)
            )));
        }
        Ok(u64::from(start)..end)
    }

    /// Inode number of the entry with inode index `index`.
    fn ino_of_index(
        &self,
        index: u32,
        context: impl FnOnce() -> String,
    ) -> Result<Ino, FormatError> {
        if u64::from(index) < self.inode_count() {
            Ok(Ino(u64::from(index) + 1))
        } else {
            Err(corrupt(format!(
                "{}: inode index {index} out of range ({} inodes)",
                context(),
                self.inode_count()
            )))
        }
    }

    /// Dirent `index` (absolute) with its checked name and target.
    pub(crate) fn dirent_at(&self, dir: Ino, index: u64) -> Result<DirEntry<'_>, FormatError> {
        let rec = DirentRecord::decode(self.record(Section::Dirents, index)?);
        let name = self.heap(rec.name_offset, rec.name_len, "directory entry name")?;
        if let Some(problem) = name_problem(name) {
            return Err(corrupt(format!(
                "directory {}: entry {:?}: {problem}",
                dir.0,
                String::from_utf8_lossy(name)
            )));
        }
        let ino = self.ino_of_index(rec.inode, || {
            format!(
                "directory {}: entry {:?}",
                dir.0,
                String::from_utf8_lossy(name)
            )
        })?;
        Ok(DirEntry { name, ino })
    }

    /// Name of dirent `index` (absolute), for the binary search.
    fn dirent_name(&self, index: u64) -> Result<&[u8], FormatError> {
        let rec = DirentRecord::decode(self.record(Section::Dirents, index)?);
        self.heap(rec.name_offset, rec.name_len, "directory entry name")
    }

    /// Xattr `index` (absolute) as (name, value).
    pub(crate) fn xattr_at(&self, ino: Ino, index: u64) -> Result<(&[u8], &[u8]), FormatError> {
        let rec = XattrRecord::decode(self.record(Section::Xattrs, index)?);
        let what = format!("inode {} xattr", ino.0);
        let name = self.heap(rec.name_offset, rec.name_len, &what)?;
        let value = self.heap(rec.value_offset, rec.value_len, &what)?;
        Ok((name, value))
    }

    /// Chunk size of the image (every chunk but a file's last has this size).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of inodes; valid inode numbers are `1..=inode_count()`.
    pub fn inode_count(&self) -> u64 {
        self.records(Section::Inodes)
    }

    /// The checksum recorded in the header (identifies this bootstrap).
    pub fn checksum(&self) -> u32 {
        self.checksum
    }

    pub fn inode(&self, ino: Ino) -> Result<Inode, FormatError> {
        let r = self.inode_record(ino)?;
        Ok(Inode {
            ino,
            kind: kind_of(ino, r.mode)?,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            nlink: r.nlink,
            size: r.size,
            mtime_sec: r.mtime_sec,
            mtime_nsec: r.mtime_nsec,
            rdev_major: r.rdev_major,
            rdev_minor: r.rdev_minor,
        })
    }

    /// Looks `name` up in directory `dir` (binary search over sorted entries).
    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Inode>, FormatError> {
        let rec = self.inode_of_kind(dir, InodeKind::Dir, "a directory")?;
        let range = self.range_in(Section::Dirents, rec.data_start, rec.data_count, dir)?;
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.dirent_name(mid)?.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let entry = self.dirent_at(dir, mid)?;
                    return self.inode(entry.ino).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// Parent directory of directory `dir` (the root is its own parent).
    pub fn parent(&self, dir: Ino) -> Result<Ino, FormatError> {
        let rec = self.inode_of_kind(dir, InodeKind::Dir, "a directory")?;
        let parent = self.ino_of_index(rec.parent, || format!("directory {} parent", dir.0))?;
        if self.inode(parent)?.kind != InodeKind::Dir {
            return Err(corrupt(format!(
                "directory {}: parent {} is not a directory",
                dir.0, parent.0
            )));
        }
        Ok(parent)
    }

    /// Number of entries of directory `dir` (without `.` and `..`).
    pub fn dir_len(&self, dir: Ino) -> Result<u32, FormatError> {
        let rec = self.inode_of_kind(dir, InodeKind::Dir, "a directory")?;
        self.range_in(Section::Dirents, rec.data_start, rec.data_count, dir)?;
        Ok(rec.data_count)
    }

    /// Entry number `index` of directory `dir`, in name order; `None` past the end.
    pub fn dir_entry(&self, dir: Ino, index: u32) -> Result<Option<DirEntry<'_>>, FormatError> {
        let rec = self.inode_of_kind(dir, InodeKind::Dir, "a directory")?;
        let range = self.range_in(Section::Dirents, rec.data_start, rec.data_count, dir)?;
        if index >= rec.data_count {
            return Ok(None);
        }
        self.dirent_at(dir, range.start + u64::from(index))
            .map(Some)
    }

    pub fn symlink_target(&self, ino: Ino) -> Result<&[u8], FormatError> {
        let rec = self.inode_of_kind(ino, InodeKind::Symlink, "a symlink")?;
        let target = self.heap(rec.data_start, rec.data_count, "symlink target")?;
        if let Some(problem) = symlink_problem(target) {
            return Err(corrupt(format!("inode {}: {problem}", ino.0)));
        }
        if rec.size != target.len() as u64 {
            return Err(corrupt(format!(
                "symlink {}: size {} but target has {} bytes",
                ino.0,
                rec.size,
                target.len()
            )));
        }
        Ok(target)
    }

    /// Value of extended attribute `name` of `ino`, if set.
    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<&[u8]>, FormatError> {
        let rec = self.inode_record(ino)?;
        let range = self.range_in(Section::Xattrs, rec.xattr_start, rec.xattr_count, ino)?;
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (n, value) = self.xattr_at(ino, mid)?;
            match n.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(value)),
            }
        }
        Ok(None)
    }

    /// Names of all extended attributes of `ino`, in name order.
    pub fn xattr_names(&self, ino: Ino) -> Result<Vec<&[u8]>, FormatError> {
        let rec = self.inode_record(ino)?;
        let range = self.range_in(Section::Xattrs, rec.xattr_start, rec.xattr_count, ino)?;
        range
            .map(|i| self.xattr_at(ino, i).map(|(n, _)| n))
            .collect()
    }

    /// Number of chunks of regular file `ino`.
    pub fn file_chunk_count(&self, ino: Ino) -> Result<u32, FormatError> {
        self.file_chunk_range(ino).map(|(_, count)| count)
    }

    /// First file-chunk slot and chunk count of file `ino`, checked against its size.
    fn file_chunk_range(&self, ino: Ino) -> Result<(u64, u32), FormatError> {
        let rec = self.inode_of_kind(ino, InodeKind::File, "a regular file")?;
        let range = self.range_in(Section::FileChunks, rec.data_start, rec.data_count, ino)?;
        let expected = chunks_for_size(rec.size, self.chunk_size);
        if u64::from(rec.data_count) != expected {
            return Err(corrupt(format!(
                "file {}: {} chunks for {} bytes, expected {expected}",
                ino.0, rec.data_count, rec.size
            )));
        }
        Ok((range.start, rec.data_count))
    }

    /// The chunk holding bytes `index * chunk_size ..` of regular file `ino`.
    pub fn file_chunk(&self, ino: Ino, index: u32) -> Result<ChunkIndex, FormatError> {
        let (start, count) = self.file_chunk_range(ino)?;
        if index >= count {
            return Err(FormatError::OutOfRange(format!(
                "chunk {index} of file {} (it has {count})",
                ino.0
            )));
        }
        let slot = self.record::<4>(Section::FileChunks, start + u64::from(index))?;
        let chunk = u32::from_le_bytes(*slot);
        if u64::from(chunk) >= self.records(Section::Chunks) {
            return Err(corrupt(format!(
                "file {}: chunk {index} refers to chunk {chunk}, the table has {}",
                ino.0,
                self.chunk_count()
            )));
        }
        Ok(ChunkIndex(chunk))
    }

    pub fn chunk_count(&self) -> u32 {
        // Chunk indices are u32; a table longer than that (a >256 GiB file)
        // has records no index can name, so saturating loses nothing.
        u32::try_from(self.records(Section::Chunks)).unwrap_or(u32::MAX)
    }

    pub fn chunk(&self, index: ChunkIndex) -> Result<ChunkRecord, FormatError> {
        if u64::from(index.0) >= self.records(Section::Chunks) {
            return Err(FormatError::OutOfRange(format!(
                "chunk {} (the table has {})",
                index.0,
                self.chunk_count()
            )));
        }
        let r = RawChunk::decode(self.record(Section::Chunks, u64::from(index.0))?);
        if u64::from(r.blob) >= self.records(Section::Blobs) {
            return Err(corrupt(format!(
                "chunk {}: blob index {} out of range ({} blobs)",
                index.0,
                r.blob,
                self.blob_count()
            )));
        }
        if r.flags & !CHUNK_FLAG_ZSTD != 0 {
            return Err(corrupt(format!(
                "chunk {}: unknown flags {:#x}",
                index.0, r.flags
            )));
        }
        Ok(ChunkRecord {
            digest: ChunkDigest::new(self.chunk_hash, r.digest),
            blob: BlobIndex(r.blob),
            compressed_offset: r.compressed_offset,
            compressed_size: r.compressed_size,
            uncompressed_offset: r.uncompressed_offset,
            uncompressed_size: r.uncompressed_size,
            compressed: r.flags & CHUNK_FLAG_ZSTD != 0,
        })
    }

    pub fn blob_count(&self) -> u32 {
        u32::try_from(self.records(Section::Blobs)).unwrap_or(u32::MAX)
    }

    pub fn blob(&self, index: BlobIndex) -> Result<BlobRecord, FormatError> {
        if u64::from(index.0) >= self.records(Section::Blobs) {
            return Err(FormatError::OutOfRange(format!(
                "blob {} (the table has {})",
                index.0,
                self.blob_count()
            )));
        }
        let r = RawBlob::decode(self.record(Section::Blobs, u64::from(index.0))?);
        let end = u64::from(r.first_chunk) + u64::from(r.chunk_count);
        if end > self.records(Section::Chunks) {
            return Err(corrupt(format!(
                "blob {}: chunks {}+{} beyond the chunk table ({} chunks)",
                index.0,
                r.first_chunk,
                r.chunk_count,
                self.chunk_count()
            )));
        }
        Ok(BlobRecord {
            digest: Digest::from_bytes(r.digest),
            compressed_size: r.compressed_size,
            uncompressed_size: r.uncompressed_size,
            first_chunk: ChunkIndex(r.first_chunk),
            chunk_count: r.chunk_count,
        })
    }

    /// What to prefetch, in order: stretches of regular files, each
    /// checked to lie inside its file. A version 1 bootstrap lists whole
    /// files (its empty files are left out).
    pub fn prefetch_list(&self) -> Result<Vec<PrefetchRange>, FormatError> {
        let mut list = Vec::new();
        for i in 0..self.records(Section::Prefetch) {
            // The listed chunks (first, count); a version 1 record names a
            // whole file.
            let (index, listed) = if self.version >= 2 {
                let rec = PrefetchRecord::decode(self.record(Section::Prefetch, i)?);
                (rec.inode_index, Some((rec.first_chunk, rec.chunk_count)))
            } else {
                let index = u32::from_le_bytes(*self.record(Section::Prefetch, i)?);
                (index, None)
            };
            let ino = self.ino_of_index(index, || format!("prefetch entry {i}"))?;
            if self.inode(ino)?.kind != InodeKind::File {
                return Err(corrupt(format!(
                    "prefetch entry {i}: inode {} is not a regular file",
                    ino.0
                )));
            }
            let count = self.file_chunk_count(ino)?;
            let chunks = match listed {
                Some((first, n)) => match first.checked_add(n) {
                    Some(end) if n > 0 && end <= count => first..end,
                    _ => {
                        return Err(corrupt(format!(
                            "prefetch entry {i}: chunks {first}+{n} of file {}, which has {count}",
                            ino.0
                        )))
                    }
                },
                None if count == 0 => continue,
                None => 0..count,
            };
            list.push(PrefetchRange { ino, chunks });
        }
        Ok(list)
    }
}

/// Chunks `chunks` (numbered within the file) of regular file `ino`, to
/// prefetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchRange {
    pub ino: Ino,
    pub chunks: Range<u32>,
}

/// The kind of the inode with `mode`, rejecting unknown type or stray bits.
pub(crate) fn kind_of(ino: Ino, mode: u32) -> Result<InodeKind, FormatError> {
    if mode & !(layout::S_IFMT | PERM_MASK) != 0 {
        return Err(corrupt(format!(
            "inode {}: mode {mode:#o} has unknown bits",
            ino.0
        )));
    }
    InodeKind::from_mode(mode).ok_or_else(|| {
        corrupt(format!(
            "inode {}: mode {mode:#o} has no known file type",
            ino.0
        ))
    })
}

pub(crate) fn corrupt(msg: String) -> FormatError {
    FormatError::Corrupt(msg)
}
