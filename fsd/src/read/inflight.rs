//! Chunks being fetched right now, so that concurrent readers of one chunk
//! share one fetch, and chunks fetched recently, kept in memory (within a
//! budget) so that a sequential reader takes what readahead brought without
//! going back to the cache file. Keyed by (blob digest, chunk index within the
//! blob), the same key as the cache, so instances that share blobs could share
//! this too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use lode_common::Digest;

use crate::read::fetch::FetchError;

pub type ChunkResult = Result<Bytes, FetchError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub blob: Digest,
    /// Index of the chunk within its blob.
    pub rel: u32,
}

/// The outcome of one chunk's fetch, delivered once to every waiter.
#[derive(Default)]
pub struct Pending {
    slot: Mutex<Option<ChunkResult>>,
    done: Condvar,
    /// The fetch is over for the cache too: the chunk is stored (or could not
    /// be), so readers no longer need this entry to avoid a second fetch.
    settled: AtomicBool,
    /// A reader has read the chunk to its end.
    consumed: AtomicBool,
    /// A reader waits (or waited) for the outcome.
    wanted: AtomicBool,
    /// Bytes this fetch counts against the retain budget while it is kept
    /// for readers (0 when it is not kept).
    retained: AtomicU64,
}

impl Pending {
    /// Marks the fetch settled (see the field). SeqCst with `consume`: of a
    /// settling job and a consuming reader, at least one sees the other's
    /// flag, so a consumed chunk is never kept by mistake.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::SeqCst);
    }

    /// Records that a reader read the chunk to its end; returns whether the
    /// fetch is settled, i.e. whether the reader may drop the entry.
    pub fn consume(&self) -> bool {
        self.consumed.store(true, Ordering::SeqCst);
        self.settled.load(Ordering::SeqCst)
    }

    /// Records that a reader is going to wait for the outcome; returns
    /// whether it is the first.
    pub fn want(&self) -> bool {
        !self.wanted.swap(true, Ordering::Relaxed)
    }

    /// Whether a reader waits (or waited) for the outcome.
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// Whether the outcome is known.
    pub fn is_done(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Records the outcome unless one is already recorded; wakes all waiters.
    pub fn complete(&self, result: ChunkResult) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(result);
            self.done.notify_all();
        }
    }

    /// Waits for the outcome until `deadline`; `None` if it has not come by then.
    pub fn wait(&self, deadline: Instant) -> Option<ChunkResult> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(result) = slot.as_ref() {
                return Some(result.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            slot = self
                .done
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Completed fetches kept for readers, oldest first. Only the map holds
/// them: once a reader has taken one (or it is forgotten otherwise) its
/// memory goes at once and its entry here is stale, skipped and pruned.
#[derive(Default)]
struct Retained {
    queue: VecDeque<(ChunkKey, Weak<Pending>)>,
    /// Queue length after the last pruning of stale entries.
    pruned_len: usize,
}

#[derive(Default)]
pub struct Inflight {
    map: DashMap<ChunkKey, Arc<Pending>>,
    retained: Mutex<Retained>,
    /// Sum of the sizes of the fetches kept for readers.
    retained_bytes: AtomicU64,
    /// Bytes of completed fetches kept for readers; older ones are dropped.
    retain_budget: u64,
}

impl Inflight {
    pub fn new(retain_budget: u64) -> Self {
        Self {
            retain_budget,
            ..Self::default()
        }
    }

    /// The fetch of `key` in flight or kept, if any.
    pub fn get(&self, key: &ChunkKey) -> Option<Arc<Pending>> {
        self.map.get(key).map(|p| Arc::clone(p.value()))
    }

    /// Keeps the completed fetch of `key` (`len` bytes) for readers until it
    /// is read or the budget pushes it out.
    pub fn retain(&self, key: ChunkKey, pending: &Arc<Pending>, len: u64) {
        if pending.consumed.load(Ordering::SeqCst) || len == 0 {
            self.forget(key, pending);
            return;
        }
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        pending.retained.store(len, Ordering::SeqCst);
        self.retained_bytes.fetch_add(len, Ordering::SeqCst);
        // A reader may have taken it meanwhile (and found nothing to release).
        if pending.consumed.load(Ordering::SeqCst) {
            self.forget(key, pending);
            return;
        }
        retained.queue.push_back((key, Arc::downgrade(pending)));
        let kept = |old: &Weak<Pending>| {
            old.upgrade()
                .is_some_and(|p| p.retained.load(Ordering::SeqCst) > 0)
        };
        while self.retained_bytes.load(Ordering::SeqCst) > self.retain_budget {
            let Some((old_key, old)) = retained.queue.pop_front() else {
                break;
            };
            if let Some(old) = old.upgrade() {
                self.forget(old_key, &old);
            }
        }
        while retained.queue.front().is_some_and(|(_, old)| !kept(old)) {
            retained.queue.pop_front();
        }
        if retained.queue.len() > 2 * retained.pruned_len.max(512) {
            retained.queue.retain(|(_, old)| kept(old));
            retained.pruned_len = retained.queue.len();
        }
    }

    /// The fetch of `key` in flight, or a new one; `true` when the caller
    /// created it and so must make sure a job completes it.
    pub fn join_or_lead(&self, key: ChunkKey) -> (Arc<Pending>, bool) {
        match self.map.entry(key) {
            Entry::Occupied(e) => (Arc::clone(e.get()), false),
            Entry::Vacant(e) => {
                let pending = Arc::new(Pending::default());
                e.insert(Arc::clone(&pending));
                (pending, true)
            }
        }
    }

    /// A new fetch of `key`, or `None` if one is in flight already.
    pub fn try_lead(&self, key: ChunkKey) -> Option<Arc<Pending>> {
        match self.join_or_lead(key) {
            (pending, true) => Some(pending),
            (_, false) => None,
        }
    }

    /// Completes `pending` and stops offering it to new readers.
    pub fn finish(&self, key: ChunkKey, pending: &Arc<Pending>, result: ChunkResult) {
        pending.complete(result);
        self.forget(key, pending);
    }

    /// Stops offering `pending` to new readers (they start a fresh fetch)
    /// and stops keeping it; readers already waiting on it keep waiting.
    pub fn forget(&self, key: ChunkKey, pending: &Arc<Pending>) {
        self.map
            .remove_if(&key, |_, current| Arc::ptr_eq(current, pending));
        let len = pending.retained.swap(0, Ordering::SeqCst);
        if len > 0 {
            self.retained_bytes.fetch_sub(len, Ordering::SeqCst);
        }
    }

    /// Bytes of completed fetches kept for readers.
    #[cfg(test)]
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes.load(Ordering::SeqCst)
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.map.contains_key(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(rel: u32) -> ChunkKey {
        ChunkKey {
            blob: Digest::of(b"blob"),
            rel,
        }
    }

    #[test]
    fn second_caller_joins_the_first() {
        let inflight = Inflight::default();
        let (a, lead_a) = inflight.join_or_lead(key(1));
        let (b, lead_b) = inflight.join_or_lead(key(1));
        assert!(lead_a && !lead_b);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(inflight.try_lead(key(1)).is_none());
        inflight.finish(key(1), &a, Ok(Bytes::from_static(b"x")));
        assert!(!inflight.contains(&key(1)));
        assert_eq!(
            b.wait(Instant::now()).unwrap().unwrap(),
            Bytes::from_static(b"x")
        );
    }

    #[test]
    fn forgetting_an_old_fetch_keeps_a_newer_one() {
        let inflight = Inflight::default();
        let old = inflight.try_lead(key(2)).unwrap();
        inflight.forget(key(2), &old);
        let new = inflight.try_lead(key(2)).unwrap();
        inflight.finish(key(2), &old, Ok(Bytes::new()));
        assert!(
            inflight.contains(&key(2)),
            "the old fetch removed the new one"
        );
        inflight.forget(key(2), &new);
        assert_eq!(inflight.len(), 0);
    }

    #[test]
    fn retained_fetches_stay_within_the_budget() {
        let inflight = Inflight::new(10);
        let a = inflight.try_lead(key(1)).unwrap();
        let b = inflight.try_lead(key(2)).unwrap();
        inflight.retain(key(1), &a, 6);
        assert!(inflight.get(&key(1)).is_some());
        inflight.retain(key(2), &b, 6);
        assert!(
            inflight.get(&key(1)).is_none(),
            "the oldest was not dropped"
        );
        assert!(Arc::ptr_eq(&inflight.get(&key(2)).unwrap(), &b));
        // A chunk a reader took goes at once, and stops counting.
        let c = inflight.try_lead(key(3)).unwrap();
        inflight.retain(key(3), &c, 3);
        assert_eq!(inflight.retained_bytes(), 9);
        let weak = Arc::downgrade(&c);
        assert!(!c.consume(), "not settled");
        inflight.forget(key(3), &c);
        drop(c);
        assert!(
            weak.upgrade().is_none(),
            "memory still held after it was read"
        );
        assert_eq!(inflight.retained_bytes(), 6);
        // Many chunks taken one after another leave no stale entries behind.
        for rel in 10..5_000 {
            let p = inflight.try_lead(key(rel)).unwrap();
            inflight.retain(key(rel), &p, 1);
            inflight.forget(key(rel), &p);
        }
        assert_eq!(inflight.retained_bytes(), 6);
        assert!(inflight.retained.lock().unwrap().queue.len() <= 1_024);
        assert!(
            Arc::ptr_eq(&inflight.get(&key(2)).unwrap(), &b),
            "still kept"
        );
        // A zero budget keeps nothing.
        let none = Inflight::new(0);
        let c = none.try_lead(key(3)).unwrap();
        none.retain(key(3), &c, 1);
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn wait_returns_none_at_the_deadline_and_first_result_wins() {
        let pending = Pending::default();
        let start = Instant::now();
        assert!(pending.wait(start + Duration::from_millis(20)).is_none());
        assert!(start.elapsed() >= Duration::from_millis(20));
        pending.complete(Ok(Bytes::from_static(b"first")));
        pending.complete(Ok(Bytes::from_static(b"second")));
        assert_eq!(
            pending.wait(start).unwrap().unwrap(),
            Bytes::from_static(b"first")
        );
    }
}
