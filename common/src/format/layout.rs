//! On-disk record layout (see docs/format.md).
//!
//! Everything here is plain byte shuffling shared by the writer and the reader:
//! the header, the section table, the checksum, and one struct per record type
//! with its little-endian encoding. Records are decoded field by field from
//! fixed-size arrays, so a record can never be read past its end whatever the
//! bytes say.

/// First eight bytes of every bootstrap.
pub const MAGIC: [u8; 8] = *b"LODEBST\0";
/// The format version this build writes.
pub const VERSION: u32 = 2;
/// The oldest version this build reads: version 1 differs only in its
/// prefetch records, which name whole files.
pub const OLDEST_READ_VERSION: u32 = 1;
/// Size of the header; sections start at or after it.
pub const HEADER_SIZE: usize = 256;
/// Every section starts at a multiple of this.
pub const SECTION_ALIGN: usize = 8;

/// Byte offsets of the header fields (see docs/format.md).
pub const VERSION_OFFSET: usize = 8;
pub const FLAGS_OFFSET: usize = 12;
/// Header flag: the chunk digests are BLAKE3 (without it, sha256).
pub const FLAG_BLAKE3_CHUNKS: u32 = 1;
pub const CHUNK_SIZE_OFFSET: usize = 16;
/// Byte offset of the crc32 in the header; it is hashed as four zero bytes.
pub const CHECKSUM_OFFSET: usize = 20;
pub const FILE_LEN_OFFSET: usize = 24;
/// The section table: one (offset u64, length u64) pair per [`Section`].
pub const SECTION_TABLE_OFFSET: usize = 32;
/// Start of the reserved, all-zero tail of the header.
pub const RESERVED_OFFSET: usize = SECTION_TABLE_OFFSET + SECTION_COUNT * 16;

/// Largest name of a directory entry (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Largest symlink target (Linux `PATH_MAX` less the terminating NUL).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Largest extended attribute name (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest extended attribute value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;
/// Permission bits, including setuid, setgid and sticky.
pub const PERM_MASK: u32 = 0o7777;

/// Chunk flag: the stored bytes are one zstd frame.
pub const CHUNK_FLAG_ZSTD: u32 = 1;

pub(crate) const NSEC_PER_SEC: u32 = 1_000_000_000;

/// Number of sections in the section table.
pub const SECTION_COUNT: usize = 8;

/// The sections of a bootstrap, in section-table order (which is also the
/// order the writer lays them out in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Inodes = 0,
    Dirents = 1,
    FileChunks = 2,
    Chunks = 3,
    Blobs = 4,
    Xattrs = 5,
    Prefetch = 6,
    Strings = 7,
}

impl Section {
    pub const ALL: [Section; SECTION_COUNT] = [
        Section::Inodes,
        Section::Dirents,
        Section::FileChunks,
        Section::Chunks,
        Section::Blobs,
        Section::Xattrs,
        Section::Prefetch,
        Section::Strings,
    ];

    /// Size of one record in a bootstrap of `version`; a section's length
    /// is a multiple of it.
    pub const fn record_size(self, version: u32) -> usize {
        match self {
            Section::Inodes => InodeRecord::SIZE,
            Section::Dirents => DirentRecord::SIZE,
            Section::Prefetch if version >= 2 => PrefetchRecord::SIZE,
            Section::FileChunks | Section::Prefetch => 4,
            Section::Chunks => RawChunk::SIZE,
            Section::Blobs => RawBlob::SIZE,
            Section::Xattrs => XattrRecord::SIZE,
            Section::Strings => 1,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Section::Inodes => "inodes",
            Section::Dirents => "dirents",
            Section::FileChunks => "file_chunks",
            Section::Chunks => "chunks",
            Section::Blobs => "blobs",
            Section::Xattrs => "xattrs",
            Section::Prefetch => "prefetch",
            Section::Strings => "strings",
        }
    }
}

/// A prefetch record (version 2): chunks `first_chunk..first_chunk +
/// chunk_count` (numbered within the file) of the file at inode index
/// `inode_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchRecord {
    pub inode_index: u32,
    pub first_chunk: u32,
    pub chunk_count: u32,
}

impl PrefetchRecord {
    pub const SIZE: usize = 12;

    pub fn decode(bytes: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(bytes);
        Self {
            inode_index: r.u32(),
            first_chunk: r.u32(),
            chunk_count: r.u32(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.inode_index);
        put_u32(out, self.first_chunk);
        put_u32(out, self.chunk_count);
    }
}

/// Where a section lies in the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectionEntry {
    pub offset: u64,
    pub length: u64,
}

/// The decoded header, before any validation beyond its own size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    pub flags: u32,
    pub chunk_size: u32,
    pub checksum: u32,
    pub file_len: u64,
    pub sections: [SectionEntry; SECTION_COUNT],
    /// Whether the reserved tail of the header is all zero.
    pub reserved_zero: bool,
}

impl Header {
    pub fn decode(bytes: &[u8; HEADER_SIZE]) -> Self {
        let mut r = Le(bytes);
        let magic = r.array();
        let version = r.u32();
        let flags = r.u32();
        let chunk_size = r.u32();
        let checksum = r.u32();
        let file_len = r.u64();
        let sections = std::array::from_fn(|_| SectionEntry {
            offset: r.u64(),
            length: r.u64(),
        });
        let reserved_zero = r.0.iter().all(|&b| b == 0);
        Header {
            magic,
            version,
            flags,
            chunk_size,
            checksum,
            file_len,
            sections,
            reserved_zero,
        }
    }

    /// Encodes the header; the reserved tail is written as zeros.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = Vec::with_capacity(HEADER_SIZE);
        out.extend_from_slice(&self.magic);
        put_u32(&mut out, self.version);
        put_u32(&mut out, self.flags);
        put_u32(&mut out, self.chunk_size);
        put_u32(&mut out, self.checksum);
        put_u64(&mut out, self.file_len);
        for s in &self.sections {
            put_u64(&mut out, s.offset);
            put_u64(&mut out, s.length);
        }
        let mut header = [0u8; HEADER_SIZE];
        let n = out.len().min(HEADER_SIZE);
        header[..n].copy_from_slice(&out[..n]);
        header
    }
}

/// crc32 of a whole bootstrap with the checksum field taken as zero.
pub fn compute_checksum(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let (head, rest) = bytes.split_at(CHECKSUM_OFFSET.min(bytes.len()));
    h.update(head);
    let field = rest.len().min(4);
    h.update(&[0u8; 4][..field]);
    h.update(rest.get(field..).unwrap_or_default());
    h.finalize()
}

/// Recomputes and stores the checksum of a bootstrap in place. Used by the
/// writer, and by tests that craft hostile but well-checksummed bootstraps.
pub fn fix_checksum(bytes: &mut [u8]) {
    let crc = compute_checksum(bytes);
    if let Some(field) = bytes.get_mut(CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

/// One inode, 64 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeRecord {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Inode index of the parent directory (directories only; root: itself).
    pub parent: u32,
    /// Directory: first dirent; file: first file-chunk slot; symlink: heap offset of the target.
    pub data_start: u32,
    /// Directory: entry count; file: chunk count; symlink: target length.
    pub data_count: u32,
    pub xattr_start: u32,
    pub xattr_count: u32,
}

impl InodeRecord {
    pub const SIZE: usize = 64;

    pub fn decode(rec: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(rec);
        InodeRecord {
            mode: r.u32(),
            uid: r.u32(),
            gid: r.u32(),
            nlink: r.u32(),
            size: r.u64(),
            mtime_sec: r.i64(),
            mtime_nsec: r.u32(),
            rdev_major: r.u32(),
            rdev_minor: r.u32(),
            parent: r.u32(),
            data_start: r.u32(),
            data_count: r.u32(),
            xattr_start: r.u32(),
            xattr_count: r.u32(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.mode);
        put_u32(out, self.uid);
        put_u32(out, self.gid);
        put_u32(out, self.nlink);
        put_u64(out, self.size);
        out.extend_from_slice(&self.mtime_sec.to_le_bytes());
        put_u32(out, self.mtime_nsec);
        put_u32(out, self.rdev_major);
        put_u32(out, self.rdev_minor);
        put_u32(out, self.parent);
        put_u32(out, self.data_start);
        put_u32(out, self.data_count);
        put_u32(out, self.xattr_start);
        put_u32(out, self.xattr_count);
    }
}

/// One directory entry, 16 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirentRecord {
    pub name_offset: u32,
    pub name_len: u32,
    pub inode: u32,
    pub reserved: u32,
}

impl DirentRecord {
    pub const SIZE: usize = 16;

    pub fn decode(rec: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(rec);
        DirentRecord {
            name_offset: r.u32(),
            name_len: r.u32(),
            inode: r.u32(),
            reserved: r.u32(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.name_offset);
        put_u32(out, self.name_len);
        put_u32(out, self.inode);
        put_u32(out, self.reserved);
    }
}

/// One chunk, 64 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawChunk {
    pub digest: [u8; 32],
    pub compressed_offset: u64,
    pub uncompressed_offset: u64,
    pub compressed_size: u32,
    pub uncompressed_size: u32,
    pub blob: u32,
    pub flags: u32,
}

impl RawChunk {
    pub const SIZE: usize = 64;

    pub fn decode(rec: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(rec);
        RawChunk {
            digest: r.array(),
            compressed_offset: r.u64(),
            uncompressed_offset: r.u64(),
            compressed_size: r.u32(),
            uncompressed_size: r.u32(),
            blob: r.u32(),
            flags: r.u32(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digest);
        put_u64(out, self.compressed_offset);
        put_u64(out, self.uncompressed_offset);
        put_u32(out, self.compressed_size);
        put_u32(out, self.uncompressed_size);
        put_u32(out, self.blob);
        put_u32(out, self.flags);
    }
}

/// One blob, 64 bytes (56 used, 8 reserved).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawBlob {
    pub digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub first_chunk: u32,
    pub chunk_count: u32,
    pub reserved: u64,
}

impl RawBlob {
    pub const SIZE: usize = 64;

    pub fn decode(rec: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(rec);
        RawBlob {
            digest: r.array(),
            compressed_size: r.u64(),
            uncompressed_size: r.u64(),
            first_chunk: r.u32(),
            chunk_count: r.u32(),
            reserved: r.u64(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digest);
        put_u64(out, self.compressed_size);
        put_u64(out, self.uncompressed_size);
        put_u32(out, self.first_chunk);
        put_u32(out, self.chunk_count);
        put_u64(out, self.reserved);
    }
}

/// One extended attribute, 16 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XattrRecord {
    pub name_offset: u32,
    pub name_len: u32,
    pub value_offset: u32,
    pub value_len: u32,
}

impl XattrRecord {
    pub const SIZE: usize = 16;

    pub fn decode(rec: &[u8; Self::SIZE]) -> Self {
        let mut r = Le(rec);
        XattrRecord {
            name_offset: r.u32(),
            name_len: r.u32(),
            value_offset: r.u32(),
            value_len: r.u32(),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.name_offset);
        put_u32(out, self.name_len);
        put_u32(out, self.value_offset);
        put_u32(out, self.value_len);
    }
}

/// Rounds `n` up to the section alignment.
pub(crate) fn align_up(n: usize) -> usize {
    n.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Sequential little-endian field reader over a fixed-size record.
struct Le<'a>(&'a [u8]);

impl Le<'_> {
    fn array<const K: usize>(&mut self) -> [u8; K] {
        match self.0.split_first_chunk::<K>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            // Only reachable if a decoder reads more fields than its record
            // size holds, which the layout tests rule out; zeros keep the
            // decoder total instead of panicking.
            None => [0; K],
        }
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.array())
    }
}

#[cfg(test)]
mod tests {
    use super::super::MIN_CHUNK_SIZE;
    use super::*;

    #[test]
    fn records_encode_to_their_declared_size_and_round_trip() {
        let inode = InodeRecord {
            mode: 1,
            uid: 2,
            gid: 3,
            nlink: 4,
            size: 5,
            mtime_sec: -6,
            mtime_nsec: 7,
            rdev_major: 8,
            rdev_minor: 9,
            parent: 10,
            data_start: 11,
            data_count: 12,
            xattr_start: 13,
            xattr_count: 14,
        };
        let mut out = Vec::new();
        inode.encode(&mut out);
        assert_eq!(out.len(), InodeRecord::SIZE);
        let arr: [u8; InodeRecord::SIZE] = out.try_into().unwrap();
        assert_eq!(InodeRecord::decode(&arr), inode);

        let dirent = DirentRecord {
            name_offset: 1,
            name_len: 2,
            inode: 3,
            reserved: 4,
        };
        let mut out = Vec::new();
        dirent.encode(&mut out);
        let arr: [u8; DirentRecord::SIZE] = out.try_into().unwrap();
        assert_eq!(DirentRecord::decode(&arr), dirent);

        let chunk = RawChunk {
            digest: [7; 32],
            compressed_offset: 1,
            uncompressed_offset: 2,
            compressed_size: 3,
            uncompressed_size: 4,
            blob: 5,
            flags: 6,
        };
        let mut out = Vec::new();
        chunk.encode(&mut out);
        let arr: [u8; RawChunk::SIZE] = out.try_into().unwrap();
        assert_eq!(RawChunk::decode(&arr), chunk);

        let blob = RawBlob {
            digest: [9; 32],
            compressed_size: 1,
            uncompressed_size: 2,
            first_chunk: 3,
            chunk_count: 4,
            reserved: 0,
        };
        let mut out = Vec::new();
        blob.encode(&mut out);
        let arr: [u8; RawBlob::SIZE] = out.try_into().unwrap();
        assert_eq!(RawBlob::decode(&arr), blob);

        let xattr = XattrRecord {
            name_offset: 1,
            name_len: 2,
            value_offset: 3,
            value_len: 4,
        };
        let mut out = Vec::new();
        xattr.encode(&mut out);
        let arr: [u8; XattrRecord::SIZE] = out.try_into().unwrap();
        assert_eq!(XattrRecord::decode(&arr), xattr);
    }

    #[test]
    fn header_round_trips_and_fills_the_section_table() {
        let mut sections = [SectionEntry::default(); SECTION_COUNT];
        for (i, s) in sections.iter_mut().enumerate() {
            *s = SectionEntry {
                offset: 256 + i as u64 * 8,
                length: i as u64,
            };
        }
        let header = Header {
            magic: MAGIC,
            version: VERSION,
            flags: 0,
            chunk_size: MIN_CHUNK_SIZE,
            checksum: 0xdead_beef,
            file_len: 4096,
            sections,
            reserved_zero: true,
        };
        let bytes = header.encode();
        assert_eq!(RESERVED_OFFSET, 160);
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(&bytes[..8], &MAGIC);
        assert_eq!(word(VERSION_OFFSET), VERSION);
        assert_eq!(word(FLAGS_OFFSET), 0);
        assert_eq!(word(CHUNK_SIZE_OFFSET), MIN_CHUNK_SIZE);
        assert_eq!(word(FILE_LEN_OFFSET), 4096);
        assert_eq!(word(SECTION_TABLE_OFFSET + 16 * 3), 256 + 24);
        assert_eq!(word(SECTION_TABLE_OFFSET + 16 * 3 + 8), 3);
        assert_eq!(
            u32::from_le_bytes(bytes[CHECKSUM_OFFSET..][..4].try_into().unwrap()),
            0xdead_beef
        );
        assert_eq!(Header::decode(&bytes), header);
        let mut dirty = bytes;
        dirty[HEADER_SIZE - 1] = 1;
        assert!(!Header::decode(&dirty).reserved_zero);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut a = vec![5u8; 300];
        let before = compute_checksum(&a);
        a[CHECKSUM_OFFSET] = 0x42;
        assert_eq!(compute_checksum(&a), before);
        a[0] = 0;
        assert_ne!(compute_checksum(&a), before);
        // Short inputs are hashed without panicking.
        for n in 0..30 {
            compute_checksum(&a[..n]);
        }
    }
}
