//! Sequential-read tracking and background readahead: once a file is read
//! in order, the chunks ahead of the reader are fetched before it asks.
//!
//! The window ahead grows with the reader, as the kernel's own readahead
//! does: it is as large as what the reader has read in order so far, at
//! least what the link delivers in a round trip, and at most
//! `readahead_bytes`. A reader that stops after a few MiB of a large file
//! leaves at most as much fetched for nothing, and one that reads on keeps
//! the link busy.

use lode_common::format::Ino;
use tracing::debug;

use super::{close_unless_extended, Fetcher};
use crate::metrics::Metrics;
use crate::read::job::FetchJob;
use crate::read::workers::Priority;

/// Streams tracked at most; beyond this the table is cleared (a reader that
/// loses its entry only loses readahead until its next read).
const MAX_STREAMS: usize = 4096;

/// Per-file sequential-read tracking (process-local; the kernel depends on none of it).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Stream {
    /// Where the reads in order began.
    start: u64,
    /// End offset of the previous read.
    next: u64,
    /// File chunks before this index have had readahead scheduled.
    ra_until: u32,
}

impl Fetcher {
    /// Records the read and says whether it continues the previous one.
    pub(super) fn is_sequential(&self, ino: Ino, offset: u64, end: u64, cs: u64) -> bool {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams.len() >= MAX_STREAMS && !streams.contains_key(&ino.0) {
            streams.clear();
        }
        let stream = streams.entry(ino.0).or_default();
        // Kernel readahead requests run on several threads and may arrive a
        // little out of order; anything within a chunk of the previous end counts.
        let sequential = stream.next > 0 && offset.abs_diff(stream.next) <= cs;
        if sequential {
            stream.next = stream.next.max(end);
        } else {
            stream.start = offset;
            stream.next = end;
            stream.ra_until = 0;
        }
        sequential
    }

    /// How far ahead of a reader that has read `consumed` bytes in order
    /// readahead goes.
    fn window(&self, consumed: u64, chunk_size: u64) -> u64 {
        consumed
            .max(self.extra_bytes())
            .max(chunk_size)
            .min(self.settings.readahead)
    }

    /// Queues background jobs for the file's missing chunks from `from` up to
    /// `readahead` bytes ahead, continuing where the previous call stopped.
    pub(super) fn readahead(&self, ino: Ino, file_size: u64, chunk_count: u32, from: u32) {
        let cs = u64::from(self.bootstrap.chunk_size());
        let (start, consumed) = {
            let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            streams.get(&ino.0).map_or((from, 0), |s| {
                (s.ra_until.max(from), s.next.saturating_sub(s.start))
            })
        };
        let window_bytes = self.window(consumed, cs);
        let window = u32::try_from(window_bytes.div_ceil(cs)).unwrap_or(u32::MAX);
        let target = from.saturating_add(window).min(chunk_count);
        // Top the window up only once a whole merged request's worth has been
        // consumed, so background requests are full-sized rather than one
        // chunk per read.
        let request = self.settings.readahead_request.min(window_bytes);
        let merge_chunks = u32::try_from(request / cs).unwrap_or(u32::MAX).max(1);
        if start < target && start > from && target - start < merge_chunks.min(window) {
            return;
        }
        let max_queued = self.settings.workers * 2;
        let mut idx = start;
        let mut job: Option<FetchJob> = None;
        while idx < target {
            if job.is_none() && self.pool.background_queued() >= max_queued {
                break;
            }
            let Ok(piece) = self.piece(ino, idx, file_size) else {
                break;
            };
            let Ok(cache) = self.blob_cache(&piece) else {
                break;
            };
            let cached = cache.is_present(piece.rel);
            if cached {
                cache.will_need(piece.rel, &piece.rec);
            }
            let skip = cached || self.ctx.inflight.contains(&piece.key());
            if let Some(done) = close_unless_extended(&mut job, &piece, skip, request) {
                self.submit_background(Some(done));
            }
            if !skip {
                self.lead_into(&mut job, piece, cache);
            }
            idx += 1;
        }
        self.submit_background(job);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = streams.get_mut(&ino.0) {
            stream.ra_until = stream.ra_until.max(idx);
        }
    }

    fn submit_background(&self, job: Option<FetchJob>) {
        if let Some(job) = job {
            debug!(blob = %job.blob.digest, chunks = job.chunks.len(), "readahead");
            Metrics::add(&self.metrics.readahead_requests, 1);
            self.pool.submit(Priority::Background, Box::new(job));
        }
    }
}
