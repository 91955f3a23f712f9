//! Lock-free latency histograms and the table of FUSE requests in flight,
//! both cheap enough for every request of the read path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Bucket upper bounds in microseconds; a last bucket takes the rest.
pub const BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BOUNDS_US.len() + 1],
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let slot = BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BOUNDS_US.len());
        if let Some(c) = self.counts.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> lode_common::api::Histogram {
        lode_common::api::Histogram {
            bounds_us: BOUNDS_US.to_vec(),
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// FUSE requests being answered: request id → (operation, inode, start).
#[derive(Debug, Default)]
pub struct InflightOps {
    ops: DashMap<u64, (&'static str, u64, Instant)>,
}

/// Removes its request from the table when the answer is sent (or on unwind).
pub struct InflightGuard<'a> {
    table: &'a InflightOps,
    unique: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.table.ops.remove(&self.unique);
    }
}

impl InflightOps {
    /// Tracks request `unique` (the kernel's id, unique while in flight).
    pub fn enter(&self, unique: u64, op: &'static str, ino: u64) -> InflightGuard<'_> {
        self.ops.insert(unique, (op, ino, Instant::now()));
        InflightGuard {
            table: self,
            unique,
        }
    }

    /// The requests in flight, oldest first.
    pub fn snapshot(&self) -> Vec<lode_common::api::InflightOp> {
        let now = Instant::now();
        let mut ops: Vec<_> = self
            .ops
            .iter()
            .map(|e| {
                let (op, inode, start) = *e.value();
                lode_common::api::InflightOp {
                    op: op.to_owned(),
                    inode,
                    age_ms: u64::try_from(now.duration_since(start).as_millis())
                        .unwrap_or(u64::MAX),
                }
            })
            .collect();
        ops.sort_by_key(|op| std::cmp::Reverse(op.age_ms));
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_micros(51));
        h.record(Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.counts.len(), s.bounds_us.len() + 1);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[BOUNDS_US.len()], 1);
        assert_eq!(s.counts.iter().sum::<u64>(), 3);
    }

    #[test]
    fn inflight_entry_lives_as_long_as_its_guard() {
        let t = InflightOps::default();
        let g = t.enter(7, "read", 42);
        let s = t.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].op.as_str(), s[0].inode), ("read", 42));
        drop(g);
        assert!(t.snapshot().is_empty());
    }
}
