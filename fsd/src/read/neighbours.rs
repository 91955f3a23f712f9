//! Growing a demand fetch over the chunks around it in its blob, whichever
//! files they belong to.

use lode_common::format::{ChunkIndex, Ino};

use std::sync::Arc;

use super::{Fetcher, Piece};
use crate::read::job::FetchJob;
use crate::read::job::JobChunk;

/// The least a fetch may add beyond what its reader needs. On a link with
/// almost no delay a miss still costs a request (the registry's work on it,
/// the daemon's hand-offs): a walker of small files on loopback went from
/// 122–128 requests and 2.5 s to 92 and 2.2 s when this went from 256 KiB
/// to 1 MiB (20,000 files, fsd-bench).
pub(super) const MIN_EXTRA: u64 = 1024 * 1024;

impl Fetcher {
    /// Adds the chunks that follow the job's last one in its blob while they
    /// are missing, not in flight, adjacent, within what the link delivers
    /// in a round trip (see [`Fetcher::extra_bytes`]) and within the merge
    /// limit for the whole request; then, with what is left, the chunks
    /// before its first one (a walker that visits a directory backwards
    /// finds its next files there). They may belong to any file; a reader
    /// of one joins this fetch.
    pub(super) fn extend_job(&self, job: &mut FetchJob) {
        let mut len: u64 = job
            .chunks
            .iter()
            .map(|(p, _)| u64::from(p.rec.compressed_size))
            .sum();
        let limit = (len + self.extra_bytes()).min(self.settings.merge_limit.max(len));
        let last = *job.last();
        let first = job.chunks[0].0;
        let mut after = self.lead_neighbours(job, last, 1, limit, &mut len);
        let mut before = self.lead_neighbours(job, first, -1, limit, &mut len);
        before.reverse();
        before.append(&mut job.chunks);
        before.append(&mut after);
        job.chunks = before;
    }

    /// Leads the fetches of the chunks `step` (1 or -1) after `from` in its
    /// blob, in that order, while they are adjacent, missing, not in flight
    /// and keep `len` within `limit`; records them as fetched ahead.
    fn lead_neighbours(
        &self,
        job: &FetchJob,
        from: Piece,
        step: i32,
        limit: u64,
        len: &mut u64,
    ) -> Vec<JobChunk> {
        let mut led = Vec::new();
        let mut at = from;
        while let Some(next) = self.blob_neighbour(&at, step) {
            let adjacent = if step > 0 {
                at.adjacent(&next)
            } else {
                next.adjacent(&at)
            };
            let size = u64::from(next.rec.compressed_size);
            if !adjacent || *len + size > limit || job.cache.is_present(next.rel) {
                break;
            }
            let Some(pending) = self.ctx.inflight.try_lead(next.key()) else {
                break;
            };
            *len += size;
            self.access
                .fetched_ahead(next.index(), next.rec.compressed_size);
            led.push((next, Arc::downgrade(&pending)));
            at = next;
        }
        led
    }

    /// What a fetch may add beyond the chunks a reader needs: what the link
    /// delivers in one round trip (`merge_limit_bytes` until requests tell),
    /// scaled by the share of what earlier fetches took ahead that readers
    /// went on to read; at least [`MIN_EXTRA`] while readers read half or
    /// more of such bytes (neighbours of small files in a walk are worth a
    /// request's overhead even on a link with almost no delay), less in
    /// proportion below that, and at most `merge_limit_bytes`.
    ///
    /// Bytes taken ahead save a reader a round trip only if it reads them;
    /// otherwise they hold up, on the link, the bytes readers wait for.
    ///
    /// Whatever the link, bytes taken along and not read (yet) stay below
    /// `unread_ahead_percent` of the bytes read
    /// ([`AccessRecord::unread_ahead_allowance`]): the first misses take
    /// little along, and the extension grows as readers read what it took.
    ///
    /// [`AccessRecord::unread_ahead_allowance`]: crate::read::access::AccessRecord::unread_ahead_allowance
    pub(super) fn extra_bytes(&self) -> u64 {
        let cap = self.settings.merge_limit;
        let per_round_trip = self.ctx.link.bytes_per_round_trip().unwrap_or(cap);
        let usefulness = self.access.usefulness();
        let worth = (per_round_trip as f64 * usefulness) as u64;
        let least = (MIN_EXTRA as f64 * (2.0 * usefulness).min(1.0)) as u64;
        let allowance = self
            .access
            .unread_ahead_allowance(self.settings.unread_ahead_percent);
        worth.clamp(least.min(cap), cap).min(allowance)
    }

    /// The chunk `step` places from `piece` in the chunk table, if it is in
    /// the same blob.
    fn blob_neighbour(&self, piece: &Piece, step: i32) -> Option<Piece> {
        let rel = piece
            .rel
            .checked_add_signed(step)
            .filter(|&rel| rel < piece.blob.chunk_count)?;
        let index = piece.blob.first_chunk.0.checked_add(rel)?;
        let rec = self.bootstrap.chunk(ChunkIndex(index)).ok()?;
        Some(Piece {
            rec,
            blob_index: rec.blob,
            blob: piece.blob,
            rel,
        })
    }

    /// The file chunk index after `last` from which the file's chunks are no
    /// longer among those `job` fetches.
    pub(super) fn covered_to(
        &self,
        ino: Ino,
        file_size: u64,
        chunk_count: u32,
        last: u32,
        job: &FetchJob,
    ) -> u32 {
        let mut idx = last + 1;
        while idx < chunk_count
            && self
                .piece(ino, idx, file_size)
                .is_ok_and(|piece| job.covers(&piece))
        {
            idx += 1;
        }
        idx
    }
}
