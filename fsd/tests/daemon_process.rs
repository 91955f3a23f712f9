//! The `lode-fsd` binary as `lodectl mount` drives it: readiness on
//! `--ready-fd`, the pid file, SIGUSR1 metrics, SIGTERM unmount and exit, and
//! a failed start seen as end-of-file on the readiness descriptor.
//! Needs root and /dev/fuse; skips (saying why) without them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lode_common::format::{
    write_bootstrap, BlobIndex, BlobInfo, ChunkHash, ChunkIndex, ChunkRecord, ImageTree, Meta,
    Node, NodeKind, MIN_CHUNK_SIZE,
};
use lode_common::Digest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CONTENT: &[u8] = b"served by lode-fsd\n";

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse");
    }
    None
}

/// An image with one small file, its blob in `dir/blobs`.
fn write_image(dir: &Path) -> PathBuf {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob_digest = Digest::of(CONTENT);
    std::fs::write(blobs.join(blob_digest.hex()), CONTENT).unwrap();
    let meta = |perm| Meta {
        perm,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    let mut tree = ImageTree::new(meta(0o755));
    let file = tree.add(Node {
        meta: meta(0o644),
        kind: NodeKind::File {
            size: CONTENT.len() as u64,
            chunks: vec![ChunkIndex(0)],
        },
    });
    if let NodeKind::Dir { entries } = &mut tree.node_mut(ImageTree::ROOT).kind {
        entries.insert(b"hello".to_vec(), file);
    }
    let chunk = ChunkRecord {
        digest: ChunkHash::WRITTEN.digest(CONTENT),
        blob: BlobIndex(0),
        compressed_offset: 0,
        compressed_size: CONTENT.len() as u32,
        uncompressed_offset: 0,
        uncompressed_size: CONTENT.len() as u32,
        compressed: false,
    };
    let blob = BlobInfo {
        digest: blob_digest,
        compressed_size: CONTENT.len() as u64,
    };
    let bootstrap = write_bootstrap(&tree, MIN_CHUNK_SIZE, &[blob], &[chunk], &[]).unwrap();
    let path = dir.join("bootstrap");
    std::fs::write(&path, bootstrap).unwrap();
    path
}

/// A pipe whose write end the child inherits (no close-on-exec).
fn ready_pipe() -> (File, OwnedFd) {
    let (read, write) = nix::unistd::pipe().unwrap();
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .unwrap();
    (File::from(read), write)
}

fn spawn(dir: &Path, bootstrap: &Path, mnt: &Path, ready: &OwnedFd) -> Child {
    let log = File::create(dir.join("fsd.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_lode-fsd"))
        .arg("--bootstrap")
        .arg(bootstrap)
        .arg("--blob-source")
        .arg(format!("dir://{}", dir.join("blobs").display()))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--mountpoint")
        .arg(mnt)
        .arg("--pid-file")
        .arg(dir.join("fsd.pid"))
        .arg("--ready-fd")
        .arg(ready.as_raw_fd().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Everything written to the readiness pipe until end-of-file.
fn read_ready(mut pipe: File) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("readiness pipe never closed")
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "lode-fsd did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ready_fd_pid_file_signals_and_failed_start() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping ready_fd_pid_file_signals_and_failed_start: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let bootstrap = write_image(dir.path());

    let (pipe, write_end) = ready_pipe();
    let mut child = spawn(dir.path(), &bootstrap, mnt.path(), &write_end);
    drop(write_end);
    assert_eq!(read_ready(pipe), "ready\n");
    let pid = std::fs::read_to_string(dir.path().join("fsd.pid")).unwrap();
    assert_eq!(pid.trim(), child.id().to_string());
    assert_eq!(std::fs::read(mnt.path().join("hello")).unwrap(), CONTENT);

    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGUSR1).unwrap();
    let log = dir.path().join("fsd.log");
    wait_for("metrics in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"bytes_read\":19"))
    });
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(!dir.path().join("fsd.pid").exists(), "pid file left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*mnt.path().to_string_lossy()),
        "still mounted"
    );

    // A start that fails closes the descriptor without "ready".
    let (pipe, write_end) = ready_pipe();
    let mut child = spawn(
        dir.path(),
        &dir.path().join("no-such-bootstrap"),
        mnt.path(),
        &write_end,
    );
    drop(write_end);
    assert_eq!(read_ready(pipe), "");
    assert!(!wait_exit(&mut child).success());
}
