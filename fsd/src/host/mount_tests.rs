//! The host through a real FUSE mount (root only), in every mode: reads,
//! metrics, instances that come and go, remounts.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::tests::{mount, options, request, TestHost};
use super::*;
use crate::api::{ApiRequest, ApiResponse, DaemonControl};
use crate::fs::inode_map::{to_global, InstanceSeq};
use crate::testutil::{pattern, wait_until, ImageBuilder, TestImage};

fn skip() -> bool {
    let skip = !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists();
    if skip {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    skip
}

fn image(seed: u32) -> (TestImage, Vec<u8>) {
    let data = pattern(200_000 + seed as usize * 1000, seed);
    let mut b = ImageBuilder::new(64 * 1024, true);
    b.file("data/file", &data);
    b.file("small", format!("instance {seed}\n").as_bytes());
    (b.build(), data)
}

fn dir_source(image: &TestImage) -> String {
    format!("dir://{}", image.blob_dir.display())
}

/// The three ways a host serves: standalone (no API: starts at once),
/// dedicated and shared (managed).
#[derive(Clone, Copy, Debug)]
enum Way {
    Standalone,
    Dedicated,
    Shared,
}

const WAYS: [Way; 3] = [Way::Standalone, Way::Dedicated, Way::Shared];

/// A serving host and its mount; aborts the connection if the test panics,
/// so that nothing waits forever on a session that is going away.
struct Served {
    t: TestHost,
    mnt: tempfile::TempDir,
    way: Way,
    _cache: tempfile::TempDir,
}

impl Served {
    fn start(way: Way) -> Self {
        let mnt = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mode = match way {
            Way::Shared => DaemonMode::Shared,
            _ => DaemonMode::Dedicated,
        };
        let mut o = options(mode, mnt.path());
        o.api = !matches!(way, Way::Standalone);
        o.config.cache.dir = Some(cache.path().to_path_buf());
        o.config.fuse.threads = 4;
        let t = TestHost::new(o);
        if let Way::Shared = way {
            t.host.open_shared().unwrap();
        }
        Self {
            t,
            mnt,
            way,
            _cache: cache,
        }
    }

    /// Where instance `id` appears.
    fn at(&self, id: &str) -> PathBuf {
        match self.way {
            Way::Shared => self.mnt.path().join(id),
            _ => self.mnt.path().to_path_buf(),
        }
    }

    fn call(&self, request: ApiRequest) -> Result<ApiResponse, ControlError> {
        self.t.host.handle(request)
    }

    fn mount(&self, id: &str, image: &TestImage, seq: u32) -> Result<ApiResponse, ControlError> {
        self.call(mount(
            &self.at(id),
            request(&image.bootstrap_path, &dir_source(image), seq),
        ))
    }

    fn umount(&self, id: &str) -> Result<ApiResponse, ControlError> {
        self.call(ApiRequest::Umount {
            mountpoint: self.at(id),
        })
    }

    /// Unmounts and waits for the session to end, then stops the instances.
    fn stop(self) {
        self.t.host.unmount().unwrap();
        loop {
            match self.t.events.recv_timeout(Duration::from_secs(10)) {
                Ok(HostEvent::SessionEnded) => break,
                Ok(_) => continue,
                Err(e) => panic!("session did not end: {e}"),
            }
        }
        self.t.host.finish().unwrap();
        assert!(!crate::mount::is_mounted(self.mnt.path()));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.t.host.abort();
            let _ = nix::mount::umount2(self.mnt.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn every_way_serves_verified_reads_with_metrics_and_fixed_inodes() {
    if skip() {
        return;
    }
    let (image, data) = image(4);
    for way in WAYS {
        let s = Served::start(way);
        assert_eq!(s.mount("app", &image, 5), Ok(ApiResponse::Empty), "{way:?}");
        assert_eq!(s.t.host.state().get(), DaemonState::Running, "{way:?}");
        let root = s.at("app");
        assert_eq!(
            std::fs::read(root.join("data/file")).unwrap(),
            data,
            "{way:?}"
        );
        assert_eq!(
            std::fs::read(root.join("small")).unwrap(),
            b"instance 4\n",
            "{way:?}"
        );
        let Ok(ApiResponse::Access(access)) = s.call(ApiRequest::Access { id: None }) else {
            panic!("{way:?}: no access record");
        };
        assert_eq!(access.files, ["data/file", "small"], "{way:?}");
        let (chunks, chunk_bytes) = stored_chunks(&image, &["data/file", "small"]);
        assert_eq!(
            (access.chunks, access.chunk_bytes),
            (chunks, chunk_bytes),
            "{way:?}: the chunks read and their stored bytes"
        );
        let ino = std::fs::metadata(&root).unwrap().ino();
        let expected = match way {
            Way::Shared => {
                to_global(InstanceSeq::new(5).unwrap(), lode_common::format::Ino::ROOT)
                    .unwrap()
                    .0
            }
            _ => 1,
        };
        assert_eq!(ino, expected, "{way:?}: inode of the instance root");

        let Ok(ApiResponse::Daemon(info)) = s.call(ApiRequest::GetDaemon) else {
            panic!("{way:?}: no daemon info");
        };
        assert_eq!(info.instances.len(), 1, "{way:?}");
        assert_eq!(info.instances[0].seq, 5, "{way:?}");
        assert_eq!(info.instances[0].mountpoint, root, "{way:?}");
        let Ok(ApiResponse::FsMetrics(fs)) = s.call(ApiRequest::FsMetrics { id: None }) else {
            panic!("{way:?}: no fs metrics");
        };
        assert_eq!(fs.bytes_read, data.len() as u64 + 11, "{way:?}");
        assert!(fs.fops["read"].count > 0, "{way:?}");
        // Files are opened by the kernel without asking after the first
        // open, and their page cache is kept: opening and reading them again
        // sends no request at all. Opens for writing are refused.
        let fops = |name: &str| {
            let Ok(ApiResponse::FsMetrics(fs)) = s.call(ApiRequest::FsMetrics { id: None }) else {
                panic!("{way:?}: no fs metrics");
            };
            fs.fops.get(name).map_or(0, |c| c.count)
        };
        let before = (fops("open"), fops("read"), fops("release"));
        for _ in 0..10 {
            assert_eq!(std::fs::read(root.join("small")).unwrap(), b"instance 4\n");
            assert_eq!(
                std::fs::read(root.join("data/file")).unwrap().len(),
                data.len()
            );
        }
        assert!(before.0 <= 1, "{way:?}: {} opens sent", before.0);
        assert_eq!(
            (fops("open"), fops("read"), fops("release")),
            before,
            "{way:?}: (open, read, release) requests after reading ten times more"
        );
        for write in [
            std::fs::OpenOptions::new()
                .write(true)
                .open(root.join("small")),
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(root.join("small")),
        ] {
            let e = write.expect_err("opened for writing");
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{way:?}: {e}");
        }
        let backend = || match s.call(ApiRequest::BackendMetrics {
            id: Some(info.instances[0].id.clone()),
        }) {
            Ok(ApiResponse::BackendMetrics(be)) => be,
            other => panic!("{way:?}: {other:?}"),
        };
        assert!(backend().requests > 0, "{way:?}");
        // Chunks reach readers while their request still streams; its
        // latency is recorded when it ends.
        wait_until("every request's latency recorded", || {
            let be = backend();
            be.latency.counts.iter().sum::<u64>() == be.requests
        });
        assert!(matches!(
            s.call(ApiRequest::CacheMetrics {
                id: Some("other".into())
            }),
            Err(ControlError::NotFound(_))
        ));
        assert!(matches!(
            s.mount("app", &image, 5),
            Err(ControlError::Conflict(_))
        ));
        let statfs = nix::sys::statfs::statfs(&root).unwrap();
        assert!(statfs.blocks() > 0, "{way:?}: statfs reports the image");
        s.stop();
    }
}

/// A listing carries its entries' attributes, every batch of it: a walker
/// that opens the files it listed sends no lookup for them, only their reads.
/// The directory takes several batches (a batch holds about 190 entries with
/// attributes in a 32 KiB buffer).
#[test]
fn a_listing_answers_the_lookups_of_the_files_it_names_in_every_way() {
    if skip() {
        return;
    }
    const FILES: usize = 600;
    let mut b = ImageBuilder::new(64 * 1024, true);
    for i in 0..FILES {
        b.file(&format!("dir/f{i:04}"), format!("file {i}\n").as_bytes());
    }
    let image = b.build();
    for way in WAYS {
        let s = Served::start(way);
        assert_eq!(s.mount("app", &image, 5), Ok(ApiResponse::Empty), "{way:?}");
        let fops = |name: &str| {
            let Ok(ApiResponse::FsMetrics(fs)) = s.call(ApiRequest::FsMetrics { id: None }) else {
                panic!("{way:?}: no fs metrics");
            };
            fs.fops.get(name).map_or(0, |c| c.count)
        };
        let dir = s.at("app").join("dir");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), FILES, "{way:?}");
        let (lookups, reads) = (fops("lookup"), fops("read"));
        for (i, name) in names.iter().enumerate() {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                format!("file {i}\n").as_bytes(),
                "{way:?}: {name:?}"
            );
        }
        assert_eq!(
            fops("lookup") - lookups,
            0,
            "{way:?}: lookups sent for files a listing named"
        );
        assert_eq!(
            fops("read") - reads,
            FILES as u64,
            "{way:?}: one read per file"
        );
        s.stop();
    }
}

/// How many distinct chunks `files` of `image` have, and their stored bytes.
fn stored_chunks(image: &TestImage, files: &[&str]) -> (u64, u64) {
    use lode_common::format::{Bootstrap, Ino};
    let b = Bootstrap::open(&image.bootstrap_path).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for file in files {
        let mut ino = Ino::ROOT;
        for name in file.split('/') {
            ino = b.lookup(ino, name.as_bytes()).unwrap().unwrap().ino;
        }
        for i in 0..b.file_chunk_count(ino).unwrap() {
            let chunk = b.file_chunk(ino, i).unwrap();
            if seen.insert(chunk.0) {
                bytes += u64::from(b.chunk(chunk).unwrap().compressed_size);
            }
        }
    }
    (seen.len() as u64, bytes)
}

/// Reads one file over and over, counting wrong answers.
struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<u64>,
}

impl Reader {
    fn start(path: PathBuf, expected: Vec<u8>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
            std::thread::spawn(move || {
                let mut errors = 0;
                while !stop.load(Ordering::SeqCst) {
                    match std::fs::read(&path) {
                        Ok(d) if d == expected => {
                            reads.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => errors += 1,
                    }
                }
                errors
            })
        };
        Self {
            stop,
            reads,
            thread,
        }
    }

    /// Stops after at least two more complete reads; returns the errors.
    fn stop(self) -> u64 {
        let before = self.reads.load(Ordering::SeqCst);
        wait_until("two more reads", || {
            self.reads.load(Ordering::SeqCst) >= before + 2
        });
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn shared_instances_come_and_go_and_an_id_mounts_again_at_once() {
    if skip() {
        return;
    }
    let images: Vec<_> = (1..=3).map(image).collect();
    let s = Served::start(Way::Shared);
    let id = |i: usize| format!("i{i}");
    for (i, (image, _)) in images.iter().enumerate() {
        assert_eq!(s.mount(&id(i), image, i as u32 + 1), Ok(ApiResponse::Empty));
    }
    assert!(matches!(
        s.mount(&id(1), &images[1].0, 9),
        Err(ControlError::Conflict(_))
    ));
    let mut names: Vec<_> = std::fs::read_dir(s.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["i0", "i1", "i2"]);

    // Readers keep verifying the instances not being changed.
    let a = Reader::start(s.at("i0").join("data/file"), images[0].1.clone());
    let b = Reader::start(s.at("i2").join("data/file"), images[2].1.clone());
    // A file of i1 held open across its removal, its data not yet read
    // (what the kernel has cached stays readable).
    let held = std::fs::File::open(s.at("i1").join("data/file")).unwrap();
    assert_eq!(
        std::fs::read(s.at("i1").join("small")).unwrap(),
        b"instance 2\n"
    );
    assert_eq!(s.umount(&id(1)), Ok(ApiResponse::Empty));
    assert!(matches!(s.umount(&id(1)), Err(ControlError::NotFound(_))));
    let mut buf = [0u8; 4];
    let stale = std::os::unix::fs::FileExt::read_at(&held, &mut buf, 0).unwrap_err();
    assert_eq!(stale.raw_os_error(), Some(libc::ESTALE), "{stale}");
    drop(held);
    // Mounted again under the same id (another seq, another image), with
    // the kernel's entry of the old one still cached: readable at once.
    assert_eq!(s.mount(&id(1), &images[2].0, 4), Ok(ApiResponse::Empty));
    assert_eq!(
        std::fs::read(s.at("i1").join("small")).unwrap(),
        b"instance 3\n"
    );
    let ino = std::fs::metadata(s.at("i1")).unwrap().ino();
    assert_eq!(ino >> crate::fs::inode_map::LOCAL_BITS, 4);
    assert_eq!(b.stop(), 0, "reads of i2 failed");
    assert_eq!(s.umount(&id(2)), Ok(ApiResponse::Empty));
    assert_eq!(a.stop(), 0, "reads of i0 failed");
    assert_eq!(s.umount(&id(0)), Ok(ApiResponse::Empty));
    let Ok(ApiResponse::FsMetrics(m)) = s.call(ApiRequest::FsMetrics { id: None }) else {
        panic!("no metrics for the only instance");
    };
    assert_eq!(m.id, "i1");
    assert_eq!(s.umount(&id(1)), Ok(ApiResponse::Empty));
    let Ok(ApiResponse::Daemon(info)) = s.call(ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert!(info.instances.is_empty());
    s.stop();
}

#[test]
fn remount_swaps_the_blob_source_and_keeps_the_instance_in_every_way() {
    if skip() {
        return;
    }
    for way in WAYS {
        let (image, data) = image(7);
        let s = Served::start(way);
        assert_eq!(s.mount("app", &image, 9), Ok(ApiResponse::Empty));
        // Move the blobs: only the new source can serve the (uncached) file.
        let moved = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&image.blob_dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::rename(entry.path(), moved.path().join(entry.file_name())).unwrap();
        }
        let mut new_request = request(
            &image.bootstrap_path,
            &format!("dir://{}", moved.path().display()),
            9,
        );
        new_request.image_ref = Some("moved".into());
        let remount = |mountpoint: PathBuf, request: MountRequest| {
            s.call(ApiRequest::Remount {
                mountpoint,
                request,
            })
        };
        assert_eq!(
            remount(s.at("app"), new_request.clone()),
            Ok(ApiResponse::Empty),
            "{way:?}"
        );
        assert_eq!(
            std::fs::read(s.at("app").join("data/file")).unwrap(),
            data,
            "{way:?}"
        );
        let Ok(ApiResponse::Daemon(info)) = s.call(ApiRequest::GetDaemon) else {
            panic!("no daemon info");
        };
        assert_eq!(info.instances[0].image_ref.as_deref(), Some("moved"));
        let mut other_seq = new_request.clone();
        other_seq.seq = 10;
        assert!(matches!(
            remount(s.at("app"), other_seq),
            Err(ControlError::InvalidArgument(_))
        ));
        if let Way::Shared = way {
            assert!(matches!(
                remount(s.at("nope"), new_request),
                Err(ControlError::NotFound(_))
            ));
        }
        s.stop();
    }
}
