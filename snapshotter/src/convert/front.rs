//! Puts the chunks of the prefetch list's files at the front of their data
//! blobs, in list order, so that fetching the list is a few large range
//! requests rather than one per file.
//!
//! Within a blob the chunk table is sorted by offset (docs/format.md), so
//! moving chunks in the blob renumbers them: the blob file is rewritten in
//! the new order, the blob's part of the chunk table is rebuilt with new
//! offsets, and every file's chunk list is mapped to the new numbers.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;

use lode_common::digest::Hasher;
use lode_common::format::{ChunkIndex, ChunkRecord, ImageTree, NodeKind, PrefetchSpan};

use super::chunks::{ChunkStore, LayerBlob};
use super::error::ConvertError;

impl ChunkStore {
    /// Moves the chunks of `prefetch`'s stretches of files (each in file
    /// order) to the front of their blobs. `blobs[b]` is blob `b`'s file;
    /// the files of changed blobs are rewritten and their digests updated
    /// here and in `blobs`, and each blob's `prefetch_front` says how many
    /// bytes the moved chunks take. Chunks listed earlier (or shared with files
    /// listed earlier) stay where those put them.
    pub(crate) fn front_load(
        &mut self,
        tree: &mut ImageTree,
        prefetch: &[PrefetchSpan],
        blobs: &mut [LayerBlob],
    ) -> Result<(), ConvertError> {
        let mut front: Vec<Vec<u32>> = vec![Vec::new(); self.blobs.len()];
        let mut seen = HashSet::new();
        for span in prefetch {
            if let NodeKind::File { chunks, .. } = &tree.node(span.node).kind {
                let listed = chunks
                    .get(span.chunks.start as usize..span.chunks.end as usize)
                    .unwrap_or_default();
                for c in listed {
                    if seen.insert(c.0) {
                        let blob = self.table.records[c.0 as usize].blob.0 as usize;
                        front[blob].push(c.0);
                    }
                }
            }
        }
        let mut renumbered = HashMap::new();
        for (b, moved) in front.iter().enumerate() {
            if moved.is_empty() {
                continue;
            }
            let blob = blobs
                .get_mut(b)
                .ok_or_else(|| ConvertError::Task(format!("blob {b} has chunks but no file")))?;
            blob.prefetch_front = moved
                .iter()
                .map(|&c| u64::from(self.table.records[c as usize].compressed_size))
                .sum();
            let range = self.chunk_range(b);
            let moved_set: HashSet<u32> = moved.iter().copied().collect();
            let order: Vec<u32> = moved
                .iter()
                .copied()
                .chain(range.clone().filter(|c| !moved_set.contains(c)))
                .collect();
            if order.iter().copied().eq(range.clone()) {
                continue;
            }
            let records = self.rewrite_blob(blob, &order)?;
            self.blobs[b].digest = blob.digest;
            for (pos, (old, rec)) in order.iter().zip(records).enumerate() {
                let new = range.start + pos as u32;
                self.table.records[new as usize] = rec;
                self.table.by_digest.insert(rec.digest, ChunkIndex(new));
                renumbered.insert(*old, new);
            }
        }
        if renumbered.is_empty() {
            return Ok(());
        }
        for node in &mut tree.nodes {
            if let NodeKind::File { chunks, .. } = &mut node.kind {
                for c in chunks {
                    if let Some(&new) = renumbered.get(&c.0) {
                        *c = ChunkIndex(new);
                    }
                }
            }
        }
        Ok(())
    }

    /// Chunk indices of blob `b` (the table is grouped by blob).
    fn chunk_range(&self, b: usize) -> std::ops::Range<u32> {
        let of_blob = |r: &ChunkRecord| r.blob.0 as usize == b;
        let records = &self.table.records;
        let start = records.iter().position(of_blob).unwrap_or(records.len());
        let len = records[start..].iter().take_while(|r| of_blob(r)).count();
        start as u32..(start + len) as u32
    }

    /// Writes `blob`'s chunks in `order` (old chunk indices) to a new file
    /// that replaces it; returns their records with the new offsets, in
    /// the new order.
    fn rewrite_blob(
        &self,
        blob: &mut LayerBlob,
        order: &[u32],
    ) -> Result<Vec<ChunkRecord>, ConvertError> {
        let path = blob.path.clone();
        let read_err = || ConvertError::io(format!("read data blob {}", path.display()));
        let tmp = path.with_extension("front");
        let write_err = || ConvertError::io(format!("write data blob {}", tmp.display()));
        let source = File::open(&path).map_err(read_err())?;
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(write_err())?);
        let mut hasher = Hasher::new();
        let (mut offset, mut uncompressed) = (0u64, 0u64);
        let mut buf = Vec::new();
        let mut records = Vec::with_capacity(order.len());
        for &old in order {
            let mut rec = self.table.records[old as usize];
            buf.resize(rec.compressed_size as usize, 0);
            source
                .read_exact_at(&mut buf, rec.compressed_offset)
                .map_err(read_err())?;
            out.write_all(&buf).map_err(write_err())?;
            hasher.update(&buf);
            rec.compressed_offset = offset;
            rec.uncompressed_offset = uncompressed;
            offset += u64::from(rec.compressed_size);
            uncompressed += u64::from(rec.uncompressed_size);
            records.push(rec);
        }
        out.into_inner()
            .map_err(|e| write_err()(e.into_error()))?
            .sync_all()
            .map_err(write_err())?;
        if offset != blob.size {
            let _ = std::fs::remove_file(&tmp);
            return Err(ConvertError::Task(format!(
                "data blob {} holds {} bytes, its chunks {offset}",
                path.display(),
                blob.size
            )));
        }
        std::fs::rename(&tmp, &path).map_err(write_err())?;
        blob.digest = hasher.finish();
        Ok(records)
    }
}
