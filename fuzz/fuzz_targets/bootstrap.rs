//! Opens arbitrary bytes as a bootstrap and, if they open, drives every
//! accessor over a bounded part of it: nothing may panic, hang or read out of
//! bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_common::format::{BlobIndex, Bootstrap, ChunkIndex, Ino};

/// Caps keep each input's work small so the fuzzer explores breadth.
const MAX_INODES: u64 = 64;
const MAX_ENTRIES: u32 = 32;
const MAX_CHUNKS: u32 = 16;

fuzz_target!(|data: &[u8]| {
    // The crc check would reject nearly every mutation before any of the
    // interesting code runs; everything after it is still checked.
    let Ok(b) = Bootstrap::from_bytes_unchecked_checksum(data.to_vec()) else {
        return;
    };
    let _ = (b.chunk_size(), b.checksum());
    for i in 0..=b.inode_count().min(MAX_INODES) + 1 {
        let ino = Ino(i);
        let _ = b.inode(ino);
        let _ = b.lookup(ino, b"etc");
        let len = b.dir_len(ino).unwrap_or(0).min(MAX_ENTRIES);
        for e in 0..=len {
            if let Ok(Some(entry)) = b.dir_entry(ino, e) {
                let _ = b.lookup(ino, entry.name);
            }
        }
        let mut up = ino;
        for _ in 0..MAX_INODES {
            match b.parent(up) {
                Ok(p) if p != up => up = p,
                _ => break,
            }
        }
        let _ = b.symlink_target(ino);
        if let Ok(names) = b.xattr_names(ino) {
            for name in names {
                let _ = b.xattr(ino, name);
            }
        }
        let _ = b.xattr(ino, b"security.capability");
        let count = b.file_chunk_count(ino).unwrap_or(0).min(MAX_CHUNKS);
        for c in 0..=count {
            if let Ok(chunk) = b.file_chunk(ino, c) {
                let _ = b.chunk(chunk);
            }
        }
    }
    for c in 0..=b.chunk_count().min(MAX_CHUNKS * 4) {
        let _ = b.chunk(ChunkIndex(c));
    }
    for i in 0..=b.blob_count().min(MAX_CHUNKS * 4) {
        let _ = b.blob(BlobIndex(i));
    }
    let _ = b.prefetch_list();
    let _ = b.verify_all();
});
