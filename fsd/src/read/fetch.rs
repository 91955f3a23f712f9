//! The read path: file range → chunks → cache or range requests → bytes.
//!
//! A read looks its chunks up in the cache; for the missing ones it either
//! joins a fetch in flight or starts one. Started fetches become jobs of
//! chunks adjacent in their blob (one range request each, up to the merge
//! limit), extended over the blob's missing chunks around them whichever
//! files they belong to, forward first, then backward: files are stored in tar
//! order, so a cold walk over a directory of small files reads what one
//! request brought. Jobs run on the
//! worker pool; the reader waits for its chunks until the deadline.
//! Once a file is read sequentially, jobs for the next `readahead_bytes` are
//! queued in the background so the network stays busy while the reader
//! consumes what has arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_common::format::{
    BlobIndex, BlobRecord, Bootstrap, ChunkDigest, ChunkIndex, ChunkRecord, FormatError, Ino,
    InodeKind, MAX_CHUNK_SIZE,
};
use lode_common::Digest;
use lode_config::FetchConfig;

use crate::metrics::Metrics;
use crate::read::access::{AccessRecord, Accessed};
use crate::read::backend::{BackendError, BlobBackend};
use crate::read::cache::{BlobCache, CacheError, ChunkCache, WriteFailureLog};
use crate::read::inflight::{ChunkKey, Inflight, Pending};
use crate::read::job::{FetchJob, JobContext};
use crate::read::link::LinkEstimate;
use crate::read::pools::Pools;
use crate::read::verify::ChunkDefect;
use crate::read::workers::{Priority, WorkerPool};

/// Why a read could not be served. Cloneable: one fetch's outcome goes to
/// every reader waiting for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("inode {ino}: {source}")]
    Format { ino: u64, source: Arc<FormatError> },
    #[error("inode {ino} is not a regular file")]
    NotAFile { ino: u64 },
    #[error("inode {ino}: inconsistent bootstrap: {reason}")]
    BadFile { ino: u64, reason: String },
    #[error("blob {blob}: range {offset}+{len}: {source}")]
    Backend {
        blob: Digest,
        offset: u64,
        len: u64,
        source: Arc<BackendError>,
    },
    #[error("chunk {chunk} of blob {blob} is corrupt: {defect}")]
    Corrupt {
        chunk: ChunkDigest,
        blob: Digest,
        defect: ChunkDefect,
    },
    #[error("chunk {chunk} of blob {blob}: not fetched within {deadline:?}")]
    Timeout {
        chunk: ChunkDigest,
        blob: Digest,
        deadline: Duration,
    },
    #[error(transparent)]
    Cache(Arc<CacheError>),
    #[error("chunk {chunk} of blob {blob}: the fetcher is shutting down")]
    Shutdown { chunk: ChunkDigest, blob: Digest },
}

impl From<CacheError> for FetchError {
    fn from(e: CacheError) -> Self {
        FetchError::Cache(Arc::new(e))
    }
}

/// The read path's tunables (see [`FetchConfig`]).
#[derive(Clone, Copy, Debug)]
pub struct FetchSettings {
    pub merge_limit: u64,
    /// Bytes taken along with misses and not read stay below this share,
    /// in percent, of the bytes read.
    pub unread_ahead_percent: u32,
    pub readahead: u64,
    /// Merge limit of background readahead requests.
    pub readahead_request: u64,
    pub deadline: Duration,
    pub workers: usize,
    /// Workers that may run background jobs at once.
    pub background_workers: usize,
    /// How much nicer a worker running a background job is (a niceness
    /// [`usable_nice`](super::workers::usable_nice) allows).
    pub background_nice: i32,
}

impl FetchSettings {
    /// The settings `c` makes, with the daemon's usable background niceness.
    pub fn new(c: &FetchConfig, background_nice: i32) -> Self {
        Self {
            merge_limit: c.merge_limit_bytes,
            unread_ahead_percent: c.unread_ahead_percent,
            readahead: c.readahead_bytes,
            readahead_request: c.readahead_request_bytes,
            deadline: c.deadline(),
            workers: c.workers,
            background_workers: c.background_workers(),
            background_nice,
        }
    }
}

/// One chunk of a file with everything needed to fetch or read it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) rec: ChunkRecord,
    pub(crate) blob_index: BlobIndex,
    pub(crate) blob: BlobRecord,
    /// Index of the chunk within its blob.
    pub(crate) rel: u32,
}

impl Piece {
    /// The chunk's place in the image's chunk table.
    pub(crate) fn index(&self) -> ChunkIndex {
        ChunkIndex(self.blob.first_chunk.0 + self.rel)
    }

    pub(crate) fn key(&self) -> ChunkKey {
        ChunkKey {
            blob: self.blob.digest,
            rel: self.rel,
        }
    }

    /// Whether `next` directly follows this chunk in the same blob.
    pub(crate) fn adjacent(&self, next: &Piece) -> bool {
        self.blob_index == next.blob_index
            && self
                .rec
                .compressed_offset
                .checked_add(u64::from(self.rec.compressed_size))
                == Some(next.rec.compressed_offset)
    }
}

/// The part of a file one read covers.
struct Span {
    ino: Ino,
    file_size: u64,
    offset: u64,
    end: u64,
    /// First and last file chunk indices of the span.
    first: u32,
    last: u32,
}

/// A chunk a read waits for: the fetch, the range within the chunk, and
/// where the bytes go in the read's buffer.
type Wait = (Piece, Arc<Pending>, std::ops::Range<u32>, usize);
/// A fetch a read created, waiting for a job.
struct Lead {
    /// Index of the chunk within the file read.
    idx: u32,
    piece: Piece,
    pending: Arc<Pending>,
    cache: Arc<BlobCache>,
}

/// Serves file reads of one image instance.
pub struct Fetcher {
    bootstrap: Arc<Bootstrap>,
    cache: Arc<ChunkCache>,
    /// Each blob's cache once opened, held by `cache` (which drops it when
    /// its files were removed; then the next read opens it afresh).
    blob_caches: Box<[RwLock<Weak<BlobCache>>]>,
    ctx: Arc<JobContext>,
    pool: WorkerPool,
    metrics: Arc<Metrics>,
    settings: FetchSettings,
    streams: Mutex<HashMap<u64, readahead::Stream>>,
    access: AccessRecord,
    prefetch: prefetch::PrefetchList,
}

impl Fetcher {
    pub fn new(
        bootstrap: Arc<Bootstrap>,
        backend: Arc<dyn BlobBackend>,
        cache: Arc<ChunkCache>,
        metrics: Arc<Metrics>,
        settings: FetchSettings,
        pools: &Pools,
    ) -> std::io::Result<Self> {
        // A chunk holds at most the image's chunk size; stored, it may be a
        // zstd frame a little larger than that (zstd's compress bound).
        let chunk_size = bootstrap.chunk_size().min(MAX_CHUNK_SIZE) as usize;
        let pool = pools.get(chunk_size + chunk_size / 128 + 1024);
        let blob_caches = (0..bootstrap.blob_count())
            .map(|_| RwLock::new(Weak::new()))
            .collect();
        Ok(Self {
            cache,
            blob_caches,
            ctx: Arc::new(JobContext {
                backend,
                // Twice the window: readahead runs up to a window ahead of a
                // reader that may be up to a window behind what it consumes.
                inflight: Inflight::new(settings.readahead.saturating_mul(2)),
                metrics: Arc::clone(&metrics),
                pool,
                link: LinkEstimate::default(),
                cache_failures: WriteFailureLog::default(),
            }),
            pool: WorkerPool::new(
                settings.workers,
                settings.background_workers,
                settings.background_nice,
            )?,
            metrics,
            settings,
            streams: Mutex::new(HashMap::new()),
            access: AccessRecord::new(&bootstrap),
            prefetch: prefetch::PrefetchList::of(&bootstrap),
            bootstrap,
        })
    }

    pub fn bootstrap(&self) -> &Arc<Bootstrap> {
        &self.bootstrap
    }

    /// The files and chunks read so far.
    pub(crate) fn accessed(&self) -> Result<Accessed, FormatError> {
        self.access.snapshot(&self.bootstrap)
    }

    /// Reads up to `size` bytes at `offset` of regular file `ino` (fewer at
    /// the end of the file, none past it).
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Bytes, FetchError> {
        let fmt = |source| FetchError::Format {
            ino: ino.0,
            source: Arc::new(source),
        };
        let inode = self.bootstrap.inode(ino).map_err(fmt)?;
        if inode.kind != InodeKind::File {
            return Err(FetchError::NotAFile { ino: ino.0 });
        }
        self.access.file_read(ino);
        if offset >= inode.size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = inode.size.min(offset.saturating_add(u64::from(size)));
        let cs = u64::from(self.bootstrap.chunk_size());
        let bad = |reason: String| FetchError::BadFile { ino: ino.0, reason };
        let first =
            u32::try_from(offset / cs).map_err(|_| bad("offset beyond chunk table".into()))?;
        let last =
            u32::try_from((end - 1) / cs).map_err(|_| bad("size beyond chunk table".into()))?;
        let chunk_count = self.bootstrap.file_chunk_count(ino).map_err(fmt)?;
        if u64::from(chunk_count) != inode.size.div_ceil(cs) {
            return Err(bad(format!(
                "{chunk_count} chunks for {} bytes",
                inode.size
            )));
        }

        let total = (end - offset) as usize;
        // Allocated (zeroed) only once some bytes must be copied into it: a
        // read within one fetched chunk is answered with the chunk's bytes.
        let mut out = Vec::new();
        let mut waits = Vec::new();
        let mut leads = Vec::new();
        let span = Span {
            ino,
            file_size: inode.size,
            offset,
            end,
            first,
            last,
        };
        if let Err(e) = self.serve_or_join(&span, total, &mut out, &mut waits, &mut leads) {
            // Fetches this read created must not stay in flight without a job.
            for lead in leads {
                self.ctx
                    .inflight
                    .finish(lead.piece.key(), &lead.pending, Err(e.clone()));
            }
            return Err(e);
        }

        let extended_to = self.start_demand_jobs(ino, inode.size, chunk_count, last, leads);
        // A sequential reader of listed chunks gets no readahead: the list
        // names what is going to be read.
        if self.settings.readahead > 0
            && self.is_sequential(ino, offset, end, cs)
            && !self.prefetch.covers(ino, first..=last)
        {
            self.readahead(ino, inode.size, chunk_count, extended_to.max(last + 1));
        }

        let deadline = Instant::now() + self.settings.deadline;
        let data = match waits.as_slice() {
            [whole] if out.is_empty() && whole.2.len() == total => {
                self.wait_for(ino, whole, deadline)?
            }
            _ => {
                // Without cache hits the waits cover the span in order and
                // are appended; nothing needs zeroing first.
                out.reserve_exact(total - out.len());
                for wait in &waits {
                    let src = self.wait_for(ino, wait, deadline)?;
                    let at = wait.3;
                    if at == out.len() {
                        out.extend_from_slice(&src);
                    } else if let Some(dst) = out.get_mut(at..at + src.len()) {
                        dst.copy_from_slice(&src);
                    }
                }
                if out.len() != total {
                    return Err(FetchError::BadFile {
                        ino: ino.0,
                        reason: format!(
                            "chunks of a read add up to {} of {total} bytes",
                            out.len()
                        ),
                    });
                }
                Bytes::from(out)
            }
        };
        Metrics::add(&self.metrics.bytes_read, data.len() as u64);
        Ok(data)
    }

    /// Waits for a chunk until `deadline`; returns the part of it the read needs.
    fn wait_for(&self, ino: Ino, wait: &Wait, deadline: Instant) -> Result<Bytes, FetchError> {
        let (piece, pending, range, _) = wait;
        let data = match pending.wait(deadline) {
            Some(result) => result?,
            None => {
                Metrics::add(&self.metrics.fetch_timeouts, 1);
                // Later readers start a fresh fetch instead of joining this one.
                self.ctx.inflight.forget(piece.key(), pending);
                return Err(FetchError::Timeout {
                    chunk: piece.rec.digest,
                    blob: piece.blob.digest,
                    deadline: self.settings.deadline,
                });
            }
        };
        let (start, end) = (range.start as usize, range.end as usize);
        if start > end || end > data.len() {
            return Err(FetchError::BadFile {
                ino: ino.0,
                reason: format!("chunk {} shorter than its record", piece.rec.digest),
            });
        }
        // A reader that got to the chunk's end is done with it; once it is
        // cached, memory need not keep it any longer.
        if range.end == piece.rec.uncompressed_size && pending.consume() {
            self.ctx.inflight.forget(piece.key(), pending);
        }
        Ok(data.slice(start..end))
    }

    /// Copies the span's cached chunks into `out` (sized to `total` bytes
    /// on the first); for the others joins the fetch in flight or creates
    /// one (returned in `leads` for jobs to be started). `waits` gets every
    /// chunk still to be copied.
    fn serve_or_join(
        &self,
        span: &Span,
        total: usize,
        out: &mut Vec<u8>,
        waits: &mut Vec<Wait>,
        leads: &mut Vec<Lead>,
    ) -> Result<(), FetchError> {
        let cs = u64::from(self.bootstrap.chunk_size());
        for idx in span.first..=span.last {
            let piece = self.piece(span.ino, idx, span.file_size)?;
            self.access
                .chunk_read(span.ino, idx, piece.index(), piece.rec.compressed_size);
            let chunk_start = u64::from(idx) * cs;
            let lo = span.offset.saturating_sub(chunk_start) as u32;
            let hi = (span.end - chunk_start).min(u64::from(piece.rec.uncompressed_size)) as u32;
            let at = (chunk_start + u64::from(lo) - span.offset) as usize;
            let cache = self.blob_cache(&piece)?;
            if let Some(pending) = self.ctx.inflight.get(&piece.key()) {
                // Marked before the pool looks for wanted jobs.
                let first = pending.want();
                let counter = if pending.is_done() {
                    &self.metrics.prefetch_hits
                } else {
                    if first {
                        self.pool.reader_waits();
                    }
                    &self.metrics.inflight_joins
                };
                Metrics::add(counter, 1);
                waits.push((piece, pending, lo..hi, at));
                continue;
            }
            if out.is_empty() {
                out.resize(total, 0);
            }
            if cache.read_at(
                piece.rel,
                &piece.rec,
                lo,
                &mut out[at..at + (hi - lo) as usize],
            )? {
                Metrics::add(&self.metrics.cache_hits, 1);
                continue;
            }
            let (pending, leader) = self.ctx.inflight.join_or_lead(piece.key());
            if !leader {
                if pending.want() {
                    self.pool.reader_waits();
                }
                Metrics::add(&self.metrics.inflight_joins, 1);
            } else if cache.is_present(piece.rel) {
                Metrics::add(&self.metrics.cache_hits, 1);
                // A job stored the chunk between our lookup and our lead.
                let mut whole = vec![0u8; piece.rec.uncompressed_size as usize];
                let result = match cache.read_at(piece.rel, &piece.rec, 0, &mut whole) {
                    Ok(true) => Ok(Bytes::from(whole)),
                    Ok(false) => Err(FetchError::BadFile {
                        ino: span.ino.0,
                        reason: format!("cached chunk {} vanished", piece.rec.digest),
                    }),
                    Err(e) => Err(FetchError::from(e)),
                };
                self.ctx.inflight.finish(piece.key(), &pending, result);
            } else {
                Metrics::add(&self.metrics.cache_misses, 1);
                leads.push(Lead {
                    idx,
                    piece,
                    pending: Arc::clone(&pending),
                    cache,
                });
            }
            waits.push((piece, pending, lo..hi, at));
        }
        Ok(())
    }

    /// Cancels queued fetches (readers waiting for them get an error) and
    /// waits up to `grace` for running ones, so that what they fetched is
    /// cached before a final flush. Returns whether they all finished.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.pool.shutdown(grace)
    }

    /// Resolves file chunk `idx` of `ino` and checks it against the file.
    fn piece(&self, ino: Ino, idx: u32, file_size: u64) -> Result<Piece, FetchError> {
        let fmt = |source| FetchError::Format {
            ino: ino.0,
            source: Arc::new(source),
        };
        let bad = |reason: String| FetchError::BadFile { ino: ino.0, reason };
        let chunk = self.bootstrap.file_chunk(ino, idx).map_err(fmt)?;
        let rec = self.bootstrap.chunk(chunk).map_err(fmt)?;
        let blob = self.bootstrap.blob(rec.blob).map_err(fmt)?;
        let cs = u64::from(self.bootstrap.chunk_size());
        let expected = file_size
            .checked_sub(u64::from(idx) * cs)
            .filter(|&left| left > 0)
            .ok_or_else(|| bad(format!("chunk {idx} lies past the end of the file")))?
            .min(cs);
        if u64::from(rec.uncompressed_size) != expected {
            return Err(bad(format!(
                "chunk {idx} ({}) has {} bytes, the file needs {expected}",
                rec.digest, rec.uncompressed_size
            )));
        }
        let rel = chunk
            .0
            .checked_sub(blob.first_chunk.0)
            .filter(|&rel| rel < blob.chunk_count)
            .ok_or_else(|| bad(format!("chunk {} is not among its blob's chunks", chunk.0)))?;
        Ok(Piece {
            rec,
            blob_index: rec.blob,
            blob,
            rel,
        })
    }

    fn blob_cache(&self, piece: &Piece) -> Result<Arc<BlobCache>, FetchError> {
        let slot = self
            .blob_caches
            .get(piece.blob_index.0 as usize)
            .ok_or_else(|| FetchError::BadFile {
                ino: 0,
                reason: format!("blob index {} out of range", piece.blob_index.0),
            })?;
        let current = slot.read().unwrap_or_else(|e| e.into_inner()).upgrade();
        if let Some(cache) = current.filter(|c| !c.is_evicted()) {
            return Ok(cache);
        }
        let blob = &piece.blob;
        let chunks = (0..blob.chunk_count)
            .map(|rel| self.bootstrap.chunk(ChunkIndex(blob.first_chunk.0 + rel)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| FetchError::Format {
                ino: 0,
                source: Arc::new(source),
            })?;
        let cache = self.cache.blob(blob, &chunks)?;
        *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&cache);
        Ok(cache)
    }

    /// Groups the chunks this read leads into jobs and queues them. The job
    /// that ends at the read's last chunk is extended over the chunks that
    /// follow in the blob. Returns the file chunk index after the last one
    /// queued.
    fn start_demand_jobs(
        &self,
        ino: Ino,
        file_size: u64,
        chunk_count: u32,
        last: u32,
        leads: Vec<Lead>,
    ) -> u32 {
        let merge_limit = self.settings.merge_limit;
        let mut queued_to = last + 1;
        let mut leads = leads.into_iter().peekable();
        while let Some(lead) = leads.next() {
            let mut job_last = lead.idx;
            let mut job = self.new_job(lead.piece, lead.pending, lead.cache);
            while let Some(next) =
                leads.next_if(|n| n.idx == job_last + 1 && job.accepts(&n.piece, merge_limit))
            {
                job_last = next.idx;
                job.push(next.piece, &next.pending);
            }
            if job_last == last {
                self.extend_job(&mut job);
                queued_to = self.covered_to(ino, file_size, chunk_count, last, &job);
            }
            self.pool.submit(Priority::Demand, Box::new(job));
        }
        queued_to
    }

    fn new_job(&self, piece: Piece, pending: Arc<Pending>, cache: Arc<BlobCache>) -> FetchJob {
        FetchJob {
            ctx: Arc::clone(&self.ctx),
            blob: piece.blob,
            cache,
            chunks: vec![(piece, Arc::downgrade(&pending))],
        }
    }

    /// Leads the fetch of `piece` (unless another fetch already does) as
    /// part of the background `job` being gathered, started with it if
    /// there is none.
    fn lead_into(&self, job: &mut Option<FetchJob>, piece: Piece, cache: Arc<BlobCache>) {
        if let Some(pending) = self.ctx.inflight.try_lead(piece.key()) {
            match job {
                Some(j) => j.push(piece, &pending),
                None => *job = Some(self.new_job(piece, pending, cache)),
            }
        }
    }
}

/// Takes the background job being gathered in chunk order out, to be
/// submitted, when `piece` does not extend it: the piece is `skip`ped
/// (cached or in flight), not adjacent, or would take it over `limit`.
fn close_unless_extended(
    job: &mut Option<FetchJob>,
    piece: &Piece,
    skip: bool,
    limit: u64,
) -> Option<FetchJob> {
    if job
        .as_ref()
        .is_some_and(|j| skip || !j.accepts(piece, limit))
    {
        job.take()
    } else {
        None
    }
}

#[path = "neighbours.rs"]
mod neighbours;
#[path = "prefetch.rs"]
mod prefetch;
#[path = "readahead.rs"]
mod readahead;

#[cfg(test)]
#[path = "prefetch_tests.rs"]
mod prefetch_tests;
#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
