//! The prefetch list: fetched in list order, never in the way of readers.

use std::collections::HashMap;

use super::tests::{fetcher, ino_of, settings, CS};
use super::*;
use crate::testutil::{
    pattern, wait_until, CountingBackend, GatedBackend, ImageBuilder, TestImage,
};

/// Files a, b, c, d of two raw chunks each, in that order in one blob, with
/// `listed` as the prefetch list.
fn four_files(listed: &[&str]) -> TestImage {
    let mut b = ImageBuilder::new(CS, false);
    let mut ids = HashMap::new();
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        ids.insert(name, b.file(name, &pattern(2 * CS as usize, i as u32)));
    }
    for name in listed {
        b.prefetch(ids[name]);
    }
    b.build()
}

/// Chunks of the image's blobs in the cache.
fn cached_chunks(f: &Fetcher) -> usize {
    f.blob_caches
        .iter()
        .filter_map(|c| c.read().unwrap().upgrade())
        .map(|c| c.present_count())
        .sum()
}

/// Where file `name`'s chunks lie in the blob.
fn file_range(image: &TestImage, name: &str) -> (u64, u64) {
    let b = &image.bootstrap;
    let ino = ino_of(image, name);
    let first = b.chunk(b.file_chunk(ino, 0).unwrap()).unwrap();
    let last = b.chunk(b.file_chunk(ino, 1).unwrap()).unwrap();
    (
        first.compressed_offset,
        last.compressed_offset + u64::from(last.compressed_size),
    )
}

/// `image`'s prefetch, started with `s` on a counting backend; returns once
/// `chunks` chunks are cached.
fn prefetched(
    image: &TestImage,
    s: FetchSettings,
    chunks: usize,
) -> (Arc<CountingBackend>, Arc<Fetcher>, Arc<Metrics>) {
    let backend = Arc::new(CountingBackend::new(image));
    let (f, metrics) = fetcher(image, backend.clone(), s);
    let f = Arc::new(f);
    Fetcher::start_prefetch(&f).unwrap();
    wait_until("the listed chunks to be cached", || {
        cached_chunks(&f) == chunks
    });
    (backend, f, metrics)
}

/// A prefetch of `listed` (see [`four_files`]) started with `s`, whose
/// request for c hangs until the backend is opened; returns once that
/// request is under way.
struct HeldPrefetch {
    image: TestImage,
    backend: Arc<GatedBackend>,
    f: Arc<Fetcher>,
    metrics: Arc<Metrics>,
    c: (u64, u64),
}

fn prefetch_with_c_held(listed: &[&str], s: FetchSettings) -> HeldPrefetch {
    let image = four_files(listed);
    let c = file_range(&image, "c");
    let backend = Arc::new(GatedBackend::holding(&image, c.0..c.1));
    let (f, metrics) = fetcher(&image, backend.clone(), s);
    let f = Arc::new(f);
    Fetcher::start_prefetch(&f).unwrap();
    wait_until("the prefetch of c to be under way", || {
        backend.started().first() == Some(&c.0)
    });
    HeldPrefetch {
        image,
        backend,
        f,
        metrics,
        c,
    }
}

/// Two workers, one of which may run background jobs.
fn one_background_worker() -> FetchSettings {
    let mut s = settings(2, 0);
    s.workers = 2;
    s.background_workers = 1;
    s
}

#[test]
fn the_prefetch_list_is_fetched_in_its_order_before_any_read() {
    let image = four_files(&["c", "a"]);
    let (backend, f, metrics) = prefetched(&image, settings(2, 0), 4);
    let range = |name| {
        let (start, end) = file_range(&image, name);
        (start, end - start)
    };
    assert_eq!(backend.calls(), [range("c"), range("a")]);
    assert_eq!(metrics.snapshot().prefetch_requests, 2);
    for (name, seed) in [("c", 2), ("a", 0)] {
        let data = f.read(ino_of(&image, name), 0, 2 * CS).unwrap();
        assert_eq!(data, pattern(2 * CS as usize, seed), "{name}");
    }
    assert_eq!(metrics.snapshot().cache_misses, 0);
    assert_eq!(backend.calls().len(), 2, "listed files read from the cache");
}

#[test]
fn a_list_that_alternates_blobs_takes_one_request_per_blob() {
    // a1, a2 in the first blob and b1, b2 in the second, each laid out in
    // list order; the list alternates between the blobs.
    let mut b = ImageBuilder::new(CS, false);
    let a1 = b.file("a1", &pattern(CS as usize, 1));
    let a2 = b.file("a2", &pattern(CS as usize, 2));
    b.next_blob();
    let b1 = b.file("b1", &pattern(CS as usize, 3));
    let b2 = b.file("b2", &pattern(CS as usize, 4));
    for id in [a1, b1, a2, b2] {
        b.prefetch(id);
    }
    let image = b.build();
    let (backend, f, metrics) = prefetched(&image, settings(4, 0), 4);
    let cs = u64::from(CS);
    assert_eq!(
        backend.calls(),
        [(0, 2 * cs), (0, 2 * cs)],
        "each blob's two files in one request, not a request per file"
    );
    assert_eq!(metrics.snapshot().prefetch_requests, 2);
    for (name, seed) in [("a1", 1), ("b1", 3), ("a2", 2), ("b2", 4)] {
        let data = f.read(ino_of(&image, name), 0, CS).unwrap();
        assert_eq!(data, pattern(CS as usize, seed), "{name}");
    }
    assert_eq!(
        metrics.snapshot().cache_misses,
        0,
        "all read from the cache"
    );
}

#[test]
fn only_the_listed_chunks_of_a_file_are_prefetched() {
    let mut b = ImageBuilder::new(CS, false);
    let a = b.file("a", &pattern(3 * CS as usize, 0));
    let c = b.file("c", &pattern(3 * CS as usize, 2));
    b.prefetch_chunks(c, 2..3);
    b.prefetch_chunks(a, 0..1);
    let image = b.build();
    let (backend, f, metrics) = prefetched(&image, settings(2, 0), 2);
    let chunk = |name, idx| {
        let bs = &image.bootstrap;
        let rec = bs
            .chunk(bs.file_chunk(ino_of(&image, name), idx).unwrap())
            .unwrap();
        (rec.compressed_offset, u64::from(rec.compressed_size))
    };
    assert_eq!(backend.calls(), [chunk("c", 2), chunk("a", 0)]);
    assert_eq!(metrics.snapshot().prefetch_requests, 2);
    let tail = f.read(ino_of(&image, "c"), 2 * u64::from(CS), CS).unwrap();
    assert_eq!(tail, pattern(3 * CS as usize, 2)[2 * CS as usize..]);
    assert_eq!(
        metrics.snapshot().cache_misses,
        0,
        "the listed chunk was cached"
    );
}

#[test]
fn a_read_is_not_delayed_behind_the_prefetch() {
    let HeldPrefetch {
        image,
        backend,
        f,
        c: (_, c_end),
        ..
    } = prefetch_with_c_held(&["c", "d"], one_background_worker());
    // c's request hangs; d waits behind it for the background worker. A
    // reader of b is served by the other worker meanwhile.
    let start = Instant::now();
    let data = f.read(ino_of(&image, "b"), 0, 2 * CS).unwrap();
    assert_eq!(data, pattern(2 * CS as usize, 1));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        !backend.started().iter().any(|&o| o >= c_end),
        "d waits for the background worker"
    );
    backend.open();
    wait_until("the rest of the list to be cached", || {
        cached_chunks(&f) == 6
    });
}

#[test]
fn a_reader_of_a_queued_prefetch_request_does_not_wait_for_the_ones_before_it() {
    // One background job at a time: a's request is queued behind c's, which
    // hangs.
    let HeldPrefetch {
        image,
        backend,
        f,
        metrics,
        c: (c_start, _),
    } = prefetch_with_c_held(&["c", "a"], one_background_worker());
    let (a_start, _) = file_range(&image, "a");
    // The list is queued on a thread of its own: a's request too, before a is read.
    wait_until("a's request to be queued", || {
        metrics.snapshot().prefetch_requests == 2
    });
    let data = f.read(ino_of(&image, "a"), 0, 2 * CS).unwrap();
    assert_eq!(data, pattern(2 * CS as usize, 0));
    assert_eq!(
        backend.started(),
        [c_start, a_start],
        "a's queued request ran while c's still hung, and no other was made"
    );
    assert_eq!(metrics.snapshot().inflight_joins, 2, "the reader joined it");
    backend.open();
    wait_until("the list to be cached", || cached_chunks(&f) == 4);
}

#[test]
fn a_prefetch_runs_at_a_lower_priority_until_a_reader_waits_for_it() {
    if !crate::read::workers::can_renice(10) {
        eprintln!(
            "skipped: this process may not raise a thread's priority again \
             (needs root or CAP_SYS_NICE), so background fetches run at 0"
        );
        return;
    }
    // c is listed and its request held; a is read without being listed.
    let HeldPrefetch {
        image,
        backend,
        f,
        metrics,
        c: (c_start, _),
    } = prefetch_with_c_held(&["c"], settings(2, 0));
    let (a_start, _) = file_range(&image, "a");
    let data = f.read(ino_of(&image, "a"), 0, CS).unwrap();
    assert_eq!(data, pattern(CS as usize, 0)[..]);
    // A reader of c joins the held prefetch.
    let reader = {
        let f = Arc::clone(&f);
        let ino = ino_of(&image, "c");
        std::thread::spawn(move || f.read(ino, 0, 2 * CS))
    };
    wait_until("the reader to join the prefetch", || {
        metrics.snapshot().inflight_joins >= 1
    });
    backend.open();
    let data = reader.join().unwrap().unwrap();
    assert_eq!(data, pattern(2 * CS as usize, 2));
    // The reader may have its chunks before the backend call returns.
    wait_until("both requests to be recorded", || {
        backend.nices().len() == 2
    });
    let nices = backend.nices();
    let of = |offset| {
        nices
            .iter()
            .find(|n| n.0 == offset)
            .map(|n| (n.1, n.2))
            .unwrap_or_else(|| panic!("no request at {offset}: {nices:?}"))
    };
    // The workers started with this thread's niceness.
    let base = crate::read::workers::thread_nice();
    assert_eq!(of(a_start), (base, base), "a reader's own fetch");
    assert_eq!(
        of(c_start),
        ((base + 10).min(19), base),
        "the prefetch ran 10 nicer until the reader waited for it"
    );
}

#[test]
fn a_reader_of_listed_chunks_gets_no_readahead_past_them() {
    // One file of 8 chunks, of which the list names the first 3.
    let mut b = ImageBuilder::new(CS, false);
    let data = pattern(8 * CS as usize, 7);
    let listed = b.file("f", &data);
    b.prefetch_chunks(listed, 0..3);
    let image = b.build();
    let (backend, f, metrics) = prefetched(&image, settings(2, 8), 3);
    let ino = ino_of(&image, "f");
    let chunk = |i: usize| &data[i * CS as usize..][..CS as usize];
    for i in 0..3 {
        let read = f.read(ino, i as u64 * u64::from(CS), CS).unwrap();
        assert_eq!(read, chunk(i), "chunk {i}");
    }
    let after_list = metrics.snapshot();
    assert_eq!(
        (after_list.readahead_requests, after_list.cache_misses),
        (0, 0),
        "reading the listed chunks in order fetched nothing more"
    );
    assert_eq!(backend.calls().len(), 2, "the list's two requests alone");
    // Past the list the reader misses, and readahead goes on from there.
    for i in 3..5 {
        let read = f.read(ino, i as u64 * u64::from(CS), CS).unwrap();
        assert_eq!(read, chunk(i), "chunk {i}");
    }
    wait_until("readahead past the listed chunks", || {
        metrics.snapshot().readahead_requests >= 1
    });
}
