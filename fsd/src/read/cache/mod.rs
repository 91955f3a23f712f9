//! The persistent chunk cache: verified, decompressed chunks kept on disk across
//! restarts and shared by every daemon that uses the same directory.
//!
//! Per blob there are two files, named by the blob digest's hex:
//! - `<hex>`: the blob's chunks decompressed, each at its `uncompressed_offset`
//!   (a sparse file: only fetched chunks occupy space);
//! - `<hex>.map`: a header identifying the blob's chunk layout, then one byte
//!   per chunk of the blob, 1 when the chunk's bytes are durable in the data file.
//!
//! A chunk is readable by this process as soon as its bytes are written
//! (in-memory state), but its map byte is written only after a flush has
//! fdatasync'ed the data file, so after a crash the map never claims bytes
//! that did not reach the disk. Several processes may write the same chunk:
//! they write identical (verified) bytes. A chunk another process made durable
//! is found through its map byte on a miss.
//!
//! Trimming the cache removes a blob's files even while daemons use them
//! (see `lode-snapshotter`'s cache limit): processes that still hold the
//! old files keep reading correct bytes from them, notice the removal on
//! their next [`ChunkCache::maintain`] and let the files go, so that their
//! space is freed; the next read of the blob starts a fresh cache. The map
//! names its data file ([`map`]), so a map never vouches for chunks of
//! a data file it was not written for.
//!
//! Chunks whose offset and length are page-aligned are written with O_DIRECT
//! when the filesystem allows: the kernel already caches file data above FUSE,
//! and a second copy in the cache file's page cache would cost memory and a
//! copy into freshly allocated pages for every byte fetched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lode_common::format::{BlobRecord, ChunkRecord};
use lode_common::Digest;
use tracing::{info, warn};

use crate::log_budget::LogBudget;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path} (blob {digest}): {what}: {source}")]
    Io {
        path: PathBuf,
        digest: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cache directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest}: {reason}")]
    Layout { digest: String, reason: String },
}

/// All cached blobs under one directory.
pub struct ChunkCache {
    dir: PathBuf,
    blobs: Mutex<HashMap<Digest, Arc<BlobCache>>>,
    direct_io: bool,
}

impl ChunkCache {
    /// Opens (creating it if needed) the cache directory.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            blobs: Mutex::new(HashMap::new()),
            direct_io: true,
        })
    }

    /// Whether aligned chunks are written with O_DIRECT (default on; blobs
    /// opened before the change keep their setting).
    pub fn with_direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }

    /// The cache of one blob; `chunks` is the blob's slice of the chunk table
    /// (`blob.chunk_count` records, in order). Opened once per process.
    pub fn blob(
        &self,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
    ) -> Result<Arc<BlobCache>, CacheError> {
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = blobs.get(&blob.digest).filter(|b| !b.is_evicted()) {
            return Ok(Arc::clone(existing));
        }
        let opened = Arc::new(BlobCache::open(&self.dir, blob, chunks, self.direct_io)?);
        blobs.insert(blob.digest, Arc::clone(&opened));
        Ok(opened)
    }

    /// The blobs open now (the map is not held while they are worked on).
    fn open_blobs(&self) -> Vec<Arc<BlobCache>> {
        let blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.values().cloned().collect()
    }

    /// Makes every written chunk durable and records it in its map. Every blob
    /// is attempted; the first error is returned.
    pub fn flush(&self) -> Result<(), CacheError> {
        let mut first_err = None;
        for blob in self.open_blobs() {
            if let Err(e) = blob.flush() {
                warn!(error = %e, "cache flush failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Lets go of blobs whose files were removed or replaced (the cache was
    /// trimmed), and marks the files of blobs used since the last call as
    /// recently used (the map file's modification time), which is what the
    /// trimming goes by. Called periodically. Returns the blobs let go.
    pub fn maintain(&self) -> usize {
        let mut gone = 0;
        for blob in self.open_blobs() {
            if blob.files_are_current() {
                blob.touch_if_used();
                continue;
            }
            blob.mark_evicted();
            let mut map = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
            if map
                .get(blob.digest())
                .is_some_and(|b| Arc::ptr_eq(b, &blob))
            {
                map.remove(blob.digest());
            }
            info!(blob = %blob.digest(), path = %blob.data_path().display(), "cache files of the blob were removed; letting them go (its chunks are fetched again when read)");
            gone += 1;
        }
        gone
    }
}

/// Logs chunks that could not be cached: the first failure at once, then
/// at most one line per [`WriteFailureLog::EVERY`] with how many failed
/// since, since a full disk fails every chunk. (`cache_write_errors`
/// counts them all.)
pub(crate) struct WriteFailureLog {
    budget: LogBudget,
}

impl Default for WriteFailureLog {
    fn default() -> Self {
        Self {
            budget: LogBudget::new(1, Self::EVERY),
        }
    }
}

impl WriteFailureLog {
    pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    /// Counts one failure; logs it if a line is due. Returns whether it did.
    pub(crate) fn failed(&self, error: &CacheError) -> bool {
        let Some(suppressed) = self.budget.admit() else {
            return false;
        };
        warn!(error = %error, failed_chunks = suppressed + 1, "cannot cache chunks; serving them uncached (still verified); the next such line comes a minute later at the earliest");
        true
    }
}

mod blob;
mod map;

pub use blob::BlobCache;

#[cfg(test)]
mod tests;
