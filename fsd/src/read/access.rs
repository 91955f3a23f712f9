//! The access record of an instance: which files and chunks its readers
//! asked for, files in the order they were first read. It is what a prefetch
//! list is recorded from, and what a start really needed from the registry
//! (the stored bytes of the chunks read).
//!
//! A read costs one relaxed load per file and per chunk once they are
//! recorded; only a first read takes the lock.

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
}

#[derive(Default)]
struct Order {
    files: Vec<Ino>,
    chunks: u64,
    chunk_bytes: u64,
}

pub(crate) struct AccessRecord {
    files: Bits,
    chunks: Bits,
    order: Mutex<Order>,
}

/// What an access record holds, with files named by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Accessed {
    /// Paths (relative to the image root) of the files read, first read
    /// first; a file with several names appears under one of them.
    pub(crate) files: Vec<Vec<u8>>,
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
            order: Mutex::new(Order::default()),
        }
    }

    pub(crate) fn file_read(&self, ino: Ino) {
        if self.files.mark(ino.0) {
            self.lock().files.push(ino);
        }
    }

    pub(crate) fn chunk_read(&self, chunk: ChunkIndex, stored_size: u32) {
        if self.chunks.mark(u64::from(chunk.0)) {
            let mut order = self.lock();
            order.chunks += 1;
            order.chunk_bytes += u64::from(stored_size);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record so far, files named by walking `bootstrap`'s tree.
    pub(crate) fn snapshot(&self, bootstrap: &Bootstrap) -> Result<Accessed, FormatError> {
        let (inos, chunks, chunk_bytes) = {
            let order = self.lock();
            (order.files.clone(), order.chunks, order.chunk_bytes)
        };
        let paths = file_paths(bootstrap, &inos)?;
        Ok(Accessed {
            files: inos
                .iter()
                .filter_map(|ino| paths.get(ino).cloned())
                .collect(),
            chunks,
            chunk_bytes,
        })
    }
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
    }
}
