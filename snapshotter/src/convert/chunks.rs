//! Cuts file contents into chunks, stores each distinct chunk once per image
//! (zstd frame, or raw when zstd does not make it smaller) in the current
//! layer's data blob, and builds the chunk table.
//!
//! Chunks are queued in batches so that hashing and compression run on
//! several threads while the tar stream is read on one; batches are written
//! in queue order, which keeps blobs and chunk tables identical from run to
//! run whatever the thread count.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use lode_common::digest::Hasher;
use lode_common::format::{
    BlobIndex, BlobInfo, ChunkIndex, ChunkRecord, ImageTree, NodeId, NodeKind,
};
use lode_common::Digest;

use super::error::ConvertError;

/// Uncompressed bytes queued before a batch is hashed and compressed (at
/// least two chunks, so that two threads have work).
const BATCH_BYTES: usize = 8 << 20;

/// A data blob finished for one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// The chunks a file's content was cut into, before they are resolved to
/// chunk table indices (at the end of the layer).
#[derive(Debug)]
pub(crate) struct PendingFile {
    pub size: u64,
    ids: Vec<usize>,
}

/// Counters of one layer's data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkCounters {
    /// Bytes of file content read.
    pub file_bytes: u64,
    /// Chunks the layer's files consist of.
    pub chunks: u64,
    /// Chunks stored because no earlier chunk had the same digest.
    pub new_chunks: u64,
    /// Bytes written to the layer's blob.
    pub stored_bytes: u64,
}

/// The image's chunk table and blobs, and the data blob being written.
#[derive(Debug)]
pub struct ChunkStore {
    chunk_size: u32,
    zstd_level: i32,
    threads: usize,
    records: Vec<ChunkRecord>,
    by_digest: HashMap<Digest, ChunkIndex>,
    blobs: Vec<BlobInfo>,
    layer: Option<OpenBlob>,
}

struct OpenBlob {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Hasher,
    index: BlobIndex,
    compressed_len: u64,
    uncompressed_len: u64,
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
    /// Chunk index of every queued chunk, by queue position.
    resolved: Vec<ChunkIndex>,
    files: Vec<(NodeId, Vec<usize>)>,
    counters: ChunkCounters,
}

impl std::fmt::Debug for OpenBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBlob")
            .field("path", &self.path)
            .field("index", &self.index)
            .field("compressed_len", &self.compressed_len)
            .field("queued", &self.batch.len())
            .finish_non_exhaustive()
    }
}

enum Plan {
    Known(ChunkIndex),
    /// Index into the list of chunks to compress.
    New(usize),
    /// Same digest as a new chunk earlier in the batch.
    Repeat(Digest),
}

impl ChunkStore {
    pub fn new(chunk_size: u32, zstd_level: i32, threads: usize) -> Self {
        Self {
            chunk_size,
            zstd_level,
            threads: threads.max(1),
            records: Vec::new(),
            by_digest: HashMap::new(),
            blobs: Vec::new(),
            layer: None,
        }
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The chunk table: grouped by blob, sorted by offset within a blob.
    pub fn records(&self) -> &[ChunkRecord] {
        &self.records
    }

    /// The data blobs written so far, in order.
    pub fn blobs(&self) -> &[BlobInfo] {
        &self.blobs
    }

    /// Opens `path` as the data blob of the next layer.
    pub fn begin_layer(&mut self, path: &Path) -> Result<(), ConvertError> {
        let file = File::create(path).map_err(ConvertError::io(format!(
            "create data blob {}",
            path.display()
        )))?;
        self.layer = Some(OpenBlob {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Hasher::new(),
            index: BlobIndex(u32::try_from(self.blobs.len()).map_err(|_| too_many("blobs"))?),
            compressed_len: 0,
            uncompressed_len: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            resolved: Vec::new(),
            files: Vec::new(),
            counters: ChunkCounters::default(),
        });
        Ok(())
    }

    /// Reads a file's content to its end and queues its chunks.
    pub(crate) fn add_file(&mut self, content: &mut dyn Read) -> Result<PendingFile, AddError> {
        let cs = self.chunk_size as usize;
        let mut pending = PendingFile {
            size: 0,
            ids: Vec::new(),
        };
        loop {
            let mut buf = Vec::with_capacity(cs);
            let n = content
                .take(cs as u64)
                .read_to_end(&mut buf)
                .map_err(AddError::Read)?;
            if n == 0 {
                break;
            }
            pending.size += n as u64;
            pending.ids.push(self.queue(buf)?);
            if n < cs {
                break;
            }
        }
        Ok(pending)
    }

    /// Records that `node` is the file whose chunks `pending` describes.
    pub(crate) fn attach(&mut self, node: NodeId, pending: PendingFile) {
        if let Some(layer) = self.layer.as_mut() {
            layer.files.push((node, pending.ids));
        }
    }

    /// Writes what is still queued, fills in the chunk lists of the layer's
    /// files in `tree`, and closes the blob. A layer that stored no chunk
    /// gets no blob (its file is removed).
    pub fn finish_layer(
        &mut self,
        tree: &mut ImageTree,
    ) -> Result<(Option<LayerBlob>, ChunkCounters), ConvertError> {
        self.flush()?;
        let Some(layer) = self.layer.take() else {
            return Ok((None, ChunkCounters::default()));
        };
        for (node, ids) in &layer.files {
            if let NodeKind::File { chunks, .. } = &mut tree.node_mut(*node).kind {
                *chunks = ids.iter().map(|&id| layer.resolved[id]).collect();
            }
        }
        let write_err = ConvertError::io(format!("write data blob {}", layer.path.display()));
        layer
            .out
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?;
        if layer.compressed_len == 0 {
            std::fs::remove_file(&layer.path).map_err(ConvertError::io(format!(
                "remove empty data blob {}",
                layer.path.display()
            )))?;
            return Ok((None, layer.counters));
        }
        let digest = layer.hasher.finish();
        self.blobs.push(BlobInfo {
            digest,
            compressed_size: layer.compressed_len,
        });
        let blob = LayerBlob {
            path: layer.path,
            digest,
            size: layer.compressed_len,
        };
        Ok((Some(blob), layer.counters))
    }

    fn queue(&mut self, chunk: Vec<u8>) -> Result<usize, ConvertError> {
        let cs = self.chunk_size as usize;
        let layer = self.layer.as_mut().ok_or_else(no_layer)?;
        let id = layer.resolved.len() + layer.batch.len();
        layer.counters.file_bytes += chunk.len() as u64;
        layer.counters.chunks += 1;
        layer.batch_bytes += chunk.len();
        layer.batch.push(chunk);
        if layer.batch_bytes >= BATCH_BYTES.max(2 * cs) {
            self.flush()?;
        }
        Ok(id)
    }

    /// Hashes the batch, decides which chunks are new, compresses those, and
    /// appends them to the blob in queue order.
    fn flush(&mut self) -> Result<(), ConvertError> {
        let Some(layer) = self.layer.as_mut() else {
            return Ok(());
        };
        let batch = std::mem::take(&mut layer.batch);
        layer.batch_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let digests = parallel_map(&batch, self.threads, |data| Digest::of(data));
        let mut plans = Vec::with_capacity(batch.len());
        let mut fresh = Vec::new();
        let mut seen = HashSet::new();
        for (i, digest) in digests.iter().enumerate() {
            plans.push(if let Some(&known) = self.by_digest.get(digest) {
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
                Plan::Repeat(digest) => *self
                    .by_digest
                    .get(&digest)
                    .ok_or_else(|| ConvertError::Task(format!("chunk {digest} lost")))?,
                Plan::New(k) => {
                    let frame = compressed[k].as_deref();
                    let stored = frame.unwrap_or(data);
                    let index = ChunkIndex(
                        u32::try_from(self.records.len()).map_err(|_| too_many("chunks"))?,
                    );
                    layer
                        .out
                        .write_all(stored)
                        .map_err(ConvertError::io(format!(
                            "write data blob {}",
                            layer.path.display()
                        )))?;
                    layer.hasher.update(stored);
                    self.records.push(ChunkRecord {
                        digest: *digest,
                        blob: layer.index,
                        compressed_offset: layer.compressed_len,
                        compressed_size: stored.len() as u32,
                        uncompressed_offset: layer.uncompressed_len,
                        uncompressed_size: data.len() as u32,
                        compressed: frame.is_some(),
                    });
                    layer.compressed_len += stored.len() as u64;
                    layer.uncompressed_len += data.len() as u64;
                    layer.counters.new_chunks += 1;
                    layer.counters.stored_bytes += stored.len() as u64;
                    self.by_digest.insert(*digest, index);
                    index
                }
            };
            layer.resolved.push(index);
        }
        Ok(())
    }
}

/// Why queuing a file's content failed.
#[derive(Debug)]
pub(crate) enum AddError {
    /// Reading the tar entry failed (the layer is damaged).
    Read(io::Error),
    Convert(ConvertError),
}

impl From<ConvertError> for AddError {
    fn from(e: ConvertError) -> Self {
        AddError::Convert(e)
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

fn too_many(what: &str) -> ConvertError {
    ConvertError::Format(lode_common::format::FormatError::Invalid(format!(
        "more than 2^32 {what}"
    )))
}

fn no_layer() -> ConvertError {
    ConvertError::Task("file content outside of a layer".to_owned())
}
