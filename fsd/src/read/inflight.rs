//! Chunks being fetched right now, so that concurrent readers of one chunk
//! share one fetch, and chunks fetched recently, kept in memory (within a
//! budget) so that a sequential reader takes what readahead brought without
//! going back to the cache file. Keyed by (blob digest, chunk index within the
//! blob), the same key as the cache, so instances that share blobs could share
//! this too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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

/// Completed fetches kept in the map, oldest first, with their sizes, and
/// the sum of those sizes.
type Retained = (VecDeque<(ChunkKey, Arc<Pending>, u64)>, u64);

#[derive(Default)]
pub struct Inflight {
    map: DashMap<ChunkKey, Arc<Pending>>,
    retained: Mutex<Retained>,
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
        if pending.consumed.load(Ordering::SeqCst) {
            self.forget(key, pending);
            return;
        }
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        let (queue, bytes) = &mut *retained;
        queue.push_back((key, Arc::clone(pending), len));
        *bytes += len;
        while *bytes > self.retain_budget {
            let Some((old_key, old, old_len)) = queue.pop_front() else {
                break;
            };
            *bytes -= old_len;
            self.forget(old_key, &old);
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

    /// Stops offering `pending` to new readers (they start a fresh fetch);
    /// readers already waiting on it keep waiting.
    pub fn forget(&self, key: ChunkKey, pending: &Arc<Pending>) {
        self.map
            .remove_if(&key, |_, current| Arc::ptr_eq(current, pending));
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
