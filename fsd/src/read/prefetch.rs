//! The image's prefetch list, fetched in the background from the moment the
//! instance is built: the missing chunks of its stretches of files in list
//! order, in requests
//! merged up to `merge_limit_bytes` (a reader that joins one waits for
//! little more than a request of its own would bring), as background jobs:
//! readers' fetches go first, and background jobs take at most their share
//! of the workers.

use std::sync::{Arc, Weak};
use std::time::Instant;

use lode_common::format::PrefetchRange;
use tracing::{debug, info, warn};

use super::{close_unless_extended, Fetcher, Piece};
use crate::metrics::Metrics;
use crate::read::job::FetchJob;
use crate::read::workers::{Job as _, Priority};

impl Fetcher {
    /// Starts fetching the prefetch list on a thread of its own, if the
    /// image has one. The thread ends when the list is done, the fetcher
    /// shuts down or the instance is gone.
    pub(crate) fn start_prefetch(fetcher: &Arc<Self>) -> std::io::Result<()> {
        let list = match fetcher.bootstrap.prefetch_list() {
            Ok(list) if list.is_empty() => return Ok(()),
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, "unreadable prefetch list; not prefetching");
                return Ok(());
            }
        };
        let weak = Arc::downgrade(fetcher);
        std::thread::Builder::new()
            .name("lode-prefetch".into())
            .spawn(move || prefetch(&weak, &list))
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
fn prefetch(fetcher: &Weak<Fetcher>, list: &[PrefetchRange]) {
    let started = Instant::now();
    let mut requests = 0u64;
    let mut job: Option<FetchJob> = None;
    for range in list {
        let queued = fetcher
            .upgrade()
            .and_then(|f| f.prefetch_range(range, &mut job));
        match queued {
            Some(n) => requests += n,
            None => {
                // Its readers learn that the fetcher is going away.
                if let Some(j) = job.take() {
                    Box::new(j).cancel();
                }
                return;
            }
        }
    }
    if let (Some(f), Some(j)) = (fetcher.upgrade(), job.take()) {
        requests += 1;
        f.submit_prefetch(j);
    }
    info!(
        ranges = list.len(),
        requests,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "prefetch list queued"
    );
}
