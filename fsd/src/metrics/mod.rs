//! The daemon's counters, in one struct of atomics shared by every component.
//!
//! Counters only go up; readers take a [`MetricsSnapshot`] (serialisable) and
//! compute rates themselves.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub mod latency;

/// The FUSE operations that are counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fop {
    Lookup,
    Getattr,
    Readdir,
    Open,
    Read,
    Release,
    Readlink,
    Getxattr,
    Listxattr,
    Statfs,
    Access,
    /// Any modifying operation (answered with EROFS).
    Write,
}

impl Fop {
    pub const ALL: [Fop; 12] = [
        Fop::Lookup,
        Fop::Getattr,
        Fop::Readdir,
        Fop::Open,
        Fop::Read,
        Fop::Release,
        Fop::Readlink,
        Fop::Getxattr,
        Fop::Listxattr,
        Fop::Statfs,
        Fop::Access,
        Fop::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fop::Lookup => "lookup",
            Fop::Getattr => "getattr",
            Fop::Readdir => "readdir",
            Fop::Open => "open",
            Fop::Read => "read",
            Fop::Release => "release",
            Fop::Readlink => "readlink",
            Fop::Getxattr => "getxattr",
            Fop::Listxattr => "listxattr",
            Fop::Statfs => "statfs",
            Fop::Access => "access",
            Fop::Write => "write",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

const FOPS: usize = Fop::ALL.len();

/// Every counter of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    /// File bytes returned to FUSE reads.
    pub bytes_read: AtomicU64,
    /// Chunks a read found in the cache.
    pub cache_hits: AtomicU64,
    /// Chunks a read found nowhere and started fetching. Every chunk a read
    /// touches counts once: as a cache hit, a prefetch hit, a join or a miss.
    pub cache_misses: AtomicU64,
    /// Chunks a read joined while another read or readahead was fetching them.
    pub inflight_joins: AtomicU64,
    /// Chunks a read took from a completed fetch kept in memory (readahead).
    pub prefetch_hits: AtomicU64,
    /// Range requests sent to the blob source.
    pub backend_requests: AtomicU64,
    /// Range requests that ended, either way. Chunks reach readers while
    /// their request streams on, so `backend_requests` minus this is the
    /// number still in progress.
    pub backend_requests_done: AtomicU64,
    /// Range requests that failed (after the client's own retries).
    pub backend_errors: AtomicU64,
    /// Range requests started by background readahead (also in `backend_requests`).
    pub readahead_requests: AtomicU64,
    /// Range requests for the image's prefetch list (also in `backend_requests`).
    pub prefetch_requests: AtomicU64,
    /// Stored (compressed) bytes received from the blob source.
    pub bytes_fetched: AtomicU64,
    /// Of those, the bytes of blob fronts fetched before the image was
    /// mounted (see `read::ahead`).
    pub ahead_bytes: AtomicU64,
    /// Chunks decompressed and verified.
    pub chunks_verified: AtomicU64,
    /// Chunks whose content did not match their digest or size (never cached or served).
    pub digest_errors: AtomicU64,
    /// Reads that gave up waiting for a fetch at the deadline.
    pub fetch_timeouts: AtomicU64,
    /// Chunks that could not be written to the cache (they were still served).
    pub cache_write_errors: AtomicU64,
    /// Chunk bytes written to the cache.
    pub cache_bytes_written: AtomicU64,
    /// Time to answer FUSE reads.
    pub read_latency: latency::LatencyHistogram,
    /// Time of range requests to the blob source.
    pub backend_latency: latency::LatencyHistogram,
    fop_count: [AtomicU64; FOPS],
    fop_errors: [AtomicU64; FOPS],
}

/// A point-in-time copy of [`Metrics`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub bytes_read: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub inflight_joins: u64,
    pub prefetch_hits: u64,
    pub backend_requests: u64,
    pub backend_requests_done: u64,
    pub backend_errors: u64,
    pub readahead_requests: u64,
    pub prefetch_requests: u64,
    pub bytes_fetched: u64,
    pub ahead_bytes: u64,
    pub chunks_verified: u64,
    pub digest_errors: u64,
    pub fetch_timeouts: u64,
    pub cache_write_errors: u64,
    pub cache_bytes_written: u64,
    /// Operation name → count, for operations seen at least once.
    pub fops: std::collections::BTreeMap<&'static str, FopSnapshot>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FopSnapshot {
    pub count: u64,
    pub errors: u64,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to `counter` (relaxed: counters order nothing).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn fop(&self, fop: Fop, ok: bool) {
        self.fop_count[fop.slot()].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.fop_errors[fop.slot()].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let fops = Fop::ALL
            .iter()
            .filter_map(|fop| {
                let count = get(&self.fop_count[fop.slot()]);
                (count > 0).then(|| {
                    let errors = get(&self.fop_errors[fop.slot()]);
                    (fop.name(), FopSnapshot { count, errors })
                })
            })
            .collect();
        MetricsSnapshot {
            bytes_read: get(&self.bytes_read),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            inflight_joins: get(&self.inflight_joins),
            prefetch_hits: get(&self.prefetch_hits),
            backend_requests: get(&self.backend_requests),
            backend_requests_done: get(&self.backend_requests_done),
            backend_errors: get(&self.backend_errors),
            readahead_requests: get(&self.readahead_requests),
            prefetch_requests: get(&self.prefetch_requests),
            bytes_fetched: get(&self.bytes_fetched),
            ahead_bytes: get(&self.ahead_bytes),
            chunks_verified: get(&self.chunks_verified),
            digest_errors: get(&self.digest_errors),
            fetch_timeouts: get(&self.fetch_timeouts),
            cache_write_errors: get(&self.cache_write_errors),
            cache_bytes_written: get(&self.cache_bytes_written),
            fops,
        }
    }

    /// The snapshot as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fop_slots_match_the_list() {
        for (i, fop) in Fop::ALL.iter().enumerate() {
            assert_eq!(fop.slot(), i, "{fop:?}");
        }
    }

    #[test]
    fn snapshot_reports_counters_and_seen_fops() {
        let m = Metrics::new();
        Metrics::add(&m.bytes_read, 10);
        Metrics::add(&m.digest_errors, 1);
        m.fop(Fop::Read, true);
        m.fop(Fop::Read, false);
        let s = m.snapshot();
        assert_eq!(s.bytes_read, 10);
        assert_eq!(s.digest_errors, 1);
        assert_eq!(
            s.fops["read"],
            FopSnapshot {
                count: 2,
                errors: 1
            }
        );
        assert!(!s.fops.contains_key("lookup"));
        let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(json["fops"]["read"]["errors"], 1);
    }
}
