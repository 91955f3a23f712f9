//! Shared mode through a real FUSE mount (root only): instances added and
//! removed through the API while readers keep reading the others.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use lode_common::api::{DaemonMode, InstanceConfig, MountRequest};
use lode_config::FsdConfig;

use crate::api::{ApiRequest, ApiResponse, ControlError, DaemonControl};
use crate::daemon::Event;
use crate::inode_map::{to_global, InstanceSeq};
use crate::instances::{Host, HostEvent, HostOptions};
use crate::testutil::{pattern, ImageBuilder, TestImage};

fn image(seed: u32) -> (TestImage, Vec<u8>) {
    let data = pattern(200_000 + seed as usize * 1000, seed);
    let mut b = ImageBuilder::new(64 * 1024, true);
    b.file("data/file", &data);
    b.file("small", format!("instance {seed}\n").as_bytes());
    (b.build(), data)
}

fn mount_request(image: &TestImage, seq: u32) -> MountRequest {
    MountRequest {
        source: image.bootstrap_path.clone(),
        config: InstanceConfig {
            blob_source: format!("dir://{}", image.blob_dir.display()),
            plain_http: false,
            docker_config: None,
        },
        seq,
        image_ref: None,
    }
}

fn call(host: &Host, request: ApiRequest) -> Result<ApiResponse, ControlError> {
    host.handle(request)
}

/// Aborts the mount's FUSE connection if the test panics, so that readers
/// and the kernel do not wait forever on a session that is going away.
struct AbortOnPanic(std::path::PathBuf);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(dev) = crate::mount::mounted_dev(&self.0) {
                let _ = crate::mount::abort_connection(dev);
            }
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Reads one file over and over, counting wrong answers.
struct Reader {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<u64>,
}

impl Reader {
    fn start(path: std::path::PathBuf, expected: Vec<u8>) -> Self {
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
        crate::testutil::wait_until("two more reads", || {
            self.reads.load(Ordering::SeqCst) >= before + 2
        });
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn instances_come_and_go_while_others_are_read() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping instances_come_and_go_while_others_are_read: needs root and /dev/fuse");
        return;
    }
    let images: Vec<_> = (1..=3).map(image).collect();
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut config = FsdConfig::default();
    config.cache.dir = Some(cache.path().to_path_buf());
    config.fuse.threads = 4;
    let (events, received) = mpsc::channel();
    let host = Arc::new(Host::new(
        HostOptions {
            id: "shared".into(),
            mode: DaemonMode::Shared,
            mountpoint: mnt.path().to_path_buf(),
            config,
            supervisor: None,
            takeover: false,
        },
        events,
        None,
    ));
    host.start_shared().unwrap();
    let _abort = AbortOnPanic(mnt.path().to_path_buf());
    let at = |id: &str| mnt.path().join(id);
    let mount = |i: usize| {
        call(
            &host,
            ApiRequest::Mount {
                mountpoint: at(&format!("i{i}")),
                request: mount_request(&images[i].0, i as u32 + 1),
            },
        )
    };
    let umount = |i: usize| {
        call(
            &host,
            ApiRequest::Umount {
                mountpoint: at(&format!("i{i}")),
            },
        )
    };
    for i in 0..3 {
        assert_eq!(mount(i), Ok(ApiResponse::Empty));
    }
    assert!(matches!(mount(1), Err(ControlError::Conflict(_))));
    let mut names: Vec<_> = std::fs::read_dir(mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["i0", "i1", "i2"]);
    let Ok(ApiResponse::Daemon(info)) = call(&host, ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    let listed: Vec<_> = info
        .instances
        .iter()
        .map(|i| (i.id.as_str(), i.seq))
        .collect();
    assert_eq!(listed, [("i0", 1), ("i1", 2), ("i2", 3)]);
    assert_eq!(info.instances[1].mountpoint, at("i1"));
    // Inode numbers are the documented function of (seq, bootstrap inode).
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(at("i1")).unwrap());
    let seq2 = InstanceSeq::new(2).unwrap();
    assert_eq!(
        ino,
        to_global(seq2, lode_common::format::Ino::ROOT).unwrap().0
    );

    // Readers keep verifying the instances not being changed: i0 throughout,
    // i2 while i1 goes and comes back, the new i1 while i2 and i0 go.
    let a = Reader::start(at("i0").join("data/file"), images[0].1.clone());
    let b = Reader::start(at("i2").join("data/file"), images[2].1.clone());
    assert_eq!(umount(1), Ok(ApiResponse::Empty));
    assert!(matches!(umount(1), Err(ControlError::NotFound(_))));
    assert!(std::fs::read(at("i1").join("small")).is_err());
    assert_eq!(mount(1), Ok(ApiResponse::Empty));
    assert_eq!(b.stop(), 0, "reads of i2 failed");
    let c = Reader::start(at("i1").join("data/file"), images[1].1.clone());
    assert_eq!(umount(2), Ok(ApiResponse::Empty));
    assert_eq!(
        std::fs::read(at("i1").join("small")).unwrap(),
        b"instance 2\n"
    );
    assert_eq!(a.stop(), 0, "reads of i0 failed");
    assert_eq!(umount(0), Ok(ApiResponse::Empty));
    assert_eq!(c.stop(), 0, "reads of i1 failed");
    let Ok(ApiResponse::FsMetrics(m)) = call(&host, ApiRequest::FsMetrics { id: None }) else {
        panic!("no metrics for the only instance");
    };
    assert_eq!(m.id, "i1");
    // The first complete read of the new i1 went through FUSE.
    assert!(m.bytes_read >= images[1].1.len() as u64);
    assert_eq!(umount(1), Ok(ApiResponse::Empty));
    let Ok(ApiResponse::Daemon(info)) = call(&host, ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert!(info.instances.is_empty());

    host.unmount_all().unwrap();
    loop {
        match received.recv_timeout(Duration::from_secs(10)) {
            Ok(HostEvent::Daemon(Event::SessionEnded)) => break,
            Ok(_) => continue,
            Err(e) => panic!("session did not end: {e}"),
        }
    }
    host.finish().unwrap();
}

#[test]
fn remount_swaps_the_blob_source_and_keeps_the_instance() {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping remount_swaps_the_blob_source_and_keeps_the_instance: needs root and /dev/fuse");
        return;
    }
    let (image, data) = image(7);
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut config = FsdConfig::default();
    config.cache.dir = Some(cache.path().to_path_buf());
    let (events, received) = mpsc::channel();
    let host = Host::new(
        HostOptions {
            id: "shared".into(),
            mode: DaemonMode::Shared,
            mountpoint: mnt.path().to_path_buf(),
            config,
            supervisor: None,
            takeover: false,
        },
        events,
        None,
    );
    host.start_shared().unwrap();
    let _abort = AbortOnPanic(mnt.path().to_path_buf());
    let at = mnt.path().join("app");
    let request = mount_request(&image, 9);
    assert_eq!(
        call(
            &host,
            ApiRequest::Mount {
                mountpoint: at.clone(),
                request: request.clone(),
            }
        ),
        Ok(ApiResponse::Empty)
    );
    // Move the blobs: only the new source can serve the (uncached) file.
    let moved = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&image.blob_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::rename(entry.path(), moved.path().join(entry.file_name())).unwrap();
    }
    let mut new_request = request.clone();
    new_request.config.blob_source = format!("dir://{}", moved.path().display());
    new_request.image_ref = Some("moved".into());
    assert_eq!(
        call(
            &host,
            ApiRequest::Remount {
                mountpoint: at.clone(),
                request: new_request.clone(),
            }
        ),
        Ok(ApiResponse::Empty)
    );
    assert_eq!(std::fs::read(at.join("data/file")).unwrap(), data);
    let Ok(ApiResponse::Daemon(info)) = call(&host, ApiRequest::GetDaemon) else {
        panic!("no daemon info");
    };
    assert_eq!(info.instances[0].image_ref.as_deref(), Some("moved"));
    let mut other_seq = new_request.clone();
    other_seq.seq = 10;
    assert!(matches!(
        call(
            &host,
            ApiRequest::Remount {
                mountpoint: at.clone(),
                request: other_seq,
            }
        ),
        Err(ControlError::InvalidArgument(_))
    ));
    assert!(matches!(
        call(
            &host,
            ApiRequest::Remount {
                mountpoint: mnt.path().join("nope"),
                request: new_request,
            }
        ),
        Err(ControlError::NotFound(_))
    ));

    host.unmount_all().unwrap();
    loop {
        match received.recv_timeout(Duration::from_secs(10)) {
            Ok(HostEvent::Daemon(Event::SessionEnded)) => break,
            Ok(_) => continue,
            Err(e) => panic!("session did not end: {e}"),
        }
    }
    host.finish().unwrap();
}
