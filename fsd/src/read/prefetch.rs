//! The image's prefetch list, fetched in the background from the moment the
//! instance is built: the missing chunks of its stretches of files in list
//! order, in requests
//! merged up to `merge_limit_bytes` (a reader that joins one waits for
//! little more than a request of its own would bring), as background jobs:
//! readers' fetches go first, and background jobs take at most their share
//! of the workers.
//!
//! The list also says where readahead stops: it names what a start read, so
//! a sequential reader of listed chunks gets no readahead past them (a read
//! beyond a listed stretch is a miss, whose readahead goes on from there).

use std::collections::HashMap;
use std::ops::{Range, RangeInclusive};
use std::sync::{Arc, Weak};
use std::time::Instant;

use lode_common::format::{Bootstrap, Ino, PrefetchRange};
use tracing::{debug, info, warn};

use super::{close_unless_extended, Fetcher, Piece};
use crate::metrics::Metrics;
use crate::read::job::FetchJob;
use crate::read::workers::{Job as _, Priority};

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

    /// Queues the missing chunks of `range` (merging them into `job`);
    /// returns the requests submitted, or `None` once the fetcher shuts down.
    fn prefetch_range(&self, range: &PrefetchRange, job: &mut Option<FetchJob>) -> Option<u64> {
        let Ok(size) = self.bootstrap.inode(range.ino).map(|i| i.size) else {
            return Some(0);
        };
        let mut submitted = 0;
        for idx in range.chunks.clone() {
            let Ok(piece) = self.piece(range.ino, idx, size) else {
                break;
            };
            submitted += self.prefetch_chunk(piece, job)?;
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

/// Walks the list while the fetcher lives.
fn prefetch(fetcher: &Weak<Fetcher>) {
    let started = Instant::now();
    let mut requests = 0u64;
    let mut job: Option<FetchJob> = None;
    let mut listed = 0;
    loop {
        let Some(f) = fetcher.upgrade() else {
            return cancel(job);
        };
        let Some(range) = f.prefetch.ranges.get(listed) else {
            break;
        };
        listed += 1;
        match f.prefetch_range(range, &mut job) {
            Some(n) => requests += n,
            None => return cancel(job),
        }
    }
    if let (Some(f), Some(j)) = (fetcher.upgrade(), job.take()) {
        requests += 1;
        f.submit_prefetch(j);
    }
    info!(
        ranges = listed,
        requests,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch list queued"
    );
}

/// Fails the job being gathered, once the fetcher is going away: its
/// readers learn that at once.
fn cancel(job: Option<FetchJob>) {
    if let Some(j) = job {
        Box::new(j).cancel();
    }
}
