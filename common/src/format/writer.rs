//! Serialises an [`ImageTree`] into bootstrap bytes.

use super::{ChunkRecord, FormatError, ImageTree, NodeId};
use crate::Digest;

/// A data blob as the converter produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub compressed_size: u64,
}

/// Builds a bootstrap.
///
/// - `chunks` is the chunk table: grouped by blob in blob order, and within a blob
///   sorted by `compressed_offset`; `uncompressed_offset` is the running sum of
///   the `uncompressed_size`s of the blob's earlier chunks. Files in `tree` refer
///   to it by [`super::ChunkIndex`].
/// - Inode numbers are assigned deterministically (breadth-first from the root,
///   entries in name order); unreachable nodes are dropped; hardlinked nodes get
///   one inode whose `nlink` counts its entries; a directory's `nlink` is 2 plus
///   its subdirectories.
/// - `prefetch` lists files to prefetch in order (unreachable ones are dropped).
///
/// Fails with [`FormatError::Invalid`] on inconsistent input (bad chunk size,
/// chunk/blob references out of range, chunk sizes that do not add up to the
/// file size, a directory hardlinked twice, ...).
pub fn write_bootstrap(
    tree: &ImageTree,
    chunk_size: u32,
    blobs: &[BlobInfo],
    chunks: &[ChunkRecord],
    prefetch: &[NodeId],
) -> Result<Vec<u8>, FormatError> {
    let _ = (tree, chunk_size, blobs, chunks, prefetch);
    todo!()
}
