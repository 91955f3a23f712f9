use super::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::testutil::{pattern, ImageBuilder, TestImage};

const CS: u32 = 64 * 1024;

/// Why this machine cannot run a real mount, if it cannot.
fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse");
    }
    None
}

/// getxattr(2) on a path: `None` when the attribute is absent.
fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and live across the call; the
    // buffer pointer and length describe `buf`.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENODATA), "getxattr: {err}");
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn listxattr(path: &Path) -> Vec<u8> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `getxattr`.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf
}

fn image() -> (TestImage, Vec<u8>) {
    let big = pattern(40 * CS as usize + 123, 9);
    let mut b = ImageBuilder::new(CS, true);
    let hosts = b.file("etc/hosts", b"127.0.0.1 localhost\n");
    b.hardlink("etc/hosts.link", hosts);
    b.xattr(hosts, "user.origin", b"lode");
    b.symlink("etc/localtime", "/usr/share/zoneinfo/UTC");
    b.file("usr/bin/big", &big);
    b.dir("var/empty");
    (b.build(), big)
}

#[test]
fn mounts_serves_and_unmounts() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping mounts_serves_and_unmounts: {reason}");
        return;
    }
    let (image, big) = image();
    let mnt = tempfile::tempdir().unwrap();
    let mut config = FsdConfig::default();
    config.cache.dir = Some(image.cache_dir.clone());
    config.fuse.threads = 2;
    config.fetch.workers = 2;
    let (events, received) = mpsc::channel();
    let daemon = Daemon::start(
        DaemonOptions {
            bootstrap: image.bootstrap_path.clone(),
            blob_source: BlobSource::Dir(image.blob_dir.clone()),
            mountpoint: mnt.path().to_path_buf(),
            config,
            seq: 1,
            image_ref: None,
        },
        events,
    )
    .unwrap();
    let m = mnt.path();
    assert!(mount::is_mounted(m, "lode"), "not in mountinfo");

    assert_eq!(std::fs::metadata(m).unwrap().ino(), 1);
    assert_eq!(std::fs::read(m.join("usr/bin/big")).unwrap(), big);
    assert_eq!(
        std::fs::read(m.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    let hosts = std::fs::metadata(m.join("etc/hosts")).unwrap();
    let link = std::fs::metadata(m.join("etc/hosts.link")).unwrap();
    assert_eq!(hosts.ino(), link.ino());
    assert_eq!(hosts.nlink(), 2);
    assert_eq!(hosts.len(), 20);
    assert_eq!(hosts.permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        std::fs::read_link(m.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(
        getxattr(&m.join("etc/hosts"), "user.origin").unwrap(),
        b"lode"
    );
    assert_eq!(getxattr(&m.join("etc/hosts"), "user.absent"), None);
    assert_eq!(listxattr(&m.join("etc/hosts")), b"user.origin\0");
    let mut names: Vec<_> = std::fs::read_dir(m.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hosts", "hosts.link", "localtime"]);
    assert!(std::fs::read_dir(m.join("var/empty"))
        .unwrap()
        .next()
        .is_none());
    let err = std::fs::File::create(m.join("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        std::fs::metadata(m.join("nope")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    let snapshot = daemon.metrics().snapshot();
    assert!(snapshot.bytes_read >= big.len() as u64, "{snapshot:?}");
    assert!(snapshot.fops["lookup"].count > 0);

    daemon.unmount().unwrap();
    let ended = received.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(ended, Event::SessionEnded), "{ended:?}");
    daemon.wait().unwrap();
    assert!(!mount::is_mounted(m, "lode"));

    // The final flush made what was read durable for the next daemon.
    let blob = image
        .bootstrap
        .blob(lode_common::format::BlobIndex(0))
        .unwrap();
    let chunks: Vec<_> = (0..blob.chunk_count)
        .map(|i| {
            image
                .bootstrap
                .chunk(lode_common::format::ChunkIndex(i))
                .unwrap()
        })
        .collect();
    let cache = ChunkCache::open(&image.cache_dir).unwrap();
    assert_eq!(
        cache.blob(&blob, &chunks).unwrap().present_count(),
        chunks.len()
    );
}

#[test]
fn busy_mount_is_detached_and_abort_ends_the_session() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping busy_mount_is_detached_and_abort_ends_the_session: {reason}");
        return;
    }
    let (image, _) = image();
    let mnt = tempfile::tempdir().unwrap();
    let mut config = FsdConfig::default();
    config.cache.dir = Some(image.cache_dir.clone());
    let (events, received) = mpsc::channel();
    let daemon = Daemon::start(
        DaemonOptions {
            bootstrap: image.bootstrap_path.clone(),
            blob_source: BlobSource::Dir(image.blob_dir.clone()),
            mountpoint: mnt.path().to_path_buf(),
            config,
            seq: 1,
            image_ref: None,
        },
        events,
    )
    .unwrap();
    let busy = std::fs::File::open(mnt.path().join("etc/hosts")).unwrap();
    daemon.unmount().unwrap();
    assert!(!mount::is_mounted(mnt.path(), "lode"), "still attached");
    // Detached but in use: the open file still reads.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut &busy, &mut text).unwrap();
    assert_eq!(text, "127.0.0.1 localhost\n");
    assert!(received.try_recv().is_err(), "session ended while in use");

    daemon.abort().unwrap();
    let ended = received.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(ended, Event::SessionEnded), "{ended:?}");
    daemon.wait().unwrap();
}
