//! The API's answers about one instance: which instance a request names,
//! and its counters and access record in the API's shapes.

use lode_common::api::{
    AccessRange, BackendMetrics, CacheMetrics, FopCount, FsMetrics, InstanceAccess,
};

use std::sync::Arc;

use super::state::DaemonState;
use super::Host;
use crate::api::ControlError;
use crate::instance::Instance;
use crate::metrics::Metrics;

impl Host {
    /// Runs `f` on instance `id` (the only one if `None`).
    pub(super) fn with_instance<T>(
        &self,
        id: Option<&str>,
        f: impl FnOnce(&Instance) -> T,
    ) -> Result<T, ControlError> {
        if self.state.get() == DaemonState::Init {
            return Err(ControlError::NotReady("no instance mounted yet".into()));
        }
        let instance = match id {
            Some(id) => self.table.get(id),
            None => match self.table.all().as_slice() {
                [only] => Some(Arc::clone(only)),
                [] => None,
                _ => {
                    return Err(ControlError::InvalidArgument(
                        "query parameter id is required with several instances".into(),
                    ))
                }
            },
        };
        let instance = instance.ok_or_else(|| {
            ControlError::NotFound(format!("no instance {}", id.unwrap_or("mounted")))
        })?;
        Ok(f(&instance))
    }
}

pub(super) fn access(instance: &Instance) -> Result<InstanceAccess, ControlError> {
    let accessed = instance
        .fs
        .fetcher()
        .accessed()
        .map_err(|e| ControlError::Internal(format!("instance {}: {e}", instance.id)))?;
    Ok(InstanceAccess {
        id: instance.id.clone(),
        files: accessed
            .files
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        ranges: accessed
            .ranges
            .iter()
            .map(|(p, bytes)| AccessRange {
                path: String::from_utf8_lossy(p).into_owned(),
                start: bytes.start,
                end: bytes.end,
            })
            .collect(),
        chunks: accessed.chunks,
        chunk_bytes: accessed.chunk_bytes,
    })
}

pub(super) fn fs_metrics(id: &str, m: &Metrics) -> FsMetrics {
    let snapshot = m.snapshot();
    FsMetrics {
        id: id.to_owned(),
        bytes_read: snapshot.bytes_read,
        fops: snapshot
            .fops
            .iter()
            .map(|(name, c)| {
                (
                    (*name).to_owned(),
                    FopCount {
                        count: c.count,
                        errors: c.errors,
                    },
                )
            })
            .collect(),
        read_latency: m.read_latency.snapshot(),
    }
}

pub(super) fn cache_metrics(id: &str, m: &Metrics) -> CacheMetrics {
    let s = m.snapshot();
    CacheMetrics {
        id: id.to_owned(),
        hits: s.cache_hits,
        misses: s.cache_misses,
        inflight_joins: s.inflight_joins,
        prefetch_hits: s.prefetch_hits,
        readahead_requests: s.readahead_requests,
        prefetch_requests: s.prefetch_requests,
        bytes_fetched: s.bytes_fetched,
        ahead_bytes: s.ahead_bytes,
        chunks_cached: s.chunks_verified,
        bytes_cached: s.cache_bytes_written,
        write_errors: s.cache_write_errors,
        digest_errors: s.digest_errors,
        fetch_timeouts: s.fetch_timeouts,
    }
}

pub(super) fn backend_metrics(id: &str, m: &Metrics) -> BackendMetrics {
    let s = m.snapshot();
    BackendMetrics {
        id: id.to_owned(),
        requests: s.backend_requests,
        bytes: s.bytes_fetched,
        errors: s.backend_errors,
        latency: m.backend_latency.snapshot(),
    }
}
