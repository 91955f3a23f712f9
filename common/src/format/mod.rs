//! The Lode image format, version 1 (specified in docs/format.md).
//!
//! A Lode image is a set of *data blobs* (one per source layer, holding
//! compressed chunks of file contents) plus one *bootstrap*: the metadata of the
//! whole merged filesystem in fixed-size little-endian records that are read in
//! place from an mmap, so opening a bootstrap costs the same for ten files or a
//! million, and untouched files cost no memory.
//!
//! - [`tree`]: the in-memory tree a converter builds ([`ImageTree`]).
//! - [`writer`]: serialises an [`ImageTree`] into bootstrap bytes.
//! - [`reader`]: [`Bootstrap`], bounds-checked access to bootstrap bytes.
//! - [`layout`]: the on-disk record layout shared by both.
//! - [`rules`]: validity rules (names, symlink targets, xattrs, chunk geometry)
//!   that the writer enforces and the reader checks.

pub mod chunk_digest;
pub mod layout;
mod open;
pub mod reader;
pub mod rules;
pub mod tree;
mod verify;
pub mod writer;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_corruption;
#[cfg(test)]
mod tests_roundtrip;

pub use chunk_digest::{ChunkDigest, ChunkHash};
pub use reader::{Bootstrap, DirEntry, Inode, InodeKind, PrefetchRange};
pub use tree::{ImageTree, Meta, Node, NodeId, NodeKind, PrefetchSpan};
pub use writer::{write_bootstrap, BlobInfo};

use crate::Digest;

/// Smallest accepted chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest accepted chunk size (16 MiB).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk size (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// An inode number as the filesystem sees it. Inode numbers are the 1-based
/// index into the bootstrap's inode table, so they are the same in every
/// process that opens the same bootstrap; the root is [`Ino::ROOT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

/// Index of a chunk in the bootstrap's chunk table (unique chunks, grouped by
/// blob and sorted by offset within the blob).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkIndex(pub u32);

/// Index of a blob in the bootstrap's blob table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobIndex(pub u32);

/// One unique chunk of file data as stored in a data blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Digest of the uncompressed bytes, under the bootstrap's chunk hash.
    pub digest: ChunkDigest,
    pub blob: BlobIndex,
    /// Offset of the stored (maybe compressed) bytes in the blob.
    pub compressed_offset: u64,
    /// Length of the stored bytes in the blob.
    pub compressed_size: u32,
    /// Offset of the uncompressed bytes if the blob's chunks were laid out
    /// decompressed one after another (the fsd cache uses this layout).
    pub uncompressed_offset: u64,
    pub uncompressed_size: u32,
    /// Whether the stored bytes are a zstd frame (otherwise raw).
    pub compressed: bool,
}

/// A data blob of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    /// Digest of the blob as stored in the registry.
    pub digest: Digest,
    /// Size in bytes of the blob in the registry.
    pub compressed_size: u64,
    /// Sum of the uncompressed sizes of the blob's chunks.
    pub uncompressed_size: u64,
    /// The blob's chunks are `first_chunk .. first_chunk + chunk_count` in the chunk table.
    pub first_chunk: ChunkIndex,
    pub chunk_count: u32,
}

/// Everything that can be wrong with a bootstrap or with a tree being written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("bootstrap {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a Lode bootstrap (bad magic)")]
    BadMagic,
    #[error("unsupported bootstrap version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),
    #[error("bootstrap is truncated: {0}")]
    Truncated(String),
    #[error("bootstrap checksum mismatch: header says {expected:08x}, content has {actual:08x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("corrupt bootstrap: {0}")]
    Corrupt(String),
    #[error("inode {0} does not exist")]
    NoSuchInode(u64),
    #[error("inode {ino} is not {expected}")]
    WrongKind { ino: u64, expected: &'static str },
    #[error("invalid chunk size {0} (must be a power of two between 64 KiB and 16 MiB)")]
    InvalidChunkSize(u32),
    /// An index passed by the caller (a file's chunk number, a chunk or blob
    /// index) is past the end of what it indexes.
    #[error("index out of range: {0}")]
    OutOfRange(String),
    #[error("cannot write bootstrap: {0}")]
    Invalid(String),
}
