//! The access record of an instance: which files and chunks its readers
//! asked for, files and chunks in the order they were first read. It is what a prefetch
//! list is recorded from, and what a start really needed from the registry
//! (the stored bytes of the chunks read). It also tells how much of what
//! fetches took ahead of any reader (neighbours of the chunks a reader
//! missed) was read afterwards: [`AccessRecord::usefulness`].
//!
//! A read costs one relaxed load per file and per chunk once they are
//! recorded; only a first read takes the lock.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lode_common::format::{Bootstrap, ChunkIndex, FormatError, Ino, InodeKind};

/// A set of small integers that can be marked from many threads.
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(len: u64) -> Self {
        Self((0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Marks `n`; true if it was not marked before (and is in range).
    fn mark(&self, n: u64) -> bool {
        let Some(word) = usize::try_from(n / 64).ok().and_then(|i| self.0.get(i)) else {
            return false;
        };
        let bit = 1u64 << (n % 64);
        word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    fn is_marked(&self, n: u64) -> bool {
        usize::try_from(n / 64)
            .ok()
            .and_then(|i| self.0.get(i))
            .is_some_and(|word| word.load(Ordering::Relaxed) & (1u64 << (n % 64)) != 0)
    }
}

#[derive(Default)]
struct Order {
    files: Vec<Ino>,
    /// Each chunk read, as the file it was read through and its number in
    /// that file, first read first.
    chunk_order: Vec<(Ino, u32)>,
    chunks: u64,
    chunk_bytes: u64,
    /// Stored bytes fetched ahead of any reader, and how many of them were
    /// read since.
    ahead_bytes: u64,
    ahead_read_bytes: u64,
}

/// What [`AccessRecord::usefulness`] assumes before anything was fetched
/// ahead: an eighth of 4 MiB read (neighbours in a blob are mostly other
/// files, which a start seldom all needs). It weighs as much as 4 MiB of
/// evidence.
const PRIOR_AHEAD: f64 = 4.0 * 1024.0 * 1024.0;
const PRIOR_READ: f64 = PRIOR_AHEAD / 8.0;

pub(crate) struct AccessRecord {
    files: Bits,
    chunks: Bits,
    /// Chunks fetched ahead of any reader.
    ahead: Bits,
    order: Mutex<Order>,
}

/// What an access record holds, with files named by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Accessed {
    /// Paths (relative to the image root) of the files read, first read
    /// first; a file with several names appears under one of them.
    pub(crate) files: Vec<Vec<u8>>,
    /// What was read of those files at chunk granularity: byte ranges
    /// covering whole chunks (the last one ends at the file's end), in the
    /// order their chunks were first read. A chunk shared by several files
    /// is listed under the first one read through.
    pub(crate) ranges: Vec<(Vec<u8>, Range<u64>)>,
    /// Distinct chunks read, and their stored (compressed) bytes.
    pub(crate) chunks: u64,
    pub(crate) chunk_bytes: u64,
}

impl AccessRecord {
    pub(crate) fn new(bootstrap: &Bootstrap) -> Self {
        Self {
            // Inode numbers are 1..=inode_count.
            files: Bits::new(bootstrap.inode_count() + 1),
            chunks: Bits::new(u64::from(bootstrap.chunk_count())),
            ahead: Bits::new(u64::from(bootstrap.chunk_count())),
            order: Mutex::new(Order::default()),
        }
    }

    pub(crate) fn file_read(&self, ino: Ino) {
        if self.files.mark(ino.0) {
            self.lock().files.push(ino);
        }
    }

    /// Records a read of `chunk`, chunk number `idx` of file `ino`.
    pub(crate) fn chunk_read(&self, ino: Ino, idx: u32, chunk: ChunkIndex, stored_size: u32) {
        if self.chunks.mark(u64::from(chunk.0)) {
            let was_ahead = self.ahead.is_marked(u64::from(chunk.0));
            let mut order = self.lock();
            order.chunk_order.push((ino, idx));
            order.chunks += 1;
            order.chunk_bytes += u64::from(stored_size);
            if was_ahead {
                order.ahead_read_bytes += u64::from(stored_size);
            }
        }
    }

    /// Records a chunk a fetch took along although no reader asked for it.
    pub(crate) fn fetched_ahead(&self, chunk: ChunkIndex, stored_size: u32) {
        if !self.chunks.is_marked(u64::from(chunk.0)) && self.ahead.mark(u64::from(chunk.0)) {
            self.lock().ahead_bytes += u64::from(stored_size);
        }
    }

    /// How many more bytes may be taken along with misses while those taken
    /// along and not read stay below `percent` % of the bytes read.
    pub(crate) fn unread_ahead_allowance(&self, percent: u32) -> u64 {
        let order = self.lock();
        let unread = order.ahead_bytes.saturating_sub(order.ahead_read_bytes);
        (order.chunk_bytes * u64::from(percent) / 100).saturating_sub(unread)
    }

    /// The share of the bytes fetched ahead of readers that readers went on
    /// to read, starting from an even guess that the evidence soon
    /// outweighs.
    pub(crate) fn usefulness(&self) -> f64 {
        let order = self.lock();
        (order.ahead_read_bytes as f64 + PRIOR_READ) / (order.ahead_bytes as f64 + PRIOR_AHEAD)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record so far, files named by walking `bootstrap`'s tree.
    pub(crate) fn snapshot(&self, bootstrap: &Bootstrap) -> Result<Accessed, FormatError> {
        let (inos, chunk_order, chunks, chunk_bytes) = {
            let order = self.lock();
            let chunk_order = order.chunk_order.clone();
            (
                order.files.clone(),
                chunk_order,
                order.chunks,
                order.chunk_bytes,
            )
        };
        let paths = file_paths(bootstrap, &inos)?;
        let cs = u64::from(bootstrap.chunk_size());
        let mut ranges = Vec::new();
        for (ino, chunks) in runs(&chunk_order) {
            let (Some(path), Ok(inode)) = (paths.get(&ino), bootstrap.inode(ino)) else {
                continue;
            };
            let bytes = u64::from(chunks.start) * cs..inode.size.min(u64::from(chunks.end) * cs);
            ranges.push((path.clone(), bytes));
        }
        Ok(Accessed {
            files: inos
                .iter()
                .filter_map(|ino| paths.get(ino).cloned())
                .collect(),
            ranges,
            chunks,
            chunk_bytes,
        })
    }
}

/// Chunks of a file read one after the other, merged into runs.
fn runs(order: &[(Ino, u32)]) -> Vec<(Ino, Range<u32>)> {
    let mut out: Vec<(Ino, Range<u32>)> = Vec::new();
    for &(ino, idx) in order {
        match out.last_mut() {
            Some((last, run)) if *last == ino && run.end == idx => run.end += 1,
            _ => out.push((ino, idx..idx + 1)),
        }
    }
    out
}

/// A path of each of `wanted`, found by one walk of the tree.
fn file_paths(
    bootstrap: &Bootstrap,
    wanted: &[Ino],
) -> Result<std::collections::HashMap<Ino, Vec<u8>>, FormatError> {
    let mut paths = std::collections::HashMap::new();
    if wanted.is_empty() {
        return Ok(paths);
    }
    let wanted: std::collections::HashSet<Ino> = wanted.iter().copied().collect();
    let mut dirs = vec![(Ino::ROOT, Vec::new())];
    while let Some((dir, prefix)) = dirs.pop() {
        for index in 0..bootstrap.dir_len(dir)? {
            let Some(entry) = bootstrap.dir_entry(dir, index)? else {
                break;
            };
            let mut path = prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(entry.name);
            let inode = bootstrap.inode(entry.ino)?;
            match inode.kind {
                InodeKind::Dir => dirs.push((entry.ino, path)),
                _ if wanted.contains(&entry.ino) => {
                    paths.entry(entry.ino).or_insert(path);
                }
                _ => {}
            }
            if paths.len() == wanted.len() {
                return Ok(paths);
            }
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_mark_once_and_ignore_out_of_range() {
        let bits = Bits::new(130);
        assert!(bits.mark(0));
        assert!(bits.mark(129));
        assert!(!bits.mark(129));
        assert!(bits.mark(64));
        assert!(!bits.mark(0));
        assert!(!bits.mark(192));
        assert!(bits.is_marked(64) && !bits.is_marked(65) && !bits.is_marked(192));
    }

    /// An image of four one-chunk files, and an empty record of it.
    fn four_files() -> (crate::testutil::TestImage, Bootstrap, AccessRecord) {
        let mut image = crate::testutil::ImageBuilder::new(64 * 1024, false);
        for name in ["a", "b", "c", "d"] {
            image.file(name, name.as_bytes());
        }
        let image = image.build();
        let bootstrap = Bootstrap::open(&image.bootstrap_path).unwrap();
        let record = AccessRecord::new(&bootstrap);
        (image, bootstrap, record)
    }

    #[test]
    fn usefulness_follows_what_was_read_of_what_was_fetched_ahead() {
        let (_image, bootstrap, record) = four_files();
        const MIB: u32 = 1 << 20;
        let four = 4.0 * f64::from(MIB);
        assert_eq!(record.usefulness(), PRIOR_READ / PRIOR_AHEAD);
        record.chunk_read(Ino(2), 0, ChunkIndex(0), MIB);
        record.fetched_ahead(ChunkIndex(1), 4 * MIB);
        record.fetched_ahead(ChunkIndex(1), 4 * MIB);
        // A chunk read already is not fetched ahead of anyone.
        record.fetched_ahead(ChunkIndex(0), 4 * MIB);
        assert_eq!(record.usefulness(), PRIOR_READ / (PRIOR_AHEAD + four));
        record.chunk_read(Ino(3), 0, ChunkIndex(1), 4 * MIB);
        assert_eq!(
            record.usefulness(),
            (PRIOR_READ + four) / (PRIOR_AHEAD + four)
        );
        let accessed = record.snapshot(&bootstrap).unwrap();
        assert_eq!(
            (accessed.chunks, accessed.chunk_bytes),
            (2, 5 * u64::from(MIB))
        );
    }

    #[test]
    fn ranges_follow_the_first_reads_of_chunks() {
        let mut image = crate::testutil::ImageBuilder::new(64 * 1024, false);
        image.file("big", &crate::testutil::pattern(4 * 65536 - 10, 1));
        image.file("small", b"small");
        let image = image.build();
        let bootstrap = Bootstrap::open(&image.bootstrap_path).unwrap();
        let record = AccessRecord::new(&bootstrap);
        let (big, small) = (Ino(2), Ino(3));
        let chunk = |ino, idx| bootstrap.file_chunk(ino, idx).unwrap();
        for (ino, idx) in [(big, 0), (big, 1), (small, 0), (big, 3), (big, 2), (big, 0)] {
            record.file_read(ino);
            record.chunk_read(ino, idx, chunk(ino, idx), 10);
        }
        let accessed = record.snapshot(&bootstrap).unwrap();
        assert_eq!(accessed.files, [b"big".to_vec(), b"small".to_vec()]);
        assert_eq!(
            accessed.ranges,
            [
                (b"big".to_vec(), 0..2 * 65536),
                (b"small".to_vec(), 0..5),
                (b"big".to_vec(), 3 * 65536..4 * 65536 - 10),
                (b"big".to_vec(), 2 * 65536..3 * 65536),
            ]
        );
        assert_eq!((accessed.chunks, accessed.chunk_bytes), (5, 50));
    }

    #[test]
    fn the_allowance_is_a_share_of_the_bytes_read_less_the_unread_taken_along() {
        let (_image, _, record) = four_files();
        assert_eq!(record.unread_ahead_allowance(50), 0, "nothing read yet");
        record.chunk_read(Ino(2), 0, ChunkIndex(0), 1000);
        assert_eq!(record.unread_ahead_allowance(50), 500);
        assert_eq!(record.unread_ahead_allowance(0), 0);
        record.fetched_ahead(ChunkIndex(1), 400);
        assert_eq!(record.unread_ahead_allowance(50), 100);
        record.fetched_ahead(ChunkIndex(2), 400);
        assert_eq!(record.unread_ahead_allowance(50), 0, "over the share");
        // Read, what was taken along counts as read, not as unread.
        record.chunk_read(Ino(3), 0, ChunkIndex(1), 400);
        assert_eq!(record.unread_ahead_allowance(50), 700 - 400);
    }
}
