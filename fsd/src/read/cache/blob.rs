//! The cached chunks of one blob: its data file, its map file and what this
//! process knows of both.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use lode_common::format::{BlobRecord, ChunkRecord};
use lode_common::Digest;
use tracing::{debug, warn};

use super::map::{data_inode_of, map_header, open_map, MAP_HEADER_LEN};
use super::CacheError;
use crate::read::pools::DIRECT_ALIGN;

const ABSENT: u8 = 0;
/// Written to the data file, not yet fdatasync'ed.
const WRITTEN: u8 = 1;
/// Fdatasync'ed and recorded in the map file.
const DURABLE: u8 = 2;

/// The cached chunks of one blob.
pub struct BlobCache {
    digest: Digest,
    data_path: PathBuf,
    map_path: PathBuf,
    data: File,
    /// The data file opened with O_DIRECT, for aligned chunks.
    pub(super) direct: Option<File>,
    /// Cleared when the filesystem refuses a direct write.
    pub(super) direct_ok: AtomicBool,
    map: File,
    /// Inode numbers of the data and map files opened: the files are this
    /// cache's while the paths still name them.
    data_inode: u64,
    map_inode: u64,
    /// Read or written since the last [`ChunkCache::maintain`].
    used: AtomicBool,
    /// The files were removed or replaced: readers take a fresh cache from
    /// [`ChunkCache::blob`] (this one still reads correct bytes meanwhile).
    evicted: AtomicBool,
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
    pub(super) fn open(
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
        // every chunk goes through the page cache. Opened again through the
        // descriptor, not the path: the path may name another file by now
        // (the cache trimmed), and writes must go where reads look.
        let direct = if direct_io {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", data.as_raw_fd()))
                .map_err(|e| debug!(path = %data_path.display(), error = %e, "no O_DIRECT for the cache"))
                .ok()
        } else {
            None
        };
        let data_meta = data
            .metadata()
            .map_err(|e| io(&data_path, "stat data file", e))?;
        let header = map_header(blob, chunks, data_meta.ino());
        let map = open_map(&map_path, &header, chunks.len())
            .map_err(|e| io(&map_path, "open map file", e))?;
        let map_inode = map
            .metadata()
            .map_err(|e| io(&map_path, "stat map file", e))?
            .ino();

        let cache = Self {
            digest: blob.digest,
            data_path,
            map_path,
            data,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            map,
            data_inode: data_meta.ino(),
            map_inode,
            used: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            state: (0..chunks.len()).map(|_| AtomicU8::new(ABSENT)).collect(),
            dirty: Mutex::new(Vec::new()),
            flushing: Mutex::new(()),
            writing: Mutex::new(()),
        };
        cache.load_map(&header, chunks, data_meta.len())?;
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
        // A flush of another process checks the header and writes presence
        // bytes under this lock: once the map is reset for this data file,
        // no byte for another data file lands in it.
        let _locked = self.lock_map()?;
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

    /// Holds the map file's advisory lock (every process using the blob)
    /// until dropped.
    fn lock_map(&self) -> Result<MapLock<'_>, CacheError> {
        rustix::fs::flock(&self.map, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io_err(true, "lock map file", e.into()))?;
        Ok(MapLock(&self.map))
    }

    /// Whether the map file still describes this cache's data file.
    fn map_is_ours(&self) -> Result<bool, CacheError> {
        let named = data_inode_of(&self.map).map_err(|e| self.io_err(true, "read map file", e))?;
        Ok(named == self.data_inode)
    }

    pub(super) fn digest(&self) -> &Digest {
        &self.digest
    }

    pub(super) fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Whether the paths still name the files this cache opened.
    pub(super) fn files_are_current(&self) -> bool {
        let inode = |path: &Path| std::fs::metadata(path).ok().map(|m| m.ino());
        inode(&self.data_path) == Some(self.data_inode)
            && inode(&self.map_path) == Some(self.map_inode)
    }

    /// Whether the files were found removed or replaced.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    pub(super) fn mark_evicted(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    fn mark_used(&self) {
        // Read before written: most calls find it set, and a store on every
        // read would bounce the cache line between reader threads.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Sets the map file's modification time to now if the blob was used
    /// since the last call. Only a hint for the trimming: errors are ignored.
    pub(super) fn touch_if_used(&self) {
        if self.used.swap(false, Ordering::Relaxed) {
            let _ = self.map.set_modified(std::time::SystemTime::now());
        }
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
        self.mark_used();
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
            // Read after the byte: a map reset for another data file (ours
            // was replaced) says so before it holds any byte for that file.
            if !self.map_is_ours()? {
                self.mark_evicted();
                return Ok(false);
            }
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
        self.mark_used();
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
        // Failed chunks are kept for the next attempt; they stay readable
        // meanwhile.
        let requeue = |chunks: &[u32]| {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(chunks);
        };
        if let Err(e) = self.data.sync_data() {
            requeue(&pending);
            return Err(self.io_err(false, "fdatasync data file", e));
        }
        pending.sort_unstable();
        pending.dedup();
        let _locked = match self.lock_map() {
            Ok(locked) => locked,
            Err(e) => {
                requeue(&pending);
                return Err(e);
            }
        };
        match self.map_is_ours() {
            Ok(true) => {}
            Ok(false) => {
                // Our data file was replaced: the map is another file's now.
                self.mark_evicted();
                return Ok(());
            }
            Err(e) => {
                requeue(&pending);
                return Err(e);
            }
        }
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
                requeue(&pending[start..]);
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

/// The map file's advisory lock, released on drop.
struct MapLock<'a>(&'a File);

impl Drop for MapLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, rustix::fs::FlockOperation::Unlock);
    }
}
