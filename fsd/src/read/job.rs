//! One fetch job: a range request for chunks adjacent in one blob. As the
//! response streams in, each chunk is decompressed, verified, handed to
//! every reader waiting for it (or failed for them) and cached, without
//! waiting for the rest of the range.

use std::sync::{Arc, Weak};

use lode_common::format::BlobRecord;
use tracing::error;

use crate::metrics::Metrics;
use crate::read::backend::BlobBackend;
use crate::read::cache::{BlobCache, WriteFailureLog};
use crate::read::fetch::{FetchError, Piece};
use crate::read::inflight::{Inflight, Pending};
use crate::read::link::LinkEstimate;
use crate::read::pools::{BufPool, ChunkBuf};
use crate::read::verify::{decode_chunk, ChunkDefect};
use crate::read::workers::{self, Job};

/// What jobs need besides their chunks.
pub(crate) struct JobContext {
    pub(crate) backend: Arc<dyn BlobBackend>,
    pub(crate) inflight: Inflight,
    pub(crate) metrics: Arc<Metrics>,
    /// Buffers for stored and decoded chunks.
    pub(crate) pool: Arc<BufPool>,
    /// What the link to the blobs delivers, learnt from every job.
    pub(crate) link: LinkEstimate,
    /// Chunks that could not be cached (a full disk fails them all).
    pub(crate) cache_failures: WriteFailureLog,
}

/// A chunk of a job and the fetch its readers wait on. The job holds the
/// fetch weakly: the in-flight map and the readers hold it, so a chunk
/// delivered early in a long request (a 32 MiB readahead) leaves memory as
/// soon as its reader took it, not when the whole request ends.
pub(crate) type JobChunk = (Piece, Weak<Pending>);

/// One range request covering chunks adjacent in one blob.
pub(crate) struct FetchJob {
    pub(crate) ctx: Arc<JobContext>,
    pub(crate) blob: BlobRecord,
    pub(crate) cache: Arc<BlobCache>,
    pub(crate) chunks: Vec<JobChunk>,
}

impl FetchJob {
    pub(crate) fn last(&self) -> &Piece {
        &self.chunks.last().expect("a job has at least one chunk").0
    }

    /// Whether `piece` lies within the job's range of its blob.
    pub(crate) fn covers(&self, piece: &Piece) -> bool {
        let first = &self.chunks[0].0;
        piece.blob_index == first.blob_index && (first.rel..=self.last().rel).contains(&piece.rel)
    }

    fn stored_len(&self) -> u64 {
        self.chunks
            .iter()
            .map(|(p, _)| u64::from(p.rec.compressed_size))
            .sum()
    }

    pub(crate) fn accepts(&self, next: &Piece, merge_limit: u64) -> bool {
        extends(self.last(), self.stored_len(), next, merge_limit)
    }

    pub(crate) fn push(&mut self, piece: Piece, pending: &Arc<Pending>) {
        self.chunks.push((piece, Arc::downgrade(pending)));
    }

    /// Fails chunk `first` and those after it for their readers.
    fn finish_from(&self, first: usize, error: &FetchError) {
        for (piece, pending) in self.chunks.get(first..).unwrap_or_default() {
            if let Some(pending) = pending.upgrade() {
                self.ctx
                    .inflight
                    .finish(piece.key(), &pending, Err(error.clone()));
            }
        }
    }

    /// Takes a chunk's verified bytes (or its defect) to the readers waiting
    /// for it and to the cache.
    fn deliver(&self, idx: usize, decoded: Result<ChunkBuf, ChunkDefect>) {
        let metrics = &self.ctx.metrics;
        let (piece, pending) = &self.chunks[idx];
        // Nobody waits for a fetch the map forgot (its reader timed out);
        // the chunk is still verified and cached.
        let pending = pending.upgrade();
        let rec = &piece.rec;
        match decoded {
            Ok(buf) => {
                Metrics::add(&metrics.chunks_verified, 1);
                let data = buf.freeze();
                // Waiters get the bytes before they are cached; new readers
                // keep joining the completed fetch at least until the cache
                // has them.
                if let Some(pending) = &pending {
                    pending.complete(Ok(data.clone()));
                }
                match self.cache.write_chunk(piece.rel, rec, &data) {
                    Ok(()) => Metrics::add(&metrics.cache_bytes_written, data.len() as u64),
                    Err(e) => {
                        Metrics::add(&metrics.cache_write_errors, 1);
                        self.ctx.cache_failures.failed(&e);
                    }
                }
                // Kept for a sequential reader still to come.
                if let Some(pending) = &pending {
                    pending.settle();
                    self.ctx
                        .inflight
                        .retain(piece.key(), pending, data.len() as u64);
                }
            }
            Err(defect) => {
                Metrics::add(&metrics.digest_errors, 1);
                error!(chunk = %rec.digest, blob = %self.blob.digest, defect = %defect, "chunk failed verification");
                let error = FetchError::Corrupt {
                    chunk: rec.digest,
                    blob: self.blob.digest,
                    defect,
                };
                if let Some(pending) = &pending {
                    self.ctx.inflight.finish(piece.key(), pending, Err(error));
                }
            }
        }
    }
}

/// Whether a request ending with `last` and holding `stored` bytes may take
/// `next` too: the chunk right after it in the same blob, within `limit`.
pub(crate) fn extends(last: &Piece, stored: u64, next: &Piece, limit: u64) -> bool {
    last.adjacent(next) && stored + u64::from(next.rec.compressed_size) <= limit
}

/// Whether a reader waits for any of `chunks`.
fn any_wanted<'a>(chunks: impl IntoIterator<Item = &'a JobChunk>) -> bool {
    chunks
        .into_iter()
        .any(|(_, pending)| pending.upgrade().is_some_and(|p| p.is_wanted()))
}

/// How many chunks ahead of the stream a background job looks for waiting
/// readers: the job then runs at the daemon's priority at least that many
/// chunks before such a reader's chunk, and a long readahead (hundreds of
/// small chunks) does not scan all of its chunks at every chunk.
const WANTED_AHEAD: usize = 8;

/// Cuts the stream of a job's range into its chunks and delivers each one
/// as soon as its last byte is in, so readers of the first chunks need not
/// wait for the whole range.
struct Assembly<'a> {
    job: &'a FetchJob,
    /// Index of the chunk being filled.
    next: usize,
    filling: Option<ChunkBuf>,
    /// Bytes passed over of a chunk too large for any buffer.
    skipped: usize,
    /// When the first bytes came.
    first_byte: Option<std::time::Instant>,
}

impl<'a> Assembly<'a> {
    fn new(job: &'a FetchJob) -> Self {
        Self {
            job,
            next: 0,
            filling: None,
            skipped: 0,
            first_byte: None,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(std::time::Instant::now());
        }
        Metrics::add(&self.job.ctx.metrics.bytes_fetched, data.len() as u64);
        while let Some((piece, _)) = self.job.chunks.get(self.next) {
            let want = piece.rec.compressed_size as usize;
            if self.filling.is_none() && self.skipped == 0 {
                self.serve_waiting_reader();
                self.filling = self.job.ctx.pool.take(want);
            }
            let have = match &mut self.filling {
                Some(buf) => {
                    let n = buf.fill_from(&data[..data.len().min(want - buf.len())]);
                    data = &data[n..];
                    buf.len()
                }
                None => {
                    let n = data.len().min(want - self.skipped);
                    data = &data[n..];
                    self.skipped += n;
                    self.skipped
                }
            };
            if have < want {
                return;
            }
            let decoded = match self.filling.take() {
                Some(stored) => decode_chunk(&piece.rec, stored, &self.job.ctx.pool),
                None => Err(ChunkDefect::StoredOversized(piece.rec.compressed_size)),
            };
            self.skipped = 0;
            self.job.deliver(self.next, decoded);
            self.next += 1;
        }
    }

    /// Gives a background job's thread the daemon's priority once a reader
    /// waits for one of the next [`WANTED_AHEAD`] chunks (checked as each
    /// chunk begins).
    fn serve_waiting_reader(&self) {
        if workers::nice_above_base() == 0 {
            return;
        }
        if any_wanted(self.job.chunks[self.next..].iter().take(WANTED_AHEAD)) {
            workers::serve_waiting_reader();
        }
    }

    /// Fails the chunks not delivered yet.
    fn fail_rest(&mut self, error: &FetchError) {
        self.filling = None;
        self.job.finish_from(self.next, error);
        self.next = self.job.chunks.len();
    }
}

impl Job for FetchJob {
    fn is_wanted(&self) -> bool {
        any_wanted(&self.chunks)
    }

    fn run(self: Box<Self>) {
        let metrics = &self.ctx.metrics;
        let offset = self.chunks[0].0.rec.compressed_offset;
        let len = self.stored_len();
        Metrics::add(&metrics.backend_requests, 1);
        let started = std::time::Instant::now();
        let mut assembly = Assembly::new(&self);
        let result = self
            .ctx
            .backend
            .read_range(&self.blob, offset, len, &mut |piece| assembly.feed(piece));
        let took = started.elapsed();
        metrics.backend_latency.record(took);
        match result {
            // A backend hands over exactly the range, so every chunk with
            // stored bytes is in; this delivers trailing ones of stored size
            // 0 (a corrupt record), which no byte completes.
            Ok(()) => {
                if let Some(first) = assembly.first_byte {
                    self.ctx.link.record(len, first - started, took);
                }
                assembly.feed(&[]);
            }
            Err(e) => {
                Metrics::add(&metrics.backend_errors, 1);
                error!(blob = %self.blob.digest, offset, len, source = %self.ctx.backend.describe(), error = %e, "range request failed");
                assembly.fail_rest(&FetchError::Backend {
                    blob: self.blob.digest,
                    offset,
                    len,
                    source: Arc::new(e),
                });
            }
        }
        Metrics::add(&metrics.backend_requests_done, 1);
    }

    fn cancel(self: Box<Self>) {
        let (piece, _) = &self.chunks[0];
        self.finish_from(
            0,
            &FetchError::Shutdown {
                chunk: piece.rec.digest,
                blob: self.blob.digest,
            },
        );
    }
}
