//! Cuts file contents into chunks, stores each distinct chunk once per image
//! (zstd frame, or raw when zstd does not make it smaller) in the current
//! layer's data blob, and builds the chunk table.
//!
//! This is the reading side: chunks are queued in batches for the layer's
//! writer thread ([`super::blob_writer`]), so the tar stream is read and
//! decompressed while earlier chunks are hashed and compressed. Chunk
//! indices are only known once the writer is done, so files' chunk lists are
//! filled in at the end of the layer.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use lode_common::format::{BlobIndex, BlobInfo, ChunkRecord, ImageTree, NodeId, NodeKind};
use lode_common::Digest;

use super::blob_writer::{too_many, BlobWriter, ChunkTable, Written};
use super::error::ConvertError;

/// Uncompressed bytes sent to the writer at a time (at least two chunks, so
/// that two threads have work).
const BATCH_BYTES: usize = 8 << 20;
/// Batches queued for the writer while it works on one: memory stays
/// bounded by a few batches whatever the layer size.
const QUEUED_BATCHES: usize = 1;

/// A data blob finished for one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    /// How many bytes at its start hold the prefetch list's chunks.
    pub prefetch_front: u64,
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
    /// Lent to the layer's writer thread while a layer is open.
    pub(super) table: ChunkTable,
    pub(super) blobs: Vec<BlobInfo>,
    layer: Option<OpenLayer>,
}

/// The reading side of the layer being converted.
struct OpenLayer {
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
    /// Chunks queued so far (sent or in `batch`).
    queued: usize,
    files: Vec<(NodeId, Vec<usize>)>,
    counters: ChunkCounters,
    sender: SyncSender<Vec<Vec<u8>>>,
    writer: JoinHandle<(ChunkTable, Result<Written, ConvertError>)>,
}

impl std::fmt::Debug for OpenLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenLayer")
            .field("queued", &self.queued)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl ChunkStore {
    pub fn new(chunk_size: u32, zstd_level: i32, threads: usize) -> Self {
        Self {
            chunk_size,
            zstd_level,
            threads: threads.max(1),
            table: ChunkTable::default(),
            blobs: Vec::new(),
            layer: None,
        }
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The chunk table: grouped by blob, sorted by offset within a blob.
    /// Complete between layers.
    pub fn records(&self) -> &[ChunkRecord] {
        &self.table.records
    }

    /// The data blobs written so far, in order.
    pub fn blobs(&self) -> &[BlobInfo] {
        &self.blobs
    }

    /// Opens `path` as the data blob of the next layer and starts its writer.
    pub fn begin_layer(&mut self, path: &Path) -> Result<(), ConvertError> {
        if self.layer.is_some() {
            return Err(ConvertError::Task("a layer is already open".to_owned()));
        }
        let file = File::create(path).map_err(ConvertError::io(format!(
            "create data blob {}",
            path.display()
        )))?;
        let index = BlobIndex(u32::try_from(self.blobs.len()).map_err(|_| too_many("blobs"))?);
        let blob = BlobWriter::new(
            path.to_path_buf(),
            file,
            index,
            self.threads,
            self.zstd_level,
        );
        let table = std::mem::take(&mut self.table);
        let (sender, batches) = sync_channel(QUEUED_BATCHES);
        let writer = std::thread::Builder::new()
            .name("lode-blob-writer".to_owned())
            .spawn(move || blob.run(table, batches))
            .map_err(ConvertError::io("start the blob writer thread"))?;
        self.layer = Some(OpenLayer {
            batch: Vec::new(),
            batch_bytes: 0,
            queued: 0,
            files: Vec::new(),
            counters: ChunkCounters::default(),
            sender,
            writer,
        });
        Ok(())
    }

    /// Reads a file's content to its end and queues its chunks. `size_hint`
    /// (the size the tar header declares) only sizes buffers: queued chunks
    /// of small files must not each hold a whole chunk's worth of memory.
    pub(crate) fn add_file(
        &mut self,
        content: &mut dyn Read,
        size_hint: u64,
    ) -> Result<PendingFile, AddError> {
        let cs = self.chunk_size as usize;
        let mut pending = PendingFile {
            size: 0,
            ids: Vec::new(),
        };
        loop {
            let expected = size_hint.saturating_sub(pending.size);
            let mut buf = Vec::with_capacity(cs.min(usize::try_from(expected).unwrap_or(cs)));
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

    /// Waits for the writer to store what is queued, fills in the chunk lists
    /// of the layer's files in `tree`, and closes the blob. A layer that
    /// stored no chunk gets no blob (its file is removed).
    pub fn finish_layer(
        &mut self,
        tree: &mut ImageTree,
    ) -> Result<(Option<LayerBlob>, ChunkCounters), ConvertError> {
        self.send_batch()?;
        let Some(layer) = self.layer.take() else {
            return Ok((None, ChunkCounters::default()));
        };
        drop(layer.sender);
        let written = self.join_writer(layer.writer)?;
        let mut counters = layer.counters;
        counters.new_chunks = written.new_chunks;
        counters.stored_bytes = written.compressed_len;
        for (node, ids) in &layer.files {
            if let NodeKind::File { chunks, .. } = &mut tree.node_mut(*node).kind {
                *chunks = ids.iter().map(|&id| written.resolved[id]).collect();
            }
        }
        if written.compressed_len == 0 {
            std::fs::remove_file(&written.path).map_err(ConvertError::io(format!(
                "remove empty data blob {}",
                written.path.display()
            )))?;
            return Ok((None, counters));
        }
        self.blobs.push(BlobInfo {
            digest: written.digest,
            compressed_size: written.compressed_len,
        });
        let blob = LayerBlob {
            path: written.path,
            digest: written.digest,
            size: written.compressed_len,
            prefetch_front: 0,
        };
        Ok((Some(blob), counters))
    }

    fn queue(&mut self, chunk: Vec<u8>) -> Result<usize, ConvertError> {
        let limit = BATCH_BYTES.max(2 * self.chunk_size as usize);
        let layer = self.layer.as_mut().ok_or_else(no_layer)?;
        let id = layer.queued;
        layer.queued += 1;
        layer.counters.file_bytes += chunk.len() as u64;
        layer.counters.chunks += 1;
        layer.batch_bytes += chunk.len();
        layer.batch.push(chunk);
        if layer.batch_bytes >= limit {
            self.send_batch()?;
        }
        Ok(id)
    }

    /// Hands the current batch to the writer (waiting while it is busy with
    /// earlier ones).
    fn send_batch(&mut self) -> Result<(), ConvertError> {
        let Some(layer) = self.layer.as_mut() else {
            return Ok(());
        };
        let batch = std::mem::take(&mut layer.batch);
        layer.batch_bytes = 0;
        if batch.is_empty() || layer.sender.send(batch).is_ok() {
            return Ok(());
        }
        // The writer stopped early: its error says why.
        let Some(layer) = self.layer.take() else {
            return Ok(());
        };
        drop(layer.sender);
        match self.join_writer(layer.writer) {
            Ok(_) => Err(ConvertError::Task(
                "the blob writer stopped before the layer ended".to_owned(),
            )),
            Err(e) => Err(e),
        }
    }

    fn join_writer(
        &mut self,
        writer: JoinHandle<(ChunkTable, Result<Written, ConvertError>)>,
    ) -> Result<Written, ConvertError> {
        let (table, result) = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        self.table = table;
        result
    }
}

/// Why queuing a file's content failed.
#[derive(Debug)]
pub(crate) enum AddError {
    /// Reading the tar entry failed (the layer is damaged).
    Read(std::io::Error),
    Convert(ConvertError),
}

impl From<ConvertError> for AddError {
    fn from(e: ConvertError) -> Self {
        AddError::Convert(e)
    }
}

fn no_layer() -> ConvertError {
    ConvertError::Task("file content outside of a layer".to_owned())
}
