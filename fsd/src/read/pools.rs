//! Reusable chunk buffers.
//!
//! A cold read moves every chunk through one buffer from the network to the
//! cache file and the readers. Fresh buffers cost a page fault and a zeroed
//! page per 4 KiB; reusing them keeps that off the read path. Buffers start
//! at a [`DIRECT_ALIGN`] boundary so the cache can write them with O_DIRECT
//! as they are.
//!
//! Buffers are mapped from the kernel, not taken from the allocator: freed
//! by many threads, heap buffers of this size stayed in glibc's per-thread
//! arenas, and a cold read of 1 GiB peaked at 125-160 MiB instead of what
//! was in use. A mapping is returned to the kernel when it is dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use memmap2::MmapMut;
use tracing::warn;

/// Alignment of buffer starts (O_DIRECT needs the logical block size).
pub const DIRECT_ALIGN: usize = 4096;

/// Idle buffers kept for reuse, in bytes; more are freed on return. Buffers
/// cycle between the network and readers, so a few idle ones already absorb
/// the difference between frees and allocations.
const IDLE_BYTES: usize = 32 << 20;

/// A pool of equally sized buffers.
pub struct BufPool {
    capacity: usize,
    max_idle: usize,
    idle: Mutex<Vec<Backing>>,
    /// Buffers made so far.
    #[cfg(test)]
    made: std::sync::atomic::AtomicUsize,
}

/// The memory of one buffer: a mapping, or heap memory (with its aligned
/// start) if the kernel refused the mapping.
enum Backing {
    Mapped(MmapMut),
    Heap { mem: Vec<u8>, start: usize },
}

impl Backing {
    /// Zeroed memory of at least `capacity` bytes starting at a
    /// [`DIRECT_ALIGN`] boundary (mappings start at a page).
    fn new(capacity: usize) -> Self {
        match MmapMut::map_anon(capacity.max(1)) {
            Ok(map) => Backing::Mapped(map),
            Err(error) => {
                warn!(%error, capacity, "cannot map a chunk buffer; using the heap");
                let mem = vec![0u8; capacity + DIRECT_ALIGN];
                let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
                Backing::Heap { mem, start }
            }
        }
    }

    fn region(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Heap { mem, start } => &mem[*start..],
        }
    }

    fn region_mut(&mut self) -> &mut [u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Heap { mem, start } => &mut mem[*start..],
        }
    }
}

impl BufPool {
    /// Buffers of `capacity` bytes (the largest chunk they must hold).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            max_idle: (IDLE_BYTES / capacity.max(1)).max(4),
            idle: Mutex::new(Vec::new()),
            #[cfg(test)]
            made: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// An empty buffer; `None` if `len` exceeds the pool's capacity.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<ChunkBuf> {
        if len > self.capacity {
            return None;
        }
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mem = reused.unwrap_or_else(|| {
            #[cfg(test)]
            self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Backing::new(self.capacity)
        });
        Some(ChunkBuf {
            mem: Some(mem),
            len: 0,
            pool: Arc::clone(self),
        })
    }

    fn give_back(&self, mem: Backing) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(mem);
        }
    }

    #[cfg(test)]
    pub fn made_count(&self) -> usize {
        self.made.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// The buffer pools of one daemon, one per buffer size: every instance whose
/// chunks fit a size shares its pool, so idle memory does not grow with the
/// number of instances.
#[derive(Default)]
pub struct Pools(Mutex<Vec<Arc<BufPool>>>);

impl Pools {
    /// The pool of `capacity`-byte buffers, created on first use.
    pub fn get(&self, capacity: usize) -> Arc<BufPool> {
        let mut pools = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.iter().find(|pool| pool.capacity == capacity) {
            return Arc::clone(pool);
        }
        let pool = BufPool::new(capacity);
        pools.push(Arc::clone(&pool));
        pool
    }
}

/// A buffer from a [`BufPool`]; returns to it when dropped.
pub struct ChunkBuf {
    /// Always initialised (zeroed once when allocated), so handing out
    /// mutable slices of it needs no unsafe code. `None` only while it is
    /// being dropped.
    mem: Option<Backing>,
    len: usize,
    pool: Arc<BufPool>,
}

impl ChunkBuf {
    pub fn as_slice(&self) -> &[u8] {
        self.mem.as_ref().map_or(&[], |m| &m.region()[..self.len])
    }

    fn region_mut(&mut self) -> &mut [u8] {
        let cap = self.pool.capacity;
        self.mem
            .as_mut()
            .map_or(&mut [], |m| &mut m.region_mut()[..cap])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Appends as much of `data` as fits; returns how much did.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.pool.capacity - self.len);
        let at = self.len;
        self.region_mut()[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// The whole capacity for a producer that writes in place (a
    /// decompressor); [`Self::set_len`] then says how much it wrote.
    pub fn space(&mut self) -> &mut [u8] {
        self.region_mut()
    }

    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.pool.capacity);
    }

    /// Shares the buffer; it returns to the pool when the last copy drops.
    /// Contents of at most an eighth of the buffer are copied out instead
    /// and the buffer goes back at once: a small file's chunk held in
    /// memory (for its readers, or kept for a reader to come) then costs its
    /// own size, not a whole buffer's.
    pub fn freeze(self) -> Bytes {
        if self.len <= self.pool.capacity / 8 {
            return Bytes::copy_from_slice(self.as_slice());
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for ChunkBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            self.pool.give_back(mem);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_bounded_and_reused() {
        let pool = BufPool::new(10_000);
        assert!(pool.take(10_001).is_none());
        let mut buf = pool.take(10_000).unwrap();
        assert_eq!(buf.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(buf.fill_from(&[1, 2, 3]), 3);
        assert_eq!(buf.fill_from(&vec![9; 20_000]), 9_997);
        assert_eq!(buf.len(), 10_000);
        assert_eq!(&buf.as_slice()[..4], &[1, 2, 3, 9]);
        let first = buf.as_slice().as_ptr();
        let shared = buf.freeze();
        let copy = shared.clone();
        drop(shared);
        assert_eq!(pool.idle_count(), 0, "still referenced");
        assert_eq!(copy[0], 1);
        drop(copy);
        assert_eq!(pool.idle_count(), 1);
        let again = pool.take(5).unwrap();
        assert_eq!(again.as_slice().as_ptr(), first, "the same memory");
        assert_eq!(again.len(), 0);
    }

    #[test]
    fn small_contents_are_copied_out_and_their_buffer_returned() {
        let pool = BufPool::new(10_000);
        let mut buf = pool.take(10).unwrap();
        buf.fill_from(&[7; 1_250]);
        let small = buf.freeze();
        assert_eq!(pool.idle_count(), 1, "the buffer is back at once");
        assert_eq!(&small[..], &[7; 1_250][..]);
        let mut buf = pool.take(10).unwrap();
        buf.fill_from(&[8; 1_251]);
        let large = buf.freeze();
        assert_eq!(pool.idle_count(), 0, "shared until dropped");
        drop(large);
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn instances_with_one_chunk_size_share_a_pool() {
        let pools = Pools::default();
        let a = pools.get(12_345);
        let b = pools.get(12_345);
        let other = pools.get(12_346);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        let buf = a.take(1).unwrap();
        drop((a, b));
        assert!(Arc::ptr_eq(&pools.get(12_345), &buf.pool));
        assert!(
            !Arc::ptr_eq(&Pools::default().get(12_345), &buf.pool),
            "pools of another daemon are its own"
        );
    }

    #[test]
    fn idle_buffers_are_capped() {
        let pool = BufPool::new(IDLE_BYTES / 2);
        let bufs: Vec<_> = (0..6).map(|_| pool.take(1).unwrap()).collect();
        drop(bufs);
        assert_eq!(pool.idle_count(), 4);
    }
}
