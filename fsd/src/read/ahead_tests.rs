//! Fronts fetched ahead: served from memory as they fill, the rest from the
//! source, and gone once served.

use super::*;
use crate::read::workers::can_renice;
use crate::testutil::{
    pattern, wait_until, CountingBackend, GatedBackend, ImageBuilder, TestImage,
};
use lode_common::format::BlobIndex;

/// One blob of 1 MiB of raw chunks.
fn image() -> (TestImage, BlobRecord) {
    let mut b = ImageBuilder::new(64 << 10, false);
    b.file("f", &pattern(1 << 20, 7));
    let image = b.build();
    let blob = image.bootstrap.blob(BlobIndex(0)).unwrap();
    (image, blob)
}

fn front(blob: &BlobRecord, bytes: u64) -> BlobFront {
    BlobFront {
        digest: blob.digest,
        size: blob.compressed_size,
        bytes,
    }
}

fn over(ahead: Arc<Ahead>, inner: Arc<dyn BlobBackend>) -> AheadBackend {
    AheadBackend {
        ahead,
        inner,
        metrics: Arc::new(Metrics::new()),
    }
}

/// A front of `bytes` of `image`'s blob fetched ahead from `fetching`, in
/// requests of `request` bytes on `threads` threads, and an instance's
/// backend in front of a source that counts its requests.
fn fetched_ahead(
    image: &TestImage,
    blob: &BlobRecord,
    fetching: Arc<dyn BlobBackend>,
    (bytes, request, threads): (u64, u64, usize),
    rt: &tokio::runtime::Runtime,
) -> (AheadBackend, Arc<CountingBackend>) {
    let ahead = Arc::new(Ahead::new(u64::MAX, 0));
    ahead
        .fetch(
            fetching,
            &[front(blob, bytes)],
            request,
            threads,
            rt.handle(),
        )
        .unwrap();
    let source = Arc::new(CountingBackend::new(image));
    (over(ahead, source.clone()), source)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn read(backend: &dyn BlobBackend, blob: &BlobRecord, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    backend
        .read_range(blob, offset, len, &mut |piece| out.extend_from_slice(piece))
        .unwrap();
    out
}

fn blob_bytes(image: &TestImage) -> Vec<u8> {
    std::fs::read(image.blob_path()).unwrap()
}

#[test]
fn ranges_of_a_front_come_from_memory_and_the_rest_from_the_source() {
    let (image, blob) = image();
    let rt = runtime();
    let fetching = Arc::new(CountingBackend::new(&image));
    let sizes = (600 << 10, 256 << 10, 2);
    let (backend, source) = fetched_ahead(&image, &blob, fetching.clone(), sizes, &rt);
    let whole = blob_bytes(&image);
    // Across two of the front's requests.
    assert_eq!(
        read(&backend, &blob, 100 << 10, 300 << 10),
        whole[100 << 10..400 << 10]
    );
    assert!(source.calls().is_empty(), "{:?}", source.calls());
    // Its end and past it: the rest from the source, in one request.
    assert_eq!(
        read(&backend, &blob, 500 << 10, 200 << 10),
        whole[500 << 10..700 << 10]
    );
    assert_eq!(source.calls(), vec![(600 << 10, 100 << 10)]);
    let served = backend.metrics.snapshot().ahead_bytes;
    assert_eq!(served, (300 << 10) + (100 << 10));
    let mut asked = fetching.calls();
    asked.sort_unstable();
    assert_eq!(
        asked,
        vec![
            (0, 256 << 10),
            (256 << 10, 256 << 10),
            (512 << 10, 88 << 10)
        ]
    );
}

#[test]
fn a_segment_goes_once_all_its_bytes_were_served() {
    let (image, blob) = image();
    let rt = runtime();
    let fetching = Arc::new(CountingBackend::new(&image));
    let (backend, source) = fetched_ahead(&image, &blob, fetching, (256 << 10, 128 << 10, 1), &rt);
    let ahead = Arc::clone(&backend.ahead);
    let segments: Vec<Weak<Segment>> = lock(&ahead.segments)
        .values()
        .flatten()
        .map(Arc::downgrade)
        .collect();
    assert_eq!(segments.len(), 2);
    read(&backend, &blob, 0, 128 << 10);
    assert_eq!(Ahead::held(&lock(&ahead.segments)), 128 << 10);
    read(&backend, &blob, 128 << 10, 128 << 10);
    assert_eq!(Ahead::held(&lock(&ahead.segments)), 0);
    // Their bytes go too, long before the time a front is kept for.
    wait_until("the served segments' bytes to go", || {
        segments.iter().all(|s| s.upgrade().is_none())
    });
    // Asked again: from the source.
    read(&backend, &blob, 0, 64 << 10);
    assert_eq!(source.calls(), vec![(0, 64 << 10)]);
}

#[test]
fn at_most_the_limit_is_fetched_and_a_front_held_is_not_asked_again() {
    let (image, blob) = image();
    let rt = runtime();
    let ahead = Arc::new(Ahead::new(300 << 10, 0));
    let fetching = Arc::new(CountingBackend::new(&image));
    let fronts = [front(&blob, 1 << 20)];
    ahead
        .fetch(fetching.clone(), &fronts, 256 << 10, 1, rt.handle())
        .unwrap();
    ahead
        .fetch(fetching.clone(), &fronts, 256 << 10, 1, rt.handle())
        .unwrap();
    wait_until("the front's requests", || fetching.calls().len() == 2);
    let mut asked = fetching.calls();
    asked.sort_unstable();
    assert_eq!(asked, vec![(0, 256 << 10), (256 << 10, 44 << 10)]);
}

#[test]
fn a_reader_gets_bytes_as_they_arrive_and_the_source_the_rest_of_a_failed_front() {
    let (image, blob) = image();
    let rt = runtime();
    let gated = Arc::new(GatedBackend::new(&image));
    let sizes = (512 << 10, 512 << 10, 1);
    let (backend, source) = fetched_ahead(&image, &blob, gated.clone(), sizes, &rt);
    let backend = Arc::new(backend);
    let reader = {
        let backend = Arc::clone(&backend);
        std::thread::spawn(move || read(&*backend, &blob, 0, 512 << 10))
    };
    wait_until("the front's request", || gated.started().len() == 1);
    assert!(!reader.is_finished(), "the reader waits for the front");
    gated.open();
    assert_eq!(reader.join().unwrap(), blob_bytes(&image)[..512 << 10]);
    assert!(source.calls().is_empty());

    // A front whose request fails half-way: the source gets the rest.
    let (image_b, _) = self::image();
    std::fs::write(image_b.blob_path(), &blob_bytes(&image)[..256 << 10]).unwrap();
    let failing = Arc::new(CountingBackend::new(&image_b));
    let (backend, source) = fetched_ahead(&image, &blob, failing, (1 << 20, 1 << 20, 1), &rt);
    assert_eq!(read(&backend, &blob, 0, 1 << 20), blob_bytes(&image));
    assert_eq!(source.calls(), vec![(256 << 10, 768 << 10)]);
}

#[test]
fn a_front_is_fetched_nicer_than_the_daemon_until_an_instance_takes_from_it() {
    if !can_renice(10) {
        eprintln!("skipped: this process may not give a thread its priority back (CAP_SYS_NICE)");
        return;
    }
    let (image, blob) = image();
    let rt = runtime();
    let ahead = Arc::new(Ahead::new(u64::MAX, 10));
    let gated = Arc::new(GatedBackend::new(&image));
    ahead
        .fetch(
            gated.clone(),
            &[front(&blob, 512 << 10)],
            512 << 10,
            1,
            rt.handle(),
        )
        .unwrap();
    let backend = Arc::new(over(ahead, Arc::new(CountingBackend::new(&image))));
    wait_until("the front's request", || gated.started().len() == 1);
    let reader = {
        let backend = Arc::clone(&backend);
        std::thread::spawn(move || read(&*backend, &blob, 0, 512 << 10))
    };
    wait_until("the reader to wait", || {
        backend.ahead.segments.lock().unwrap()[&blob.digest][0]
            .wanted
            .load(Ordering::Relaxed)
    });
    gated.open();
    reader.join().unwrap();
    // The reader may have its bytes before the request records its thread's
    // niceness after handing them over.
    wait_until("the request to hand over bytes", || {
        !gated.nices().is_empty()
    });
    let base = crate::read::workers::thread_nice();
    assert_eq!(gated.nices(), vec![(0, base + 10, base)]);
}
