use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::map::MAP_HEADER_LEN;
use super::*;
use lode_common::format::{BlobIndex, ChunkHash, ChunkIndex};

/// A blob of `n` chunks of `size` bytes each (the last one shorter), with
/// deterministic content per chunk.
fn layout(n: u32, size: u32) -> (BlobRecord, Vec<ChunkRecord>, Vec<Vec<u8>>) {
    let mut chunks = Vec::new();
    let mut contents = Vec::new();
    let mut offset = 0u64;
    for i in 0..n {
        let len = if i + 1 == n { size / 2 + 1 } else { size };
        let data: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        chunks.push(ChunkRecord {
            digest: ChunkHash::WRITTEN.digest(&data),
            blob: BlobIndex(0),
            compressed_offset: offset,
            compressed_size: len,
            uncompressed_offset: offset,
            uncompressed_size: len,
            compressed: false,
        });
        offset += u64::from(len);
        contents.push(data);
    }
    let blob = BlobRecord {
        digest: Digest::of(format!("blob-{n}-{size}").as_bytes()),
        compressed_size: offset,
        uncompressed_size: offset,
        first_chunk: ChunkIndex(0),
        chunk_count: n,
    };
    (blob, chunks, contents)
}

fn read_chunk(cache: &BlobCache, rel: u32, rec: &ChunkRecord) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; rec.uncompressed_size as usize];
    cache.read_at(rel, rec, 0, &mut buf).unwrap().then_some(buf)
}

#[test]
fn written_chunks_read_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(4, 4096);
    let cache = ChunkCache::open(dir.path()).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    assert!(read_chunk(&b, 1, &chunks[1]).is_none());
    b.write_chunk(1, &chunks[1], &contents[1]).unwrap();
    b.write_chunk(3, &chunks[3], &contents[3]).unwrap();
    assert_eq!(read_chunk(&b, 1, &chunks[1]).unwrap(), contents[1]);
    assert_eq!(read_chunk(&b, 3, &chunks[3]).unwrap(), contents[3]);
    assert!(read_chunk(&b, 0, &chunks[0]).is_none());
    let mut part = vec![0u8; 100];
    assert!(b.read_at(1, &chunks[1], 50, &mut part).unwrap());
    assert_eq!(part, contents[1][50..150]);
    assert_eq!(b.present_count(), 2);
    // The same blob opened twice in one process is one object.
    assert!(Arc::ptr_eq(&b, &cache.blob(&blob, &chunks).unwrap()));
}

#[test]
fn reads_past_a_chunk_and_bad_writes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(2, 4096);
    let cache = ChunkCache::open(dir.path()).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    b.write_chunk(0, &chunks[0], &contents[0]).unwrap();
    let mut buf = vec![0u8; 10];
    assert!(b.read_at(0, &chunks[0], 4090, &mut buf).is_err());
    assert!(b.write_chunk(0, &chunks[0], &contents[0][..10]).is_err());
    assert!(b.write_chunk(7, &chunks[0], &contents[0]).is_err());
    let fresh = ChunkCache::open(dir.path()).unwrap();
    assert!(fresh.blob(&blob, &chunks[..1]).is_err());
}

#[test]
fn presence_survives_reopen_only_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(3, 4096);
    {
        let cache = ChunkCache::open(dir.path()).unwrap();
        let b = cache.blob(&blob, &chunks).unwrap();
        b.write_chunk(0, &chunks[0], &contents[0]).unwrap();
        // No flush: the data may be in the file, but the map does not say so.
    }
    {
        let cache = ChunkCache::open(dir.path()).unwrap();
        let b = cache.blob(&blob, &chunks).unwrap();
        assert_eq!(b.present_count(), 0);
        assert!(read_chunk(&b, 0, &chunks[0]).is_none());
        b.write_chunk(2, &chunks[2], &contents[2]).unwrap();
        cache.flush().unwrap();
    }
    let cache = ChunkCache::open(dir.path()).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    assert_eq!(b.present_count(), 1);
    assert_eq!(read_chunk(&b, 2, &chunks[2]).unwrap(), contents[2]);
    assert!(read_chunk(&b, 0, &chunks[0]).is_none());
}

fn flushed_cache(dir: &Path) -> (BlobRecord, Vec<ChunkRecord>) {
    let (blob, chunks, contents) = layout(3, 4096);
    let cache = ChunkCache::open(dir).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    for i in 0..3 {
        b.write_chunk(i, &chunks[i as usize], &contents[i as usize])
            .unwrap();
    }
    cache.flush().unwrap();
    (blob, chunks)
}

fn map_path(dir: &Path, blob: &BlobRecord) -> PathBuf {
    dir.join(format!("{}.map", blob.digest.hex()))
}

fn present_after_reopen(dir: &Path, blob: &BlobRecord, chunks: &[ChunkRecord]) -> usize {
    ChunkCache::open(dir)
        .unwrap()
        .blob(blob, chunks)
        .unwrap()
        .present_count()
}

#[test]
fn short_map_is_treated_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks) = flushed_cache(dir.path());
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 3);
    let map = map_path(dir.path(), &blob);
    let len = std::fs::metadata(&map).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&map)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 0);
    // The reset map has the right size again and records new flushes.
    assert_eq!(std::fs::metadata(&map).unwrap().len(), len);
}

#[test]
fn garbage_in_map_is_treated_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks) = flushed_cache(dir.path());
    let map = map_path(dir.path(), &blob);
    let f = OpenOptions::new().write(true).open(&map).unwrap();
    f.write_all_at(&[7], MAP_HEADER_LEN + 1).unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 0);

    let (blob, chunks) = flushed_cache(dir.path());
    let f = OpenOptions::new()
        .write(true)
        .open(map_path(dir.path(), &blob))
        .unwrap();
    f.write_all_at(b"XXXX", 0).unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 0);
}

#[test]
fn map_of_another_layout_is_treated_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, mut chunks) = flushed_cache(dir.path());
    chunks[1].digest = ChunkHash::WRITTEN.digest(b"something else");
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 0);
}

#[test]
fn truncated_data_file_forgets_the_chunks_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks) = flushed_cache(dir.path());
    let data = dir.path().join(blob.digest.hex());
    OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 1);
    // The forgetting is persistent, not only in memory.
    std::fs::write(&data, vec![0u8; 3 * 4096]).unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 1);
}

#[test]
fn chunks_made_durable_by_another_process_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(3, 4096);
    let a = ChunkCache::open(dir.path()).unwrap();
    let b = ChunkCache::open(dir.path()).unwrap();
    let ba = a.blob(&blob, &chunks).unwrap();
    let bb = b.blob(&blob, &chunks).unwrap();
    ba.write_chunk(1, &chunks[1], &contents[1]).unwrap();
    assert!(
        read_chunk(&bb, 1, &chunks[1]).is_none(),
        "visible before it was durable"
    );
    a.flush().unwrap();
    assert_eq!(read_chunk(&bb, 1, &chunks[1]).unwrap(), contents[1]);
    assert!(bb.is_present(1));
}

#[test]
fn concurrent_writers_in_two_caches_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(64, 8192);
    let caches = [
        ChunkCache::open(dir.path()).unwrap(),
        ChunkCache::open(dir.path()).unwrap(),
    ];
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let cache = &caches[(t % 2) as usize];
            let (blob, chunks, contents) = (&blob, &chunks, &contents);
            s.spawn(move || {
                let b = cache.blob(blob, chunks).unwrap();
                for k in 0..64u32 {
                    // Each thread walks the chunks in its own order.
                    let rel = (k * (2 * t + 1) + t) % 64;
                    b.write_chunk(rel, &chunks[rel as usize], &contents[rel as usize])
                        .unwrap();
                    if k % 16 == 0 {
                        cache.flush().unwrap();
                    }
                }
            });
        }
    });
    for cache in &caches {
        cache.flush().unwrap();
    }
    let cache = ChunkCache::open(dir.path()).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    assert_eq!(b.present_count(), 64);
    for rel in 0..64u32 {
        assert_eq!(
            read_chunk(&b, rel, &chunks[rel as usize]).unwrap(),
            contents[rel as usize],
            "chunk {rel}"
        );
    }
}

#[test]
fn aligned_chunks_go_direct_where_supported_and_both_paths_read_back() {
    for direct_io in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        // 4096-byte chunks (direct) and a shorter last one (page cache).
        let (blob, chunks, contents) = layout(3, 4096);
        let cache = ChunkCache::open(dir.path())
            .unwrap()
            .with_direct_io(direct_io);
        let b = cache.blob(&blob, &chunks).unwrap();
        for rel in [2, 0, 1] {
            b.write_chunk(rel, &chunks[rel as usize], &contents[rel as usize])
                .unwrap();
        }
        if direct_io {
            if b.direct.is_none() {
                eprintln!(
                    "{}: no O_DIRECT here; only the buffered path ran",
                    dir.path().display()
                );
            } else {
                assert!(b.direct_ok.load(Ordering::Relaxed), "direct write refused");
            }
        } else {
            assert!(b.direct.is_none());
        }
        cache.flush().unwrap();
        let reopened = ChunkCache::open(dir.path()).unwrap();
        let b = reopened.blob(&blob, &chunks).unwrap();
        for rel in 0..3u32 {
            assert_eq!(
                read_chunk(&b, rel, &chunks[rel as usize]).unwrap(),
                contents[rel as usize]
            );
        }
    }
}

#[test]
fn cache_write_failures_are_logged_once_a_minute() {
    let log = WriteFailureLog::default();
    let error = CacheError::Io {
        path: "/cache/x.data".into(),
        digest: "sha256:00".into(),
        what: "write chunk",
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    };
    assert!(log.failed(&error), "the first failure is logged");
    let logged = (0..1000).filter(|_| log.failed(&error)).count();
    assert_eq!(logged, 0, "then nothing within the minute");
}

fn data_path(dir: &Path, blob: &BlobRecord) -> PathBuf {
    dir.join(blob.digest.hex())
}

/// Descriptors of this process open on files under `dir` that were removed.
fn removed_files_held(dir: &Path) -> usize {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|t| t.starts_with(&prefix) && t.ends_with(" (deleted)"))
        .count()
}

#[test]
fn removed_files_are_let_go_and_the_blob_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(3, 4096);
    let cache = ChunkCache::open(dir.path()).unwrap();
    let old = cache.blob(&blob, &chunks).unwrap();
    old.write_chunk(0, &chunks[0], &contents[0]).unwrap();
    cache.flush().unwrap();
    assert_eq!(cache.maintain(), 0, "nothing was removed");
    assert!(!old.is_evicted());

    // What the snapshotter's trimming does: the map first, then the data.
    std::fs::remove_file(map_path(dir.path(), &blob)).unwrap();
    std::fs::remove_file(data_path(dir.path(), &blob)).unwrap();
    assert_eq!(cache.maintain(), 1);
    assert!(old.is_evicted());
    // A reader still holding the old cache reads correct bytes from it.
    assert_eq!(read_chunk(&old, 0, &chunks[0]).unwrap(), contents[0]);

    let fresh = cache.blob(&blob, &chunks).unwrap();
    assert!(!Arc::ptr_eq(&old, &fresh));
    assert_eq!(fresh.present_count(), 0, "a fresh cache is empty");
    assert!(read_chunk(&fresh, 0, &chunks[0]).is_none());
    fresh.write_chunk(0, &chunks[0], &contents[0]).unwrap();
    cache.flush().unwrap();
    assert_eq!(present_after_reopen(dir.path(), &blob, &chunks), 1);
    // The old data file (twice with O_DIRECT) and map.
    assert!(removed_files_held(dir.path()) >= 2);
    drop(old);
    assert_eq!(
        removed_files_held(dir.path()),
        0,
        "the removed files are let go"
    );
}

#[test]
fn a_map_reset_for_a_new_data_file_is_not_trusted_with_the_old_one() {
    // Two processes: `a` holds the data file that was removed (the map was
    // left), `b` opens the blob afresh, with a new data file, and resets the
    // map for it.
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(3, 4096);
    let a = ChunkCache::open(dir.path()).unwrap();
    let ba = a.blob(&blob, &chunks).unwrap();
    ba.write_chunk(0, &chunks[0], &contents[0]).unwrap();
    a.flush().unwrap();
    std::fs::remove_file(data_path(dir.path(), &blob)).unwrap();

    let b = ChunkCache::open(dir.path()).unwrap();
    let bb = b.blob(&blob, &chunks).unwrap();
    assert_eq!(
        bb.present_count(),
        0,
        "the map vouched for another data file"
    );
    bb.write_chunk(1, &chunks[1], &contents[1]).unwrap();
    b.flush().unwrap();

    // `a` must not take b's chunk 1 from its own (old) data file, where it
    // was never written, and its flushes must not mark its chunks in b's map.
    assert!(read_chunk(&ba, 1, &chunks[1]).is_none());
    assert!(ba.is_evicted());
    ba.write_chunk(2, &chunks[2], &contents[2]).unwrap();
    a.flush().unwrap();
    let fresh = ChunkCache::open(dir.path()).unwrap();
    let reopened = fresh.blob(&blob, &chunks).unwrap();
    assert!(reopened.is_present(1));
    assert!(
        !reopened.is_present(2),
        "a chunk of the old data file was recorded"
    );
    assert!(!reopened.is_present(0));
    assert_eq!(read_chunk(&bb, 1, &chunks[1]).unwrap(), contents[1]);
}

#[test]
fn used_blobs_are_marked_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, chunks, contents) = layout(3, 4096);
    let cache = ChunkCache::open(dir.path()).unwrap();
    let b = cache.blob(&blob, &chunks).unwrap();
    b.write_chunk(0, &chunks[0], &contents[0]).unwrap();
    cache.flush().unwrap();
    let map = map_path(dir.path(), &blob);
    let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
    let set_long_ago = || {
        let f = OpenOptions::new().write(true).open(&map).unwrap();
        f.set_modified(long_ago).unwrap();
    };
    let modified = || std::fs::metadata(&map).unwrap().modified().unwrap();

    cache.maintain();
    set_long_ago();
    cache.maintain();
    assert_eq!(modified(), long_ago, "not used since the last pass");
    assert!(read_chunk(&b, 0, &chunks[0]).is_some());
    cache.maintain();
    assert!(modified() > long_ago, "read since the last pass");
}
