//! Chunks being fetched right now, so that concurrent readers of one chunk
//! share one fetch. Keyed by (blob digest, chunk index within the blob), the
//! same key as the cache, so instances that share blobs could share this too.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use lode_common::Digest;

use crate::fetch::FetchError;

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
}

impl Pending {
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

#[derive(Default)]
pub struct Inflight {
    map: DashMap<ChunkKey, Arc<Pending>>,
}

impl Inflight {
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
