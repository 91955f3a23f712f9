//! The image's prefetch list, fetched in the background from the moment the
//! instance is built: the missing chunks of its stretches of files in list
//! order, in requests of adjacent chunks of one blob merged up to
//! `merge_limit_bytes` (a reader that joins one waits for little more than a
//! request of its own would bring), as background jobs: readers' fetches go
//! first, and background jobs take at most their share of the workers.
//!
//! The list also says where readahead stops: it names what a start read, so
//! a sequential reader of listed chunks gets no readahead past them (a read
//! beyond a listed stretch is a miss, whose readahead goes on from there).

use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};
use std::sync::{Arc, Weak};
use std::time::Instant;

use lode_common::format::{BlobIndex, Bootstrap, Ino, PrefetchRange};
use tracing::{debug, info, warn};

use super::{close_unless_extended, Fetcher, Piece};
use crate::metrics::Metrics;
use crate::read::job::{extends, FetchJob};
use crate::read::workers::Priority;

/// The image's prefetch list, in its order and by file.
#[derive(Default)]
pub(crate) struct PrefetchList {
    ranges: Vec<PrefetchRange>,
    /// Inode number → the stretches of its chunks listed.
    by_ino: HashMap<u64, Vec<Range<u32>>>,
}

impl PrefetchList {
    /// The bootstrap's list; an unreadable one is logged and taken as empty.
    pub(crate) fn of(bootstrap: &Bootstrap) -> Self {
        let ranges = bootstrap.prefetch_list().unwrap_or_else(|e| {
            warn!(error = %e, "unreadable prefetch list; not prefetching");
            Vec::new()
        });
        let mut by_ino: HashMap<u64, Vec<Range<u32>>> = HashMap::new();
        for r in &ranges {
            by_ino.entry(r.ino.0).or_default().push(r.chunks.clone());
        }
        Self { ranges, by_ino }
    }

    /// Whether one listed stretch of `ino` holds all of `chunks`.
    pub(crate) fn covers(&self, ino: Ino, chunks: RangeInclusive<u32>) -> bool {
        self.by_ino.get(&ino.0).is_some_and(|listed| {
            listed
                .iter()
                .any(|r| r.contains(chunks.start()) && r.contains(chunks.end()))
        })
    }
}

impl Fetcher {
    /// Starts fetching the prefetch list on a thread of its own, if the
    /// image has one. The thread ends when the list is done, the fetcher
    /// shuts down or the instance is gone.
    pub(crate) fn start_prefetch(fetcher: &Arc<Self>) -> std::io::Result<()> {
        if fetcher.prefetch.ranges.is_empty() {
            return Ok(());
        }
        let weak = Arc::downgrade(fetcher);
        std::thread::Builder::new()
            .name("lode-prefetch".into())
            .spawn(move || prefetch(&weak))
            .map(drop)
    }

    /// The requests the list makes, in the order of their first chunk in
    /// the list: each holds adjacent chunks of one blob, in list order, up
    /// to `merge_limit_bytes`. A blob's request stays open while the list
    /// goes on in other blobs (the converter lays each blob's listed chunks
    /// out in list order, but a list interleaves files of several layers),
    /// so a few small files at the head of the list do not each hold a
    /// request, and a worker, for a round trip.
    fn plan_prefetch(&self) -> Vec<Vec<Piece>> {
        let mut planned: Vec<Vec<Piece>> = Vec::new();
        // Blob → its open request in `planned` and that request's stored bytes.
        let mut open: HashMap<BlobIndex, (usize, u64)> = HashMap::new();
        for range in &self.prefetch.ranges {
            let Ok(size) = self.bootstrap.inode(range.ino).map(|i| i.size) else {
                continue;
            };
            for idx in range.chunks.clone() {
                let Ok(piece) = self.piece(range.ino, idx, size) else {
                    break;
                };
                let stored = u64::from(piece.rec.compressed_size);
                let limit = self.settings.merge_limit;
                let extended = open.get_mut(&piece.blob_index).filter(|(at, bytes)| {
                    planned[*at]
                        .last()
                        .is_some_and(|last| extends(last, *bytes, &piece, limit))
                });
                match extended {
                    Some((at, bytes)) => {
                        planned[*at].push(piece);
                        *bytes += stored;
                    }
                    None => {
                        open.insert(piece.blob_index, (planned.len(), stored));
                        planned.push(vec![piece]);
                    }
                }
            }
        }
        planned
    }

    /// Queues the missing chunks of one planned request (several requests
    /// if some of its chunks are cached or in flight meanwhile); returns the
    /// requests submitted, or `None` once the fetcher shuts down.
    fn prefetch_request(&self, pieces: &[Piece]) -> Option<u64> {
        let mut job = None;
        let mut submitted = 0;
        for piece in pieces {
            // `None` comes only while no job is being gathered.
            submitted += self.prefetch_chunk(*piece, &mut job)?;
        }
        if let Some(j) = job {
            self.submit_prefetch(j);
            submitted += 1;
        }
        Some(submitted)
    }

    /// Adds `piece` to `job` if it is missing, submitting the job when the
    /// piece does not extend it; returns the jobs submitted, or `None` once
    /// the fetcher shuts down.
    fn prefetch_chunk(&self, piece: Piece, job: &mut Option<FetchJob>) -> Option<u64> {
        let Ok(cache) = self.blob_cache(&piece) else {
            return Some(0);
        };
        let skip = cache.is_present(piece.rel) || self.ctx.inflight.contains(&piece.key());
        let mut submitted = 0;
        if let Some(done) = close_unless_extended(job, &piece, skip, self.settings.merge_limit) {
            self.submit_prefetch(done);
            submitted += 1;
        }
        if skip {
            return Some(submitted);
        }
        if job.is_none() && !self.pool.wait_for_background_room(self.settings.workers) {
            return None;
        }
        self.lead_into(job, piece, cache);
        Some(submitted)
    }

    fn submit_prefetch(&self, job: FetchJob) {
        debug!(blob = %job.blob.digest, chunks = job.chunks.len(), "prefetch");
        Metrics::add(&self.metrics.prefetch_requests, 1);
        self.pool.submit(Priority::Background, Box::new(job));
    }
}

/// Plans the list's requests, then queues them while the fetcher lives.
fn prefetch(fetcher: &Weak<Fetcher>) {
    let started = Instant::now();
    let Some((planned, ranges)) = fetcher
        .upgrade()
        .map(|f| (f.plan_prefetch(), f.prefetch.ranges.len()))
    else {
        return;
    };
    let mut requests = 0u64;
    for pieces in &planned {
        let Some(f) = fetcher.upgrade() else {
            return;
        };
        match f.prefetch_request(pieces) {
            Some(n) => requests += n,
            None => return,
        }
    }
    info!(
        ranges,
        requests,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch list queued"
    );
}
