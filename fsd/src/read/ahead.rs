//! Data blob fronts fetched before their image is mounted.
//!
//! The converter puts the chunks of an image's prefetch list at the front of
//! their data blobs and says how long each front is in the manifest, so the
//! snapshotter can ask for the fronts as soon as a pull has the manifest,
//! while the bootstrap is still on its way and before the image's instance
//! exists (`PUT /ahead`). The bytes go into memory, in segments of one range
//! request each. [`AheadBackend`], under every instance's backend, serves a
//! range from the segments that cover it, as they fill, and the instance
//! verifies the chunks as it does any other bytes; ranges they do not cover,
//! or the rest of a range whose segment failed, go to the blob's source.
//!
//! A segment goes once its bytes have all been served, or a minute after it
//! was asked for; at most `fetch.ahead_bytes` are held at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lode_common::format::{BlobRecord, ChunkIndex};
use lode_common::image::BlobFront;
use lode_common::Digest;
use tracing::{info, warn};

use super::backend::{BackendError, BlobBackend, Sink};
use super::workers::set_nice_above_base;
use crate::metrics::Metrics;

/// How long fetched fronts wait for their image's instance to take them.
const KEEP: Duration = Duration::from_secs(60);

/// The fronts fetched ahead, by blob; one per daemon.
pub struct Ahead {
    segments: Mutex<HashMap<Digest, Vec<Arc<Segment>>>>,
    /// Most bytes held at once.
    limit: u64,
    /// How much nicer than the daemon the fetching threads are until an
    /// instance takes from their segment: the pull that asked for the
    /// fronts has work of its own to do on the node.
    nice: i32,
}

/// One range request's bytes, filling.
struct Segment {
    start: u64,
    end: u64,
    filling: Mutex<Filling>,
    changed: Condvar,
    /// An instance takes from it: its thread has the daemon's priority.
    wanted: AtomicBool,
}

#[derive(Default)]
struct Filling {
    /// The bytes in so far, in order from `start`.
    pieces: Vec<Arc<[u8]>>,
    len: u64,
    /// The request ended (all in, or failed after `len` bytes).
    ended: bool,
    /// Bytes handed to readers; the segment goes once all were.
    served: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Segment {
    fn push(&self, piece: &[u8]) {
        let mut f = lock(&self.filling);
        f.pieces.push(piece.into());
        f.len += piece.len() as u64;
        self.changed.notify_all();
    }

    fn end_filling(&self) {
        lock(&self.filling).ended = true;
        self.changed.notify_all();
    }

    /// Hands `sink` the segment's bytes from `from` to `to` as they arrive;
    /// returns how many it had (fewer if the request failed first).
    fn serve(&self, from: u64, to: u64, sink: &mut Sink<'_>) -> u64 {
        self.wanted.store(true, Ordering::Relaxed);
        let mut at = from;
        while at < to {
            let mut f = lock(&self.filling);
            while f.start_of_missing(self.start) <= at && !f.ended {
                f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
            }
            let available = f.start_of_missing(self.start).min(to);
            if available <= at {
                return at - from;
            }
            let slices = f.slices(self.start, at, available);
            drop(f);
            for slice in &slices {
                sink(slice.bytes());
            }
            at = available;
        }
        at - from
    }
}

/// A part of a piece, held without the lock.
struct Slice(Arc<[u8]>, std::ops::Range<usize>);

impl Slice {
    fn bytes(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

impl Filling {
    fn start_of_missing(&self, start: u64) -> u64 {
        start + self.len
    }

    /// The parts of the pieces between blob offsets `from` and `to`.
    fn slices(&self, start: u64, from: u64, to: u64) -> Vec<Slice> {
        let mut out = Vec::new();
        let mut piece_start = start;
        for piece in &self.pieces {
            let piece_end = piece_start + piece.len() as u64;
            if piece_end > from && piece_start < to {
                let a = (from.max(piece_start) - piece_start) as usize;
                let b = (to.min(piece_end) - piece_start) as usize;
                out.push(Slice(Arc::clone(piece), a..b));
            }
            piece_start = piece_end;
        }
        out
    }
}

impl Ahead {
    /// At most `limit` bytes held; fetched `nice` nicer than the daemon
    /// until wanted (a niceness [`usable_nice`] allows).
    ///
    /// [`usable_nice`]: super::workers::usable_nice
    pub fn new(limit: u64, nice: i32) -> Self {
        Self {
            segments: Mutex::default(),
            limit,
            nice,
        }
    }

    fn held(segments: &HashMap<Digest, Vec<Arc<Segment>>>) -> u64 {
        segments.values().flatten().map(|s| s.end - s.start).sum()
    }

    /// Fetches `fronts` from `backend` in the background, in requests of
    /// at most `request_bytes`, `threads` at a time; ranges already held are
    /// not asked again. The segments go after [`KEEP`] (on `runtime`).
    pub fn fetch(
        self: &Arc<Self>,
        backend: Arc<dyn BlobBackend>,
        fronts: &[BlobFront],
        request_bytes: u64,
        threads: usize,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let mut queue = VecDeque::new();
        {
            let mut segments = lock(&self.segments);
            let mut room = self.limit.saturating_sub(Self::held(&segments));
            for front in fronts {
                let held = segments.entry(front.digest).or_default();
                let mut start = 0;
                while start < front.bytes && room > 0 {
                    let end = (start + request_bytes.max(1))
                        .min(front.bytes)
                        .min(start + room);
                    if !held.iter().any(|s| s.start < end && start < s.end) {
                        let segment = Arc::new(Segment {
                            start,
                            end,
                            filling: Mutex::default(),
                            changed: Condvar::new(),
                            wanted: AtomicBool::new(false),
                        });
                        held.push(Arc::clone(&segment));
                        queue.push_back((blob_record(front), segment));
                        room -= end - start;
                    }
                    start = end;
                }
            }
            segments.retain(|_, held| !held.is_empty());
        }
        if queue.is_empty() {
            return Ok(());
        }
        // Weak: a segment served in full goes at once, bytes and all, not
        // when its time is up.
        let asked: Vec<(Digest, Weak<Segment>)> = queue
            .iter()
            .map(|(b, s)| (b.digest, Arc::downgrade(s)))
            .collect();
        info!(
            requests = queue.len(),
            bytes = queue.iter().map(|(_, s)| s.end - s.start).sum::<u64>(),
            "fetching data blob fronts ahead"
        );
        let threads = threads.clamp(1, queue.len());
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..threads {
            let (queue, backend, nice) = (Arc::clone(&queue), Arc::clone(&backend), self.nice);
            std::thread::Builder::new()
                .name("lode-ahead".into())
                .spawn(move || fill(&queue, &*backend, nice))?;
        }
        let this = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep(KEEP).await;
            for (digest, segment) in asked {
                if let Some(segment) = segment.upgrade() {
                    this.forget(&digest, &segment);
                }
            }
        });
        Ok(())
    }

    /// Hands `sink` what the segments hold of `len` bytes at `offset` of
    /// `blob`, waiting for them to arrive; returns how many bytes from
    /// `offset` it handed (0 if no segment starts the range).
    fn serve(&self, blob: &BlobRecord, offset: u64, len: u64, sink: &mut Sink<'_>) -> u64 {
        let end = offset.saturating_add(len);
        let mut chain = Vec::new();
        {
            let segments = lock(&self.segments);
            let Some(held) = segments.get(&blob.digest) else {
                return 0;
            };
            let mut at = offset;
            while at < end {
                let Some(next) = held.iter().find(|s| s.start <= at && at < s.end) else {
                    break;
                };
                chain.push(Arc::clone(next));
                at = next.end;
            }
        }
        let mut at = offset;
        for segment in chain {
            let to = segment.end.min(end);
            let got = segment.serve(at, to, sink);
            let all_served = {
                let mut f = lock(&segment.filling);
                f.served += got;
                f.served >= segment.end - segment.start
            };
            if all_served {
                self.forget(&blob.digest, &segment);
            }
            at += got;
            if at < to {
                break;
            }
        }
        at - offset
    }

    fn forget(&self, digest: &Digest, segment: &Arc<Segment>) {
        let mut segments = lock(&self.segments);
        if let Some(held) = segments.get_mut(digest) {
            held.retain(|s| !Arc::ptr_eq(s, segment));
            if held.is_empty() {
                segments.remove(digest);
            }
        }
    }
}

/// What a range request needs to know of a blob from its manifest entry.
fn blob_record(front: &BlobFront) -> BlobRecord {
    BlobRecord {
        digest: front.digest,
        compressed_size: front.size,
        uncompressed_size: 0,
        first_chunk: ChunkIndex(0),
        chunk_count: 0,
    }
}

/// A fetch thread: runs queued requests until none is left, `nice` nicer
/// than the daemon while no instance takes from its segment.
fn fill(queue: &Mutex<VecDeque<(BlobRecord, Arc<Segment>)>>, backend: &dyn BlobBackend, nice: i32) {
    /// Ends the segment's filling however the request ends, so that no
    /// reader waits for it forever.
    struct Ends<'a>(&'a Segment);
    impl Drop for Ends<'_> {
        fn drop(&mut self) {
            self.0.end_filling();
        }
    }
    loop {
        // Not in the loop's head: the queue's lock would be held throughout.
        let next = lock(queue).pop_front();
        let Some((blob, segment)) = next else { return };
        let _ends = Ends(&segment);
        let len = segment.end - segment.start;
        set_nice_above_base(if segment.wanted.load(Ordering::Relaxed) {
            0
        } else {
            nice
        });
        let result = backend.read_range(&blob, segment.start, len, &mut |piece| {
            segment.push(piece);
            if segment.wanted.load(Ordering::Relaxed) {
                set_nice_above_base(0);
            }
        });
        if let Err(error) = result {
            warn!(blob = %blob.digest, offset = segment.start, len, %error, "fetching a data blob front ahead failed; its image fetches it itself");
        }
    }
}

/// An instance's backend: ranges the fronts fetched ahead hold come from
/// them, the rest from the blob's source.
pub struct AheadBackend {
    pub ahead: Arc<Ahead>,
    pub inner: Arc<dyn BlobBackend>,
    /// The instance's: counts the bytes served from fronts.
    pub metrics: Arc<Metrics>,
}

impl BlobBackend for AheadBackend {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        let served = self.ahead.serve(blob, offset, len, sink);
        Metrics::add(&self.metrics.ahead_bytes, served);
        if served == len {
            return Ok(());
        }
        self.inner
            .read_range(blob, offset + served, len - served, sink)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
#[path = "ahead_tests.rs"]
mod tests;
