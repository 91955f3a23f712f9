use super::neighbours::MIN_EXTRA;
use super::*;
use crate::read::backend::DirBackend;
use crate::testutil::{
    pattern, wait_until, CountingBackend, GatedBackend, ImageBuilder, TestImage,
};
use lode_common::format::ChunkHash;

pub(super) const CS: u32 = 64 * 1024;

pub(super) fn settings(merge_chunks: u64, readahead_chunks: u64) -> FetchSettings {
    FetchSettings {
        merge_limit: merge_chunks * u64::from(CS),
        // Neighbour tests look at the link and merge bounds alone.
        unread_ahead_percent: 1_000_000,
        readahead: readahead_chunks * u64::from(CS),
        readahead_request: merge_chunks * u64::from(CS),
        deadline: Duration::from_secs(10),
        workers: 4,
        background_workers: 2,
        background_nice: crate::read::workers::usable_nice(10),
    }
}

pub(super) fn fetcher(
    image: &TestImage,
    backend: Arc<dyn BlobBackend>,
    settings: FetchSettings,
) -> (Fetcher, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(ChunkCache::open(&image.cache_dir).unwrap());
    let f = Fetcher::new(
        Arc::clone(&image.bootstrap),
        backend,
        cache,
        Arc::clone(&metrics),
        settings,
        &crate::read::pools::Pools::default(),
    )
    .unwrap();
    (f, metrics)
}

pub(super) fn ino_of(image: &TestImage, name: &str) -> Ino {
    image
        .bootstrap
        .lookup(Ino::ROOT, name.as_bytes())
        .unwrap()
        .unwrap()
        .ino
}

/// Raw chunks, so stored offsets are file offsets and request ranges are easy to predict.
fn one_file(chunks: usize, compress: bool) -> (TestImage, Vec<u8>) {
    let data = pattern(chunks * CS as usize - 100, 7);
    let mut b = ImageBuilder::new(CS, compress);
    b.file("f", &data);
    (b.build(), data)
}

#[test]
fn reads_ranges_across_chunks_raw_and_zstd() {
    for compress in [false, true] {
        let (image, data) = one_file(5, compress);
        let (f, metrics) = fetcher(
            &image,
            Arc::new(DirBackend::new(&image.blob_dir)),
            settings(4, 0),
        );
        let ino = ino_of(&image, "f");
        let n = data.len() as u64;
        for (offset, size) in [
            (0u64, 10u32),
            (CS as u64 - 5, 10),
            (1000, 3 * CS),
            (n - 50, 4096),
            (0, 6 * CS),
        ] {
            let got = f.read(ino, offset, size).unwrap();
            let end = (offset + u64::from(size)).min(n) as usize;
            assert_eq!(
                got,
                data[offset as usize..end],
                "compress={compress} offset={offset} size={size}"
            );
        }
        assert!(f.read(ino, n, 10).unwrap().is_empty());
        assert!(f.read(ino, n + 100, 10).unwrap().is_empty());
        assert!(matches!(
            f.read(Ino::ROOT, 0, 10),
            Err(FetchError::NotAFile { .. })
        ));
        assert_eq!(metrics.snapshot().digest_errors, 0);
    }
}

#[test]
fn adjacent_missing_chunks_are_merged_up_to_the_limit() {
    let (image, data) = one_file(8, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, metrics) = fetcher(&image, backend.clone(), settings(3, 0));
    let ino = ino_of(&image, "f");
    let got = f.read(ino, 0, 8 * CS).unwrap();
    assert_eq!(got, data);
    let cs = u64::from(CS);
    let mut calls = backend.calls();
    calls.sort();
    assert_eq!(
        calls,
        vec![(0, 3 * cs), (3 * cs, 3 * cs), (6 * cs, 2 * cs - 100)]
    );
    // Everything is cached now.
    assert_eq!(f.read(ino, 0, 8 * CS).unwrap(), data);
    assert_eq!(backend.calls().len(), 3);
    let s = metrics.snapshot();
    // The second read finds each chunk cached, or (just fetched, not yet
    // cached) still in memory.
    assert_eq!(s.cache_misses, 8);
    assert_eq!(s.cache_hits + s.prefetch_hits + s.inflight_joins, 8);
    assert_eq!(s.backend_requests, 3);
    assert_eq!(s.bytes_fetched, data.len() as u64);
}

#[test]
fn a_miss_extends_its_request_over_the_following_chunks() {
    let (image, data) = one_file(32, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, _) = fetcher(&image, backend.clone(), settings(32, 0));
    let ino = ino_of(&image, "f");
    assert_eq!(f.read(ino, 10, 100).unwrap(), data[10..110]);
    let cs = u64::from(CS);
    // Before any evidence, taken-along bytes are guessed an eighth useful:
    // the first miss takes a quarter of the least extension along.
    let along = MIN_EXTRA / 4 / cs;
    assert!(along >= 1);
    assert_eq!(backend.calls(), vec![(0, (1 + along) * cs)]);
    for chunk in 1..=along {
        let at = chunk * cs + 5;
        assert_eq!(f.read(ino, at, 100).unwrap(), data[at as usize..][..100]);
    }
    assert_eq!(
        backend.calls().len(),
        1,
        "the chunks taken along came with the first request"
    );
    let next = (1 + along) * cs;
    assert_eq!(
        f.read(ino, next, 100).unwrap(),
        data[next as usize..][..100]
    );
    assert_eq!(backend.calls()[1].0, next);
    assert!(
        backend.calls()[1].1 > backend.calls()[0].1,
        "reading what was taken along grew the extension: {:?}",
        backend.calls()
    );
}

/// Bytes fetched by a reader of every fourth chunk of a file, with
/// `unread_ahead_percent`, and the bytes of the chunks it read.
fn sparse_reader_fetches(percent: u32) -> (u64, u64) {
    let (image, data) = one_file(64, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let mut s = settings(16, 0);
    s.unread_ahead_percent = percent;
    let (f, _) = fetcher(&image, backend.clone(), s);
    let ino = ino_of(&image, "f");
    let cs = u64::from(CS);
    let mut read = 0;
    for i in (0..64).step_by(4) {
        let at = i * cs;
        assert_eq!(f.read(ino, at, 100).unwrap(), data[at as usize..][..100]);
        read += cs;
    }
    (backend.calls().iter().map(|c| c.1).sum(), read)
}

#[test]
fn bytes_taken_along_and_not_read_stay_within_their_share_of_the_bytes_read() {
    let (unbounded, read) = sparse_reader_fetches(1_000_000);
    assert!(unbounded > read, "nothing taken along without the bound");
    let (bounded, read) = sparse_reader_fetches(50);
    assert!(
        bounded <= read * 3 / 2,
        "{bounded} bytes fetched for {read} read"
    );
    let (nothing_along, read) = sparse_reader_fetches(0);
    assert_eq!(nothing_along, read);
}

#[test]
fn a_corrupt_chunk_is_an_error_counted_and_never_cached() {
    for hash in [ChunkHash::Blake3, ChunkHash::Sha256] {
        a_corrupt_chunk_is_refused(hash);
    }
}

fn a_corrupt_chunk_is_refused(hash: ChunkHash) {
    let data = pattern(3 * CS as usize - 100, 7);
    let mut b = ImageBuilder::new(CS, true).chunk_hash(hash);
    b.file("f", &data);
    let image = b.build();
    assert_eq!(
        image.bootstrap.chunk(ChunkIndex(0)).unwrap().digest.hash(),
        hash
    );
    let mut blob = std::fs::read(image.blob_path()).unwrap();
    let pristine = blob.clone();
    // Flip a byte inside the second chunk's frame.
    let rec = image.bootstrap.chunk(ChunkIndex(1)).unwrap();
    blob[(rec.compressed_offset + u64::from(rec.compressed_size) / 2) as usize] ^= 0xff;
    std::fs::write(image.blob_path(), &blob).unwrap();

    let (f, metrics) = fetcher(
        &image,
        Arc::new(DirBackend::new(&image.blob_dir)),
        settings(1, 0),
    );
    let ino = ino_of(&image, "f");
    let err = f.read(ino, u64::from(CS), 10).unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&rec.digest.to_string()), "{err}");
    assert_eq!(metrics.snapshot().digest_errors, 1);
    assert_eq!(f.read(ino, 0, 10).unwrap(), data[..10]);

    // Nothing of the bad chunk reached the cache, in memory or on disk.
    f.cache.flush().unwrap();
    drop(f);
    std::fs::write(image.blob_path(), &pristine).unwrap();
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, _) = fetcher(&image, backend.clone(), settings(1, 0));
    assert_eq!(
        f.read(ino, u64::from(CS), 10).unwrap(),
        data[CS as usize..][..10]
    );
    assert_eq!(
        backend.calls().len(),
        1,
        "the corrupt chunk was served from the cache"
    );
}

#[test]
fn concurrent_readers_of_a_chunk_share_one_request() {
    let data = pattern(1000, 3);
    let mut b = ImageBuilder::new(CS, true);
    b.file("small", &data);
    let image = b.build();
    let backend = Arc::new(GatedBackend::new(&image));
    let (f, metrics) = fetcher(&image, backend.clone(), settings(4, 4));
    let ino = ino_of(&image, "small");
    const READERS: u64 = 8;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..READERS)
            .map(|_| s.spawn(|| f.read(ino, 0, 1000)))
            .collect();
        wait_until("every reader to miss or join", || {
            let s = metrics.snapshot();
            s.cache_misses + s.inflight_joins == READERS
        });
        backend.open();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), data);
        }
    });
    assert_eq!(backend.inner.calls().len(), 1);
    let s = metrics.snapshot();
    assert_eq!((s.cache_misses, s.inflight_joins), (1, READERS - 1));
}

#[test]
fn a_hanging_backend_fails_the_read_at_the_deadline() {
    let (image, data) = one_file(2, false);
    let backend = Arc::new(GatedBackend::new(&image));
    let mut s = settings(1, 0);
    s.deadline = Duration::from_millis(200);
    let (f, metrics) = fetcher(&image, backend.clone(), s);
    let ino = ino_of(&image, "f");
    let start = Instant::now();
    let err = f.read(ino, 0, 10).unwrap_err();
    assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(metrics.snapshot().fetch_timeouts, 1);
    // Once the source answers, reads work again.
    backend.open();
    assert_eq!(f.read(ino, 0, 10).unwrap(), data[..10]);
}

#[test]
fn a_failing_backend_is_an_error_not_a_hang() {
    let (image, _) = one_file(2, false);
    std::fs::remove_file(image.blob_path()).unwrap();
    let (f, metrics) = fetcher(
        &image,
        Arc::new(DirBackend::new(&image.blob_dir)),
        settings(1, 0),
    );
    let err = f.read(ino_of(&image, "f"), 0, 10).unwrap_err();
    assert!(matches!(err, FetchError::Backend { .. }), "{err}");
    assert!(
        err.to_string().contains(&image.blob_digest.to_string()),
        "{err}"
    );
    assert_eq!(metrics.snapshot().backend_errors, 1);
}

#[test]
fn sequential_reads_start_background_readahead_that_grows_with_the_reader() {
    let (image, data) = one_file(16, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let mut s = settings(2, 8);
    s.readahead_request = 4 * u64::from(CS);
    let (f, metrics) = fetcher(&image, backend.clone(), s);
    let ino = ino_of(&image, "f");
    let cs = u64::from(CS);
    let fetched = || backend.calls().iter().map(|c| c.1).sum::<u64>();
    assert_eq!(f.read(ino, 0, CS).unwrap(), data[..CS as usize]);
    assert_eq!(
        metrics.snapshot().readahead_requests,
        0,
        "one read is not a pattern"
    );
    assert_eq!(
        f.read(ino, cs, CS).unwrap(),
        data[CS as usize..][..CS as usize]
    );
    // Two chunks read in order: the two after them are fetched in the
    // background (the window is what the reader has read so far).
    wait_until("readahead to cover 4 chunks", || fetched() >= 4 * cs);
    assert!(metrics.snapshot().readahead_requests >= 1);
    wait_until("readahead chunks to arrive", || {
        f.blob_caches[0]
            .read()
            .unwrap()
            .upgrade()
            .is_some_and(|c| c.present_count() >= 4)
    });
    assert!(
        fetched() <= 4 * cs,
        "{} bytes fetched for a reader of two chunks",
        fetched()
    );
    // The next read takes its chunks from memory: no chunk is requested
    // twice (it may start more readahead past them). Counted around this
    // read only: whether the second read above found chunk 1 done or still
    // in flight depends on timing.
    let hits_before = metrics.snapshot().prefetch_hits;
    assert_eq!(
        f.read(ino, 2 * cs, (2 * cs) as u32).unwrap(),
        data[2 * CS as usize..][..2 * CS as usize]
    );
    assert_eq!(metrics.snapshot().prefetch_hits - hits_before, 2);
    // Read to their ends, they are no longer kept in memory.
    assert!(f
        .ctx
        .inflight
        .get(&ChunkKey {
            blob: image.blob_digest,
            rel: 2
        })
        .is_none());
    // Four chunks read: the window has grown to four.
    wait_until("readahead to cover 8 chunks", || fetched() >= 8 * cs);
    assert!(
        fetched() <= 8 * cs,
        "{} bytes fetched for a reader of four chunks",
        fetched()
    );
    let mut calls = backend.calls();
    calls.sort();
    for pair in calls.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "overlapping requests {calls:?}"
        );
    }
    let calls = backend.calls();
    assert_eq!(
        calls[0],
        (0, 2 * cs),
        "the demand request uses the merge limit"
    );
    for (_, len) in &calls {
        assert!(
            *len <= 4 * cs,
            "request of {len} bytes over the readahead request limit"
        );
    }
}

#[test]
fn a_restarted_fetcher_serves_flushed_chunks_from_the_cache() {
    let (image, data) = one_file(3, true);
    {
        let (f, _) = fetcher(
            &image,
            Arc::new(DirBackend::new(&image.blob_dir)),
            settings(4, 0),
        );
        assert_eq!(f.read(ino_of(&image, "f"), 0, 3 * CS).unwrap(), data);
        wait_cached(&f, 3);
        f.cache.flush().unwrap();
    }
    std::fs::remove_file(image.blob_path()).unwrap();
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, metrics) = fetcher(&image, backend.clone(), settings(4, 0));
    assert_eq!(f.read(ino_of(&image, "f"), 0, 3 * CS).unwrap(), data);
    assert!(backend.calls().is_empty());
    assert_eq!(metrics.snapshot().cache_hits, 3);
}

#[test]
fn shared_chunks_are_fetched_once() {
    let chunk = pattern(CS as usize, 11);
    let mut b = ImageBuilder::new(CS, false);
    b.file("a", &chunk);
    b.file("b", &[chunk.clone(), chunk.clone()].concat());
    let image = b.build();
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, _) = fetcher(&image, backend.clone(), settings(4, 0));
    assert_eq!(
        f.read(ino_of(&image, "b"), 0, 2 * CS).unwrap(),
        [chunk.clone(), chunk.clone()].concat()
    );
    assert_eq!(f.read(ino_of(&image, "a"), 0, CS).unwrap(), chunk);
    assert_eq!(backend.calls().len(), 1);
}

#[test]
fn a_read_failing_midway_leaves_no_orphaned_fetch() {
    // "f" is [y, x]: y in the second blob, x shared from the first.
    let (x, y) = (pattern(CS as usize, 1), pattern(CS as usize, 2));
    let mut b = ImageBuilder::new(CS, false);
    b.file("g", &x);
    b.next_blob();
    b.file("f", &[y.clone(), x].concat());
    let image = b.build();
    // The first blob's cache cannot be opened: its map path is a directory.
    let map = image
        .cache_dir
        .join(format!("{}.map", image.blob_digests[0].hex()));
    std::fs::create_dir_all(map).unwrap();
    let mut s = settings(1, 0);
    s.deadline = Duration::from_secs(2);
    let (f, _) = fetcher(&image, Arc::new(DirBackend::new(&image.blob_dir)), s);
    let ino = ino_of(&image, "f");
    // Chunk 0 (y) is led, then chunk 1 (x) fails.
    let err = f.read(ino, 0, 2 * CS).unwrap_err();
    assert!(matches!(err, FetchError::Cache(_)), "{err}");
    // y's fetch was not left in flight for later readers to wait on.
    assert_eq!(f.read(ino, 0, 10).unwrap(), y[..10]);
}

/// Waits until every chunk of the first blob is in the fetcher's cache
/// (jobs cache chunks just after handing them to readers).
fn wait_cached(f: &Fetcher, count: usize) {
    wait_until("chunks to be cached", || {
        f.blob_caches[0]
            .read()
            .unwrap()
            .upgrade()
            .is_some_and(|c| c.present_count() == count)
    });
}

#[test]
fn a_cached_chunk_whose_bytes_vanished_is_fetched_again() {
    let (image, data) = one_file(3, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, _) = fetcher(&image, backend.clone(), settings(1, 0));
    let ino = ino_of(&image, "f");
    let cs = u64::from(CS);
    assert_eq!(f.read(ino, cs, 10).unwrap(), data[CS as usize..][..10]);
    wait_cached(&f, 1);
    f.cache.flush().unwrap();
    let cache_file = image.cache_dir.join(image.blob_digest.hex());
    let truncate = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cache_file)
            .unwrap()
            .set_len(0)
            .unwrap();
    };
    truncate();
    assert_eq!(f.read(ino, 0, 2 * CS).unwrap(), data[..2 * CS as usize]);
    assert_eq!(backend.calls().len(), 3, "chunk 1 was not fetched again");
    // The map forgot it too: a new fetcher over an emptied data file fetches.
    wait_cached(&f, 2);
    drop(f);
    truncate();
    let backend = Arc::new(CountingBackend::new(&image));
    let (f, _) = fetcher(&image, backend.clone(), settings(1, 0));
    assert_eq!(f.read(ino, cs, 10).unwrap(), data[CS as usize..][..10]);
    assert_eq!(backend.calls().len(), 1);
}

/// Files `f0`..`f{count}` of `size` bytes each, stored one after the other
/// in one blob, one chunk each.
fn small_files(count: usize, size: usize, compress: bool) -> (TestImage, Vec<Vec<u8>>) {
    let mut b = ImageBuilder::new(CS, compress);
    let files: Vec<Vec<u8>> = (0..count).map(|i| pattern(size, 100 + i as u32)).collect();
    for (i, data) in files.iter().enumerate() {
        b.file(&format!("f{i}"), data);
    }
    (b.build(), files)
}

fn file_name(i: usize) -> String {
    format!("f{i}")
}

#[test]
fn a_miss_fetches_the_following_files_of_the_blob_up_to_the_limit() {
    let (image, files) = small_files(10, 1000, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let mut s = settings(1, 0);
    // Four of the 1000-byte chunks fit, a fifth does not.
    s.merge_limit = 4500;
    let (f, metrics) = fetcher(&image, backend.clone(), s);
    let read = |i: usize| f.read(ino_of(&image, &file_name(i)), 0, 4096).unwrap();
    assert_eq!(read(0), files[0]);
    assert_eq!(backend.calls(), vec![(0, 4000)]);
    wait_cached(&f, 4);
    for (i, data) in files.iter().enumerate().take(4).skip(1) {
        assert_eq!(&read(i), data, "f{i}");
    }
    assert_eq!(backend.calls().len(), 1, "a neighbour was fetched again");
    assert_eq!(read(4), files[4]);
    assert_eq!(backend.calls(), vec![(0, 4000), (4000, 4000)]);
    // With nothing after it, f9's request takes the chunk before it, and a
    // present chunk (f7) ends the extension.
    assert_eq!(read(9), files[9]);
    assert_eq!(backend.calls(), vec![(0, 4000), (4000, 4000), (8000, 2000)]);
    wait_cached(&f, 10);
    assert_eq!(read(8), files[8]);
    assert_eq!(backend.calls().len(), 3);
    let s = metrics.snapshot();
    assert_eq!(s.cache_misses, 3);
    assert_eq!(s.digest_errors, 0);
    assert_eq!(s.bytes_fetched, 10_000);
}

#[test]
fn a_merge_limit_of_one_chunk_fetches_no_neighbour() {
    let (image, files) = small_files(3, 3000, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let mut s = settings(1, 0);
    s.merge_limit = 5999;
    let (f, _) = fetcher(&image, backend.clone(), s);
    assert_eq!(f.read(ino_of(&image, "f1"), 0, 4096).unwrap(), files[1]);
    assert_eq!(backend.calls(), vec![(3000, 3000)]);
}

#[test]
fn a_corrupt_neighbour_fails_only_its_own_readers_and_is_not_cached() {
    let (image, files) = small_files(4, 5000, true);
    let mut blob = std::fs::read(image.blob_path()).unwrap();
    let bad = image.bootstrap.chunk(ChunkIndex(1)).unwrap();
    blob[(bad.compressed_offset + u64::from(bad.compressed_size) / 2) as usize] ^= 0xff;
    std::fs::write(image.blob_path(), &blob).unwrap();

    let backend = Arc::new(CountingBackend::new(&image));
    let (f, metrics) = fetcher(&image, backend.clone(), settings(4, 0));
    assert_eq!(f.read(ino_of(&image, "f0"), 0, 8192).unwrap(), files[0]);
    assert_eq!(backend.calls().len(), 1);
    assert_eq!(backend.calls()[0].0, 0);
    // f0, f2 and f3 arrive; f1 is counted and left out.
    wait_cached(&f, 3);
    let cache = f.blob_caches[0].read().unwrap().upgrade().unwrap();
    assert!(!cache.is_present(1), "the corrupt neighbour was cached");
    assert!(cache.is_present(2) && cache.is_present(3));
    assert_eq!(metrics.snapshot().digest_errors, 1);

    assert_eq!(f.read(ino_of(&image, "f3"), 0, 8192).unwrap(), files[3]);
    assert_eq!(
        backend.calls().len(),
        1,
        "a good neighbour was fetched again"
    );
    // A reader of the bad chunk fetches it anew and gets the error.
    let err = f.read(ino_of(&image, "f1"), 0, 8192).unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&bad.digest.to_string()), "{err}");
    assert_eq!(backend.calls().len(), 2);
    assert_eq!(metrics.snapshot().digest_errors, 2);
}

#[test]
fn a_reader_of_a_neighbour_joins_the_request_in_flight() {
    let (image, files) = small_files(3, 1000, true);
    let backend = Arc::new(GatedBackend::new(&image));
    let (f, metrics) = fetcher(&image, backend.clone(), settings(4, 0));
    let neighbour = ChunkKey {
        blob: image.blob_digest,
        rel: 2,
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| f.read(ino_of(&image, "f0"), 0, 4096));
        wait_until("the neighbour to be in flight", || {
            f.ctx.inflight.contains(&neighbour)
        });
        let second = s.spawn(|| f.read(ino_of(&image, "f2"), 0, 4096));
        wait_until("the second reader to join", || {
            metrics.snapshot().inflight_joins == 1
        });
        backend.open();
        assert_eq!(first.join().unwrap().unwrap(), files[0]);
        assert_eq!(second.join().unwrap().unwrap(), files[2]);
    });
    assert_eq!(backend.inner.calls().len(), 1);
    let s = metrics.snapshot();
    assert_eq!((s.cache_misses, s.inflight_joins), (1, 1));
}

#[test]
fn a_backward_walk_gets_the_files_before_the_one_read() {
    let (image, files) = small_files(9, 1000, false);
    let backend = Arc::new(CountingBackend::new(&image));
    let mut s = settings(1, 0);
    s.merge_limit = 4500;
    let (f, _) = fetcher(&image, backend.clone(), s);
    for i in (0..9).rev() {
        assert_eq!(
            f.read(ino_of(&image, &file_name(i)), 0, 4096).unwrap(),
            files[i],
            "f{i}"
        );
    }
    // f8 brings f5..f7, f4 brings f1..f3: the limit is spent forwards
    // first, then backwards.
    assert_eq!(backend.calls(), vec![(5000, 4000), (1000, 4000), (0, 1000)]);
}

#[test]
fn a_chunk_leaves_memory_once_delivered_not_when_its_request_ends() {
    let (image, data) = one_file(8, false);
    let backend = Arc::new(CountingBackend::new(&image));
    // No readahead, so nothing is kept for readers to come.
    let (f, _) = fetcher(&image, backend.clone(), settings(8, 0));
    let ino = ino_of(&image, "f");
    // One request for all eight chunks, as a long readahead makes.
    let size = data.len() as u64;
    let mut job: Option<FetchJob> = None;
    for idx in 0..8 {
        let piece = f.piece(ino, idx, size).unwrap();
        let cache = f.blob_cache(&piece).unwrap();
        f.lead_into(&mut job, piece, cache);
    }
    f.pool.submit(Priority::Demand, Box::new(job.unwrap()));
    wait_cached(&f, 8);
    assert_eq!(backend.calls(), vec![(0, size)]);
    // Each chunk's buffer went back to the pool once it was delivered and
    // cached, and the next chunk of the request reused it; a job holding
    // its chunks to the end would have needed one buffer per chunk.
    let made = f.ctx.pool.made_count();
    assert!(made <= 2, "{made} buffers for one 8-chunk request");
    assert_eq!(f.read(ino, 0, 100).unwrap(), data[..100]);
}
