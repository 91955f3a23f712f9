//! One fetch job: a range request for chunks adjacent in one blob, then
//! decompression, verification and caching of each chunk, and delivery of its
//! bytes (or error) to every reader waiting for it.

use std::sync::Arc;

use lode_common::format::BlobRecord;
use tracing::{error, warn};

use crate::backend::BlobBackend;
use crate::cache::BlobCache;
use crate::fetch::{FetchError, Piece};
use crate::inflight::{Inflight, Pending};
use crate::metrics::Metrics;
use crate::pool::Job;
use crate::verify::{decode_chunk, ChunkDefect};

/// What jobs need besides their chunks.
pub(crate) struct JobContext {
    pub(crate) backend: Arc<dyn BlobBackend>,
    pub(crate) inflight: Inflight,
    pub(crate) metrics: Arc<Metrics>,
}

/// One range request covering chunks adjacent in one blob.
pub(crate) struct FetchJob {
    pub(crate) ctx: Arc<JobContext>,
    pub(crate) blob: BlobRecord,
    pub(crate) cache: Arc<BlobCache>,
    pub(crate) chunks: Vec<(Piece, Arc<Pending>)>,
    pub(crate) background: bool,
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
        self.last().adjacent(next)
            && self.stored_len() + u64::from(next.rec.compressed_size) <= merge_limit
    }

    pub(crate) fn push(&mut self, piece: Piece, pending: Arc<Pending>) {
        self.chunks.push((piece, pending));
    }

    fn finish_all(&self, error: FetchError) {
        for (piece, pending) in &self.chunks {
            self.ctx
                .inflight
                .finish(piece.key(), pending, Err(error.clone()));
        }
    }
}

impl Job for FetchJob {
    fn run(self: Box<Self>) {
        let metrics = &self.ctx.metrics;
        let offset = self.chunks[0].0.rec.compressed_offset;
        let len = self.stored_len();
        Metrics::add(&metrics.backend_requests, 1);
        if self.background {
            Metrics::add(&metrics.readahead_requests, 1);
        }
        let started = std::time::Instant::now();
        let stored = self.ctx.backend.read_range(&self.blob, offset, len);
        metrics.backend_latency.record(started.elapsed());
        let stored = match stored {
            Ok(bytes) => bytes,
            Err(e) => {
                Metrics::add(&metrics.backend_errors, 1);
                error!(blob = %self.blob.digest, offset, len, source = %self.ctx.backend.describe(), error = %e, "range request failed");
                self.finish_all(FetchError::Backend {
                    blob: self.blob.digest,
                    offset,
                    len,
                    source: Arc::new(e),
                });
                return;
            }
        };
        Metrics::add(&metrics.bytes_fetched, stored.len() as u64);
        for (piece, pending) in &self.chunks {
            let rec = &piece.rec;
            let start = (rec.compressed_offset - offset) as usize;
            let end = start + rec.compressed_size as usize;
            let result = match stored.get(start..end) {
                Some(_) => decode_chunk(rec, stored.slice(start..end)),
                None => Err(ChunkDefect::StoredSize {
                    expected: rec.compressed_size,
                    actual: stored.len().saturating_sub(start),
                }),
            };
            match result {
                Ok(data) => {
                    Metrics::add(&metrics.chunks_verified, 1);
                    // Waiters get the bytes before they are cached; new readers
                    // keep joining the completed fetch at least until the
                    // cache has them.
                    pending.complete(Ok(data.clone()));
                    match self.cache.write_chunk(piece.rel, rec, &data) {
                        Ok(()) => Metrics::add(&metrics.cache_bytes_written, data.len() as u64),
                        Err(e) => {
                            Metrics::add(&metrics.cache_write_errors, 1);
                            warn!(error = %e, "cannot cache chunk; serving it uncached");
                        }
                    }
                    // Kept for a sequential reader still to come.
                    pending.settle();
                    self.ctx
                        .inflight
                        .retain(piece.key(), pending, data.len() as u64);
                }
                Err(defect) => {
                    Metrics::add(&metrics.digest_errors, 1);
                    error!(chunk = %rec.digest, blob = %self.blob.digest, defect = %defect, "chunk failed verification");
                    let error = FetchError::Corrupt {
                        chunk: rec.digest,
                        blob: self.blob.digest,
                        defect,
                    };
                    self.ctx.inflight.finish(piece.key(), pending, Err(error));
                }
            }
        }
    }

    fn cancel(self: Box<Self>) {
        let (piece, _) = &self.chunks[0];
        self.finish_all(FetchError::Shutdown {
            chunk: piece.rec.digest,
            blob: self.blob.digest,
        });
    }
}
