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
//! Chunks whose offset and length are page-aligned are written with O_DIRECT
//! when the filesystem allows: the kernel already caches file data above FUSE,
//! and a second copy in the cache file's page cache would cost memory and a
//! copy into freshly allocated pages for every byte fetched.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use lode_common::format::{BlobRecord, ChunkRecord};
use lode_common::Digest;
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::read::pools::DIRECT_ALIGN;

const MAP_MAGIC: &[u8; 8] = b"LODEMAP1";
/// magic (8) + chunk count (4) + reserved (4) + uncompressed size (8) + layout hash (32) + pad.
const MAP_HEADER_LEN: u64 = 64;

const ABSENT: u8 = 0;
/// Written to the data file, not yet fdatasync'ed.
const WRITTEN: u8 = 1;
/// Fdatasync'ed and recorded in the map file.
const DURABLE: u8 = 2;

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
        if let Some(existing) = blobs.get(&blob.digest) {
            return Ok(Arc::clone(existing));
        }
        let opened = Arc::new(BlobCache::open(&self.dir, blob, chunks, self.direct_io)?);
        blobs.insert(blob.digest, Arc::clone(&opened));
        Ok(opened)
    }

    /// Makes every written chunk durable and records it in its map. Every blob
    /// is attempted; the first error is returned.
    pub fn flush(&self) -> Result<(), CacheError> {
        let blobs: Vec<_> = {
            let map = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        let mut first_err = None;
        for blob in blobs {
            if let Err(e) = blob.flush() {
                warn!(error = %e, "cache flush failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The cached chunks of one blob.
pub struct BlobCache {
    digest: Digest,
    data_path: PathBuf,
    map_path: PathBuf,
    data: File,
    /// The data file opened with O_DIRECT, for aligned chunks.
    direct: Option<File>,
    /// Cleared when the filesystem refuses a direct write.
    direct_ok: AtomicBool,
    map: File,
    state: Box<[AtomicU8]>,
    /// Chunks in state WRITTEN, waiting for the next flush.
    dirty: Mutex<Vec<u32>>,
    /// Serialises flushes so that a map byte is never written before the
    /// fdatasync covering its chunk has returned.
    flushing: Mutex<()>,
    /// Serialises this process's buffered writes to the data file: the
    /// filesystem takes the inode lock for each anyway, and waiting here
    /// sleeps where contending for that lock spins. Direct writes wait for
    /// the disk and are not serialised here.
    writing: Mutex<()>,
}

impl BlobCache {
    fn open(
        dir: &Path,
        blob: &BlobRecord,
        chunks: &[ChunkRecord],
        direct_io: bool,
    ) -> Result<Self, CacheError> {
        if chunks.len() != blob.chunk_count as usize {
            return Err(CacheError::Layout {
                digest: blob.digest.to_string(),
                reason: format!(
                    "{} chunk records for {} chunks",
                    chunks.len(),
                    blob.chunk_count
                ),
            });
        }
        let hex = blob.digest.hex();
        let data_path = dir.join(&hex);
        let map_path = dir.join(format!("{hex}.map"));
        let io = |path: &Path, what, source| CacheError::Io {
            path: path.to_path_buf(),
            digest: blob.digest.to_string(),
            what,
            source,
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| io(&data_path, "open data file", e))?;
        // Not every filesystem supports O_DIRECT (tmpfs before 6.6); then
        // every chunk goes through the page cache.
        let direct = if direct_io {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&data_path)
                .map_err(|e| debug!(path = %data_path.display(), error = %e, "no O_DIRECT for the cache"))
                .ok()
        } else {
            None
        };
        let header = map_header(blob, chunks);
        let map = open_map(&map_path, &header, chunks.len())
            .map_err(|e| io(&map_path, "open map file", e))?;
        let data_len = data
            .metadata()
            .map_err(|e| io(&data_path, "stat data file", e))?
            .len();

        let cache = Self {
            digest: blob.digest,
            data_path,
            map_path,
            data,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            map,
            state: (0..chunks.len()).map(|_| AtomicU8::new(ABSENT)).collect(),
            dirty: Mutex::new(Vec::new()),
            flushing: Mutex::new(()),
            writing: Mutex::new(()),
        };
        cache.load_map(&header, chunks, data_len)?;
        Ok(cache)
    }

    /// Loads the presence bytes; a map that does not describe this layout, or
    /// holds anything but 0/1, is reset to empty.
    fn load_map(
        &self,
        header: &[u8],
        chunks: &[ChunkRecord],
        data_len: u64,
    ) -> Result<(), CacheError> {
        let expected_len = MAP_HEADER_LEN + chunks.len() as u64;
        let mut content = vec![0u8; expected_len as usize];
        let actual_len = self
            .map
            .metadata()
            .map_err(|e| self.io_err(true, "stat map file", e))?
            .len();
        let mut problem = None;
        if actual_len != expected_len {
            problem = Some(format!("size {actual_len}, expected {expected_len}"));
        } else if let Err(e) = self.map.read_exact_at(&mut content, 0) {
            problem = Some(format!("unreadable: {e}"));
        } else if &content[..MAP_HEADER_LEN as usize] != header {
            problem = Some("header does not match the blob's chunk layout".to_string());
        } else if content[MAP_HEADER_LEN as usize..].iter().any(|&b| b > 1) {
            problem = Some("presence bytes other than 0 and 1".to_string());
        }
        if let Some(problem) = problem {
            warn!(path = %self.map_path.display(), blob = %self.digest, problem, "corrupt cache map, treating the blob as not cached");
            self.reset_map(header, chunks.len())?;
            return Ok(());
        }
        let mut lost = Vec::new();
        for (i, (&byte, rec)) in content[MAP_HEADER_LEN as usize..]
            .iter()
            .zip(chunks)
            .enumerate()
        {
            if byte == 1 {
                // A data file shorter than the map claims was replaced or truncated.
                if rec.uncompressed_offset + u64::from(rec.uncompressed_size) <= data_len {
                    self.state[i].store(DURABLE, Ordering::Relaxed);
                } else {
                    lost.push(i);
                }
            }
        }
        if !lost.is_empty() {
            warn!(path = %self.data_path.display(), blob = %self.digest, chunks = lost.len(), "cache data file is shorter than its map claims; forgetting those chunks");
            for i in lost {
                self.map
                    .write_all_at(&[0], MAP_HEADER_LEN + i as u64)
                    .map_err(|e| self.io_err(true, "write map file", e))?;
            }
        }
        debug!(blob = %self.digest, present = self.present_count(), "cache map loaded");
        Ok(())
    }

    fn reset_map(&self, header: &[u8], count: usize) -> Result<(), CacheError> {
        let mut content = header.to_vec();
        content.resize(MAP_HEADER_LEN as usize + count, 0);
        self.map
            .set_len(0)
            .and_then(|()| self.map.write_all_at(&content, 0))
            .map_err(|e| self.io_err(true, "reset map file", e))
    }

    fn io_err(&self, map: bool, what: &'static str, source: std::io::Error) -> CacheError {
        CacheError::Io {
            path: if map {
                self.map_path.clone()
            } else {
                self.data_path.clone()
            },
            digest: self.digest.to_string(),
            what,
            source,
        }
    }

    /// Whether chunk `rel` (index within the blob) is readable from this cache
    /// as far as this process knows.
    pub fn is_present(&self, rel: u32) -> bool {
        self.state
            .get(rel as usize)
            .is_some_and(|s| s.load(Ordering::Acquire) != ABSENT)
    }

    /// Asks the kernel to start reading cached chunk `rel` into the page
    /// cache, so that a sequential reader's later `read_at` calls find it there
    /// instead of waiting for the disk. Several FUSE threads share the data
    /// file's descriptor, so the kernel's own readahead sees their reads as
    /// random and stays small. Only a hint: failures are ignored.
    pub fn will_need(&self, rel: u32, rec: &ChunkRecord) {
        if !self.is_present(rel) {
            return;
        }
        let _ = rustix::fs::fadvise(
            &self.data,
            rec.uncompressed_offset,
            std::num::NonZeroU64::new(u64::from(rec.uncompressed_size)),
            rustix::fs::Advice::WillNeed,
        );
    }

    /// Number of chunks present.
    pub fn present_count(&self) -> usize {
        self.state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != ABSENT)
            .count()
    }

    /// Reads `buf.len()` bytes at `offset` within chunk `rel` if the chunk is
    /// cached; `Ok(false)` if it is not. `rec` must be the chunk's record.
    pub fn read_at(
        &self,
        rel: u32,
        rec: &ChunkRecord,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<bool, CacheError> {
        let Some(state) = self.state.get(rel as usize) else {
            return Ok(false);
        };
        if u64::from(offset) + buf.len() as u64 > u64::from(rec.uncompressed_size) {
            return Err(CacheError::Layout {
                digest: self.digest.to_string(),
                reason: format!(
                    "read of {} bytes at {offset} past the end of chunk {rel} ({} bytes)",
                    buf.len(),
                    rec.uncompressed_size
                ),
            });
        }
        if state.load(Ordering::Acquire) == ABSENT && !self.durable_elsewhere(rel)? {
            return Ok(false);
        }
        match self
            .data
            .read_exact_at(buf, rec.uncompressed_offset + u64::from(offset))
        {
            Ok(()) => Ok(true),
            // The data file was truncated under us: the chunk is simply not
            // cached any more, and is fetched again.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                warn!(path = %self.data_path.display(), blob = %self.digest, chunk = rel, "cached chunk missing from the data file; forgetting it");
                self.forget(rel)?;
                Ok(false)
            }
            Err(e) => Err(self.io_err(false, "read chunk", e)),
        }
    }

    /// Marks chunk `rel` absent, in memory and in the map.
    fn forget(&self, rel: u32) -> Result<(), CacheError> {
        let _serial = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        self.state[rel as usize].store(ABSENT, Ordering::Release);
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&r| r != rel);
        self.map
            .write_all_at(&[0], MAP_HEADER_LEN + u64::from(rel))
            .map_err(|e| self.io_err(true, "write map file", e))
    }

    /// Whether another process has made chunk `rel` durable since we loaded the map.
    fn durable_elsewhere(&self, rel: u32) -> Result<bool, CacheError> {
        let mut byte = [0u8];
        self.map
            .read_exact_at(&mut byte, MAP_HEADER_LEN + u64::from(rel))
            .map_err(|e| self.io_err(true, "read map file", e))?;
        if byte[0] == 1 {
            let _ = self.state[rel as usize].compare_exchange(
                ABSENT,
                DURABLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return Ok(true);
        }
        Ok(false)
    }

    /// Stores verified chunk bytes. Readable at once; durable after the next flush.
    pub fn write_chunk(&self, rel: u32, rec: &ChunkRecord, data: &[u8]) -> Result<(), CacheError> {
        let Some(state) = self.state.get(rel as usize) else {
            return Err(CacheError::Layout {
                digest: self.digest.to_string(),
                reason: format!(
                    "chunk {rel} is outside the blob's {} chunks",
                    self.state.len()
                ),
            });
        };
        if data.len() != rec.uncompressed_size as usize {
            return Err(CacheError::Layout {
                digest: self.digest.to_string(),
                reason: format!(
                    "chunk {rel}: {} bytes for a {}-byte chunk",
                    data.len(),
                    rec.uncompressed_size
                ),
            });
        }
        if state.load(Ordering::Acquire) != ABSENT {
            return Ok(());
        }
        {
            if !self.write_direct(data, rec.uncompressed_offset)? {
                let _serial = self.writing.lock().unwrap_or_else(|e| e.into_inner());
                self.data
                    .write_all_at(data, rec.uncompressed_offset)
                    .map_err(|e| self.io_err(false, "write chunk", e))?;
            }
        }
        if state
            .compare_exchange(ABSENT, WRITTEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rel);
        }
        Ok(())
    }

    /// Writes an aligned chunk with O_DIRECT through a per-thread aligned
    /// copy; `Ok(false)` when it must go through the page cache instead.
    fn write_direct(&self, data: &[u8], offset: u64) -> Result<bool, CacheError> {
        let Some(direct) = &self.direct else {
            return Ok(false);
        };
        let mask = DIRECT_ALIGN - 1;
        let aligned = !data.is_empty() && data.len() & mask == 0 && offset & mask as u64 == 0;
        if !aligned || !self.direct_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        thread_local! {
            static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        // Buffers from the chunk pool are aligned already.
        if data.as_ptr() as usize & mask == 0 {
            return match direct.write_all_at(data, offset) {
                Ok(()) => Ok(true),
                Err(e) => self.direct_failed(e),
            };
        }
        let result = BOUNCE.with(|bounce| {
            let mut buf = bounce.borrow_mut();
            if buf.len() < data.len() + DIRECT_ALIGN {
                buf.resize(data.len() + DIRECT_ALIGN, 0);
            }
            let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
            let aligned_buf = &mut buf[start..start + data.len()];
            aligned_buf.copy_from_slice(data);
            direct.write_all_at(aligned_buf, offset)
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => self.direct_failed(e),
        }
    }

    /// `Ok(false)` (write through the page cache from now on) when the file
    /// system refuses O_DIRECT; the error otherwise.
    fn direct_failed(&self, e: std::io::Error) -> Result<bool, CacheError> {
        if e.raw_os_error() == Some(libc::EINVAL) {
            warn!(path = %self.data_path.display(), error = %e, "O_DIRECT refused; caching through the page cache");
            self.direct_ok.store(false, Ordering::Relaxed);
            return Ok(false);
        }
        Err(self.io_err(false, "write chunk (O_DIRECT)", e))
    }

    /// Fdatasyncs the data file, then records the chunks written before it in
    /// the map file.
    pub fn flush(&self) -> Result<(), CacheError> {
        let _serial = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.data.sync_data() {
            // Keep them for the next attempt; they stay readable meanwhile.
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(pending);
            return Err(self.io_err(false, "fdatasync data file", e));
        }
        pending.sort_unstable();
        pending.dedup();
        let mut start = 0;
        while start < pending.len() {
            let mut end = start + 1;
            while end < pending.len() && pending[end] == pending[end - 1] + 1 {
                end += 1;
            }
            let ones = vec![1u8; end - start];
            if let Err(e) = self
                .map
                .write_all_at(&ones, MAP_HEADER_LEN + u64::from(pending[start]))
            {
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&pending[start..]);
                return Err(self.io_err(true, "write map file", e));
            }
            for &rel in &pending[start..end] {
                self.state[rel as usize].store(DURABLE, Ordering::Release);
            }
            start = end;
        }
        debug!(blob = %self.digest, chunks = pending.len(), "cache flushed");
        Ok(())
    }
}

/// The map header: identifies the chunk layout the presence bytes refer to.
fn map_header(blob: &BlobRecord, chunks: &[ChunkRecord]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for rec in chunks {
        hasher.update(rec.digest.as_bytes());
        hasher.update(rec.uncompressed_offset.to_le_bytes());
        hasher.update(rec.uncompressed_size.to_le_bytes());
    }
    let mut header = Vec::with_capacity(MAP_HEADER_LEN as usize);
    header.extend_from_slice(MAP_MAGIC);
    header.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    header.extend_from_slice(&[0u8; 4]);
    header.extend_from_slice(&blob.uncompressed_size.to_le_bytes());
    header.extend_from_slice(&hasher.finalize());
    header.resize(MAP_HEADER_LEN as usize, 0);
    header
}

/// Opens the map file, creating it complete (header and zeros) through a
/// temporary file and a hard link, so that no process ever sees it half made.
fn open_map(path: &Path, header: &[u8], count: usize) -> std::io::Result<File> {
    let open = || OpenOptions::new().read(true).write(true).open(path);
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "map.tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut content = header.to_vec();
    content.resize(MAP_HEADER_LEN as usize + count, 0);
    std::fs::write(&tmp, &content)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    open()
}

/// Logs chunks that could not be cached: the first failure at once, then
/// at most one line per [`WriteFailureLog::EVERY`] with how many failed
/// since, since a full disk fails every chunk. (`cache_write_errors`
/// counts them all.)
#[derive(Default)]
pub(crate) struct WriteFailureLog {
    /// When the last line was written, and the failures since.
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl WriteFailureLog {
    pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    /// Counts one failure; logs it if a line is due. Returns whether it did.
    pub(crate) fn failed(&self, error: &CacheError) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        if state.0.is_some_and(|last| last.elapsed() < Self::EVERY) {
            return false;
        }
        warn!(error = %error, failed_chunks = state.1, "cannot cache chunks; serving them uncached (still verified); the next such line comes a minute later at the earliest");
        *state = (Some(std::time::Instant::now()), 0);
        true
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
