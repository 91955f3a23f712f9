//! The writing stage of a layer's data blob, run on its own thread: hashes
//! batches of chunks, decides which are new to the image, compresses those
//! and appends them to the blob in arrival order, so that blobs and chunk
//! tables are identical from run to run whatever the thread count.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use lode_common::digest::Hasher;
use lode_common::format::{
    BlobIndex, ChunkDigest, ChunkHash, ChunkIndex, ChunkRecord, FormatError,
};
use lode_common::Digest;

use super::error::ConvertError;

/// The image's unique chunks so far.
#[derive(Debug, Default)]
pub(crate) struct ChunkTable {
    pub records: Vec<ChunkRecord>,
    pub by_digest: HashMap<ChunkDigest, ChunkIndex>,
}

/// What the writer produced for one layer.
#[derive(Debug)]
pub(crate) struct Written {
    /// Chunk index of every chunk sent, in sending order.
    pub resolved: Vec<ChunkIndex>,
    pub path: PathBuf,
    pub digest: Digest,
    pub compressed_len: u64,
    pub new_chunks: u64,
}

pub(crate) struct BlobWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Hasher,
    index: BlobIndex,
    compressed_len: u64,
    uncompressed_len: u64,
    resolved: Vec<ChunkIndex>,
    new_chunks: u64,
    threads: usize,
    zstd_level: i32,
}

enum Plan {
    Known(ChunkIndex),
    /// Index into the list of chunks to compress.
    New(usize),
    /// Same digest as a new chunk earlier in the batch.
    Repeat(ChunkDigest),
}

impl BlobWriter {
    pub fn new(
        path: PathBuf,
        file: File,
        index: BlobIndex,
        threads: usize,
        zstd_level: i32,
    ) -> Self {
        Self {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Hasher::new(),
            index,
            compressed_len: 0,
            uncompressed_len: 0,
            resolved: Vec::new(),
            new_chunks: 0,
            threads,
            zstd_level,
        }
    }

    /// Writes every batch received, then closes the blob. Hands the table
    /// back whatever happens, so that the store stays whole.
    pub fn run(
        mut self,
        mut table: ChunkTable,
        batches: std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
    ) -> (ChunkTable, Result<Written, ConvertError>) {
        for batch in batches {
            if let Err(e) = self.write_batch(&mut table, batch) {
                return (table, Err(e));
            }
        }
        let result = self.finish();
        (table, result)
    }

    fn finish(self) -> Result<Written, ConvertError> {
        let write_err = ConvertError::io(format!("write data blob {}", self.path.display()));
        self.out
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        Ok(Written {
            resolved: self.resolved,
            path: self.path,
            digest: self.hasher.finish(),
            compressed_len: self.compressed_len,
            new_chunks: self.new_chunks,
        })
    }

    fn write_batch(
        &mut self,
        table: &mut ChunkTable,
        batch: Vec<Vec<u8>>,
    ) -> Result<(), ConvertError> {
        let digests = parallel_map(&batch, self.threads, |data| ChunkHash::WRITTEN.digest(data));
        let mut plans = Vec::with_capacity(batch.len());
        let mut fresh = Vec::new();
        let mut seen = HashSet::new();
        for (i, digest) in digests.iter().enumerate() {
            plans.push(if let Some(&known) = table.by_digest.get(digest) {
                Plan::Known(known)
            } else if !seen.insert(*digest) {
                Plan::Repeat(*digest)
            } else {
                fresh.push(i);
                Plan::New(fresh.len() - 1)
            });
        }
        let level = self.zstd_level;
        let compressed: Vec<Option<Vec<u8>>> =
            parallel_map(&fresh, self.threads, |&i| compress(&batch[i], level))
                .into_iter()
                .collect::<io::Result<_>>()
                .map_err(ConvertError::io("zstd compression"))?;

        for ((data, digest), plan) in batch.iter().zip(&digests).zip(plans) {
            let index = match plan {
                Plan::Known(index) => index,
                Plan::Repeat(digest) => *table
                    .by_digest
                    .get(&digest)
                    .ok_or_else(|| ConvertError::Task(format!("chunk {digest} lost")))?,
                Plan::New(k) => {
                    let frame = compressed[k].as_deref();
                    let index = self.append(table, data, *digest, frame)?;
                    table.by_digest.insert(*digest, index);
                    index
                }
            };
            self.resolved.push(index);
        }
        Ok(())
    }

    /// Appends one new chunk (its zstd frame if there is one, else raw).
    fn append(
        &mut self,
        table: &mut ChunkTable,
        data: &[u8],
        digest: ChunkDigest,
        frame: Option<&[u8]>,
    ) -> Result<ChunkIndex, ConvertError> {
        let stored = frame.unwrap_or(data);
        let index = ChunkIndex(u32::try_from(table.records.len()).map_err(|_| too_many("chunks"))?);
        self.out
            .write_all(stored)
            .map_err(ConvertError::io(format!(
                "write data blob {}",
                self.path.display()
            )))?;
        self.hasher.update(stored);
        table.records.push(ChunkRecord {
            digest,
            blob: self.index,
            compressed_offset: self.compressed_len,
            compressed_size: stored.len() as u32,
            uncompressed_offset: self.uncompressed_len,
            uncompressed_size: data.len() as u32,
            compressed: frame.is_some(),
        });
        self.compressed_len += stored.len() as u64;
        self.uncompressed_len += data.len() as u64;
        self.new_chunks += 1;
        Ok(index)
    }
}

/// A zstd frame of `data`, or `None` when the frame would not be smaller.
fn compress(data: &[u8], level: i32) -> io::Result<Option<Vec<u8>>> {
    let frame = zstd::bulk::compress(data, level)?;
    Ok((frame.len() < data.len()).then_some(frame))
}

/// `items.iter().map(f)` on up to `threads` scoped threads, in order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(per_thread)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

pub(crate) fn too_many(what: &str) -> ConvertError {
    ConvertError::Format(FormatError::Invalid(format!("more than 2^32 {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_order() {
        let items: Vec<u32> = (0..1001).collect();
        for threads in [1, 2, 3, 8] {
            let out = parallel_map(&items, threads, |x| x * 2);
            assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
        assert!(parallel_map(&[] as &[u32], 4, |x| *x).is_empty());
    }
}
