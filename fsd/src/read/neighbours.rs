//! Growing a demand fetch over the chunks around it in its blob, whichever
//! files they belong to.

use lode_common::format::{ChunkIndex, Ino};

use super::{Fetcher, Piece};
use crate::read::job::FetchJob;

impl Fetcher {
    /// Adds the chunks that follow the job's last one in its blob while they
    /// are missing, not in flight, adjacent and within the merge limit; then,
    /// with what is left of the limit, the chunks before its first one (a
    /// walker that visits a directory backwards finds its next files there).
    /// They may belong to any file; a reader of one joins this fetch.
    pub(super) fn extend_job(&self, job: &mut FetchJob) {
        let limit = self.settings.merge_limit;
        let wanted = |piece: &Piece, len: u64| {
            len + u64::from(piece.rec.compressed_size) <= limit && !job.cache.is_present(piece.rel)
        };
        let mut len: u64 = job
            .chunks
            .iter()
            .map(|(p, _)| u64::from(p.rec.compressed_size))
            .sum();
        let mut after = Vec::new();
        let mut last = *job.last();
        while let Some(next) = self.blob_neighbour(&last, 1) {
            if !last.adjacent(&next) || !wanted(&next, len) {
                break;
            }
            let Some(pending) = self.ctx.inflight.try_lead(next.key()) else {
                break;
            };
            len += u64::from(next.rec.compressed_size);
            after.push((next, pending));
            last = next;
        }
        let mut before = Vec::new();
        let mut first = job.chunks[0].0;
        while let Some(prev) = self.blob_neighbour(&first, -1) {
            if !prev.adjacent(&first) || !wanted(&prev, len) {
                break;
            }
            let Some(pending) = self.ctx.inflight.try_lead(prev.key()) else {
                break;
            };
            len += u64::from(prev.rec.compressed_size);
            before.push((prev, pending));
            first = prev;
        }
        before.reverse();
        before.append(&mut job.chunks);
        before.append(&mut after);
        job.chunks = before;
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
