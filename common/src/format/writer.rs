//! Serialises an [`ImageTree`] into bootstrap bytes.

use std::collections::{HashMap, HashSet, VecDeque};

use super::layout::{
    self, align_up, DirentRecord, Header, InodeRecord, RawBlob, RawChunk, SectionEntry,
    XattrRecord, CHUNK_FLAG_ZSTD, HEADER_SIZE, MAGIC, NSEC_PER_SEC, PERM_MASK, SECTION_COUNT,
    VERSION,
};
use super::rules::{
    check_chunk_size, chunk_len_at, chunks_for_size, name_problem, symlink_problem, xattr_problem,
};
use super::{ChunkHash, ChunkRecord, FormatError, ImageTree, Meta, NodeId, NodeKind, PrefetchSpan};
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
/// - `prefetch` lists stretches of files to prefetch in order (those of
///   unreachable files and repeats are dropped).
///
/// Fails with [`FormatError::InvalidChunkSize`] on a bad chunk size and with
/// [`FormatError::Invalid`] on other inconsistent input (chunk/blob references
/// out of range, chunk sizes that do not add up to the file size, a directory
/// reachable twice, bad names, prefetching a non-file, ...).
pub fn write_bootstrap(
    tree: &ImageTree,
    chunk_size: u32,
    blobs: &[BlobInfo],
    chunks: &[ChunkRecord],
    prefetch: &[PrefetchSpan],
) -> Result<Vec<u8>, FormatError> {
    check_chunk_size(chunk_size)?;
    let raw_blobs = check_chunk_table(chunk_size, blobs, chunks)?;
    let chunk_hash = chunk_hash_of(chunks)?;
    let order = number_inodes(tree)?;

    let mut heap = Heap::default();
    let mut inodes = Vec::with_capacity(order.nodes.len() * InodeRecord::SIZE);
    let mut dirents = Vec::new();
    let mut file_chunks = Vec::new();
    let mut xattrs = Vec::new();
    let mut counts = Counters::default();

    for (index, &id) in order.nodes.iter().enumerate() {
        let node = tree.node(id);
        let what = || format!("node {} (inode {})", id.0, index + 1);
        check_meta(&node.meta).map_err(|e| invalid(format!("{}: {e}", what())))?;
        let mut rec = InodeRecord {
            uid: node.meta.uid,
            gid: node.meta.gid,
            nlink: order.links[index],
            mtime_sec: node.meta.mtime_sec,
            mtime_nsec: node.meta.mtime_nsec,
            parent: order.parents[index],
            xattr_start: counts.xattrs,
            xattr_count: len_u32(node.meta.xattrs.len(), "xattrs of one inode")?,
            ..InodeRecord::default()
        };
        for (name, value) in &node.meta.xattrs {
            XattrRecord {
                name_offset: heap.add(name)?,
                name_len: len_u32(name.len(), "xattr name")?,
                value_offset: heap.add(value)?,
                value_len: len_u32(value.len(), "xattr value")?,
            }
            .encode(&mut xattrs);
        }
        counts.xattrs = add_u32(counts.xattrs, rec.xattr_count, "xattr count")?;

        let type_bits = match &node.kind {
            NodeKind::Dir { entries } => {
                rec.data_start = counts.dirents;
                rec.data_count = len_u32(entries.len(), "directory entries")?;
                counts.dirents = add_u32(counts.dirents, rec.data_count, "dirent count")?;
                for (name, child) in entries {
                    DirentRecord {
                        name_offset: heap.add(name)?,
                        name_len: len_u32(name.len(), "name")?,
                        inode: order.index_of(*child)?,
                        reserved: 0,
                    }
                    .encode(&mut dirents);
                }
                layout::S_IFDIR
            }
            NodeKind::File {
                size,
                chunks: file_chunk_list,
            } => {
                check_file_chunks(*size, file_chunk_list, chunk_size, chunks)
                    .map_err(|e| invalid(format!("{}: {e}", what())))?;
                rec.size = *size;
                rec.data_start = counts.file_chunks;
                rec.data_count = len_u32(file_chunk_list.len(), "chunks of one file")?;
                counts.file_chunks =
                    add_u32(counts.file_chunks, rec.data_count, "file chunk count")?;
                for c in file_chunk_list {
                    layout::put_u32(&mut file_chunks, c.0);
                }
                layout::S_IFREG
            }
            NodeKind::Symlink { target } => {
                if let Some(problem) = symlink_problem(target) {
                    return Err(invalid(format!("{}: {problem}", what())));
                }
                rec.size = target.len() as u64;
                rec.data_start = heap.add(target)?;
                rec.data_count = len_u32(target.len(), "symlink target")?;
                layout::S_IFLNK
            }
            NodeKind::CharDevice { major, minor } => {
                (rec.rdev_major, rec.rdev_minor) = (*major, *minor);
                layout::S_IFCHR
            }
            NodeKind::BlockDevice { major, minor } => {
                (rec.rdev_major, rec.rdev_minor) = (*major, *minor);
                layout::S_IFBLK
            }
            NodeKind::Fifo => layout::S_IFIFO,
            NodeKind::Socket => layout::S_IFSOCK,
        };
        rec.mode = type_bits | node.meta.perm;
        rec.encode(&mut inodes);
    }

    let mut chunk_bytes = Vec::with_capacity(chunks.len() * RawChunk::SIZE);
    for c in chunks {
        RawChunk {
            digest: *c.digest.as_bytes(),
            compressed_offset: c.compressed_offset,
            uncompressed_offset: c.uncompressed_offset,
            compressed_size: c.compressed_size,
            uncompressed_size: c.uncompressed_size,
            blob: c.blob.0,
            flags: if c.compressed { CHUNK_FLAG_ZSTD } else { 0 },
        }
        .encode(&mut chunk_bytes);
    }
    let mut blob_bytes = Vec::with_capacity(raw_blobs.len() * RawBlob::SIZE);
    for b in &raw_blobs {
        b.encode(&mut blob_bytes);
    }
    let prefetch_bytes = prefetch_section(tree, &order, prefetch)?;

    let sections: [&[u8]; SECTION_COUNT] = [
        &inodes,
        &dirents,
        &file_chunks,
        &chunk_bytes,
        &blob_bytes,
        &xattrs,
        &prefetch_bytes,
        &heap.bytes,
    ];
    Ok(assemble(chunk_size, chunk_hash.header_flags(), &sections))
}

/// Lays out header and sections and stamps the checksum.
fn assemble(chunk_size: u32, flags: u32, sections: &[&[u8]; SECTION_COUNT]) -> Vec<u8> {
    let mut table = [SectionEntry::default(); SECTION_COUNT];
    let mut pos = HEADER_SIZE;
    for (entry, data) in table.iter_mut().zip(sections) {
        pos = align_up(pos);
        *entry = SectionEntry {
            offset: pos as u64,
            length: data.len() as u64,
        };
        pos += data.len();
    }
    let file_len = align_up(pos);
    let header = Header {
        magic: MAGIC,
        version: VERSION,
        flags,
        chunk_size,
        checksum: 0,
        file_len: file_len as u64,
        sections: table,
        reserved_zero: true,
    };
    let mut out = Vec::with_capacity(file_len);
    out.extend_from_slice(&header.encode());
    for data in sections {
        out.resize(align_up(out.len()), 0);
        out.extend_from_slice(data);
    }
    out.resize(file_len, 0);
    layout::fix_checksum(&mut out);
    out
}

/// The breadth-first inode numbering of a tree.
struct Numbering {
    /// Tree node of each inode index.
    nodes: Vec<NodeId>,
    /// Inode index of each tree node, `u32::MAX` if unreachable.
    index: Vec<u32>,
    /// Parent inode index of each inode (directories; others 0).
    parents: Vec<u32>,
    /// nlink of each inode.
    links: Vec<u32>,
}

impl Numbering {
    fn index_of(&self, id: NodeId) -> Result<u32, FormatError> {
        match self.index.get(id.0) {
            Some(&i) if i != u32::MAX => Ok(i),
            _ => Err(invalid(format!("node {} has no inode", id.0))),
        }
    }
}

fn number_inodes(tree: &ImageTree) -> Result<Numbering, FormatError> {
    let root = tree
        .nodes
        .get(ImageTree::ROOT.0)
        .ok_or_else(|| invalid("tree has no root node".into()))?;
    if !matches!(root.kind, NodeKind::Dir { .. }) {
        return Err(invalid("root node is not a directory".into()));
    }
    let mut n = Numbering {
        nodes: vec![ImageTree::ROOT],
        index: vec![u32::MAX; tree.nodes.len()],
        parents: vec![0],
        links: vec![2],
    };
    n.index[ImageTree::ROOT.0] = 0;
    let mut queue = VecDeque::from([(ImageTree::ROOT, 0u32)]);
    while let Some((dir, dir_index)) = queue.pop_front() {
        let NodeKind::Dir { entries } = &tree.node(dir).kind else {
            continue;
        };
        for (name, &child) in entries {
            if let Some(problem) = name_problem(name) {
                return Err(invalid(format!(
                    "entry {:?} of node {}: {problem}",
                    String::from_utf8_lossy(name),
                    dir.0
                )));
            }
            let child_node = tree.nodes.get(child.0).ok_or_else(|| {
                invalid(format!(
                    "entry {:?} of node {} names node {} which does not exist",
                    String::from_utf8_lossy(name),
                    dir.0,
                    child.0
                ))
            })?;
            let is_dir = matches!(child_node.kind, NodeKind::Dir { .. });
            let known = n.index[child.0];
            if known != u32::MAX {
                if is_dir {
                    return Err(invalid(format!(
                        "directory node {} is reachable twice (again as {:?} in node {})",
                        child.0,
                        String::from_utf8_lossy(name),
                        dir.0
                    )));
                }
                let links = &mut n.links[known as usize];
                *links = add_u32(*links, 1, "link count")?;
                continue;
            }
            let index = len_u32(n.nodes.len(), "inode count")?;
            n.index[child.0] = index;
            n.nodes.push(child);
            if is_dir {
                n.parents.push(dir_index);
                n.links.push(2);
                let parent_links = &mut n.links[dir_index as usize];
                *parent_links = add_u32(*parent_links, 1, "link count")?;
                queue.push_back((child, index));
            } else {
                n.parents.push(0);
                n.links.push(1);
            }
        }
    }
    Ok(n)
}

/// The one hash of every chunk digest (a bootstrap names one in its
/// header); [`ChunkHash::WRITTEN`] for an image without chunks.
fn chunk_hash_of(chunks: &[ChunkRecord]) -> Result<ChunkHash, FormatError> {
    let Some(first) = chunks.first() else {
        return Ok(ChunkHash::WRITTEN);
    };
    let hash = first.digest.hash();
    match chunks.iter().position(|c| c.digest.hash() != hash) {
        None => Ok(hash),
        Some(i) => Err(invalid(format!(
            "chunk {i} ({}): its digest is not {} as chunk 0's is; a bootstrap has one chunk hash",
            chunks[i].digest,
            hash.name()
        ))),
    }
}

/// Checks the chunk table and derives the blob records from it.
fn check_chunk_table(
    chunk_size: u32,
    blobs: &[BlobInfo],
    chunks: &[ChunkRecord],
) -> Result<Vec<RawBlob>, FormatError> {
    len_u32(chunks.len(), "chunk count")?;
    len_u32(blobs.len(), "blob count")?;
    let mut raw: Vec<RawBlob> = blobs
        .iter()
        .map(|b| RawBlob {
            digest: *b.digest.as_bytes(),
            compressed_size: b.compressed_size,
            ..RawBlob::default()
        })
        .collect();
    let mut current: Option<u32> = None;
    let mut prev_end = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        let bad = |msg: String| invalid(format!("chunk {i} ({}): {msg}", c.digest));
        let blob = raw
            .get_mut(c.blob.0 as usize)
            .ok_or_else(|| bad(format!("blob index {} out of range", c.blob.0)))?;
        match current {
            Some(b) if b == c.blob.0 => {}
            Some(b) if b > c.blob.0 => {
                return Err(bad("chunks are not grouped by blob in blob order".into()))
            }
            _ => {
                current = Some(c.blob.0);
                blob.first_chunk = i as u32;
                prev_end = 0;
            }
        }
        if c.uncompressed_size == 0 || c.uncompressed_size > chunk_size {
            return Err(bad(format!(
                "uncompressed size {} not in 1..={chunk_size}",
                c.uncompressed_size
            )));
        }
        if c.compressed_size == 0 {
            return Err(bad("compressed size is 0".into()));
        }
        if !c.compressed && c.compressed_size != c.uncompressed_size {
            return Err(bad(
                "raw chunk with compressed size != uncompressed size".into()
            ));
        }
        if c.compressed_offset < prev_end {
            return Err(bad(format!(
                "compressed offset {} overlaps the previous chunk of the blob (ends at {prev_end})",
                c.compressed_offset
            )));
        }
        let end = c
            .compressed_offset
            .checked_add(u64::from(c.compressed_size))
            .filter(|&end| end <= blob.compressed_size)
            .ok_or_else(|| {
                bad(format!(
                    "stored range {}+{} exceeds the blob's size {}",
                    c.compressed_offset, c.compressed_size, blob.compressed_size
                ))
            })?;
        prev_end = end;
        if c.uncompressed_offset != blob.uncompressed_size {
            return Err(bad(format!(
                "uncompressed offset {} is not the sum of the blob's earlier chunks ({})",
                c.uncompressed_offset, blob.uncompressed_size
            )));
        }
        blob.uncompressed_size += u64::from(c.uncompressed_size);
        blob.chunk_count += 1;
    }
    // Empty blobs still get a first_chunk inside the table's bounds.
    let mut next = 0u32;
    for b in &mut raw {
        if b.chunk_count == 0 {
            b.first_chunk = next;
        }
        next = b.first_chunk + b.chunk_count;
    }
    Ok(raw)
}

fn check_meta(meta: &Meta) -> Result<(), String> {
    if meta.perm & !PERM_MASK != 0 {
        return Err(format!("permission bits {:o} exceed 0o7777", meta.perm));
    }
    if meta.mtime_nsec >= NSEC_PER_SEC {
        return Err(format!("mtime nanoseconds {} >= 1e9", meta.mtime_nsec));
    }
    for (name, value) in &meta.xattrs {
        if let Some(problem) = xattr_problem(name, value.len()) {
            return Err(format!(
                "xattr {:?}: {problem}",
                String::from_utf8_lossy(name)
            ));
        }
    }
    Ok(())
}

fn check_file_chunks(
    size: u64,
    list: &[super::ChunkIndex],
    chunk_size: u32,
    chunks: &[ChunkRecord],
) -> Result<(), String> {
    let expected = chunks_for_size(size, chunk_size);
    if list.len() as u64 != expected {
        return Err(format!(
            "file of {size} bytes has {} chunks, expected {expected}",
            list.len()
        ));
    }
    for (i, c) in list.iter().enumerate() {
        let rec = chunks
            .get(c.0 as usize)
            .ok_or_else(|| format!("chunk {i} refers to chunk index {} out of range", c.0))?;
        let want = chunk_len_at(size, chunk_size, i as u64).unwrap_or(0);
        if u64::from(rec.uncompressed_size) != want {
            return Err(format!(
                "chunk {i} (index {}) holds {} bytes, the file needs {want} there",
                c.0, rec.uncompressed_size
            ));
        }
    }
    Ok(())
}

fn prefetch_section(
    tree: &ImageTree,
    order: &Numbering,
    prefetch: &[PrefetchSpan],
) -> Result<Vec<u8>, FormatError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for span in prefetch {
        let id = span.node;
        let node = tree
            .nodes
            .get(id.0)
            .ok_or_else(|| invalid(format!("prefetch node {} does not exist", id.0)))?;
        let NodeKind::File { chunks, .. } = &node.kind else {
            return Err(invalid(format!(
                "prefetch node {} is not a regular file",
                id.0
            )));
        };
        if span.chunks.is_empty() || span.chunks.end as usize > chunks.len() {
            return Err(invalid(format!(
                "prefetch of chunks {:?} of node {}, which has {}",
                span.chunks,
                id.0,
                chunks.len()
            )));
        }
        let Ok(index) = order.index_of(id) else {
            continue;
        };
        if seen.insert((index, span.chunks.clone())) {
            layout::PrefetchRecord {
                inode_index: index,
                first_chunk: span.chunks.start,
                chunk_count: span.chunks.len() as u32,
            }
            .encode(&mut out);
        }
    }
    Ok(out)
}

/// The string heap; identical strings (common file names, xattr values) are
/// stored once.
#[derive(Default)]
struct Heap<'a> {
    bytes: Vec<u8>,
    offsets: HashMap<&'a [u8], u32>,
}

impl<'a> Heap<'a> {
    fn add(&mut self, s: &'a [u8]) -> Result<u32, FormatError> {
        if let Some(&off) = self.offsets.get(s) {
            return Ok(off);
        }
        let off = len_u32(self.bytes.len(), "string heap")?;
        len_u32(self.bytes.len() + s.len(), "string heap")?;
        self.bytes.extend_from_slice(s);
        self.offsets.insert(s, off);
        Ok(off)
    }
}

#[derive(Default)]
struct Counters {
    dirents: u32,
    file_chunks: u32,
    xattrs: u32,
}

fn invalid(msg: String) -> FormatError {
    FormatError::Invalid(msg)
}

fn len_u32(n: usize, what: &str) -> Result<u32, FormatError> {
    u32::try_from(n).map_err(|_| invalid(format!("too many {what} ({n}) for a v1 bootstrap")))
}

fn add_u32(a: u32, b: u32, what: &str) -> Result<u32, FormatError> {
    a.checked_add(b)
        .ok_or_else(|| invalid(format!("{what} overflows 32 bits")))
}
