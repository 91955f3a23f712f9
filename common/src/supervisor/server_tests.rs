use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::*;
use crate::supervisor::{FuseConnParams, InstanceState, SupervisorClient};

fn state(id: &str, conns: usize) -> DaemonState {
    DaemonState {
        id: id.into(),
        pid: 42,
        mode: "dedicated".into(),
        fuse: (0..conns)
            .map(|i| FuseConnParams {
                major: 7,
                minor: 41,
                kernel_flags: 0x1234_5678_9abc,
                flags: 0x42,
                max_write: 1 << 20,
                max_pages: 256,
                instance: Some(i),
                ..FuseConnParams::default()
            })
            .collect(),
        instances: vec![InstanceState {
            id: "i1".into(),
            seq: 1,
            mountpoint: "/mnt/x".into(),
            bootstrap: "/b".into(),
            blob_source: "dir:///blobs".into(),
            image_ref: Some("reg/x:1".into()),
            config: "{}".into(),
        }],
    }
}

fn same_file(a: &impl AsFd, b: &impl AsFd) -> bool {
    let sa = nix::sys::stat::fstat(a.as_fd()).unwrap();
    let sb = nix::sys::stat::fstat(b.as_fd()).unwrap();
    sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}

#[test]
fn state_and_descriptors_round_trip_to_a_successor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let server = SupervisorServer::bind(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().mode() & 0o777,
        0o600,
        "socket must be private"
    );
    let files: Vec<_> = (0..2).map(|_| tempfile::tempfile().unwrap()).collect();
    let sent = state("d1", 2);
    let client = SupervisorClient::connect(&path).unwrap();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    client.send_state(&sent, &fds).unwrap();
    assert_eq!(server.state("d1"), Some(sent.clone()));
    assert_eq!(server.updates(), 1);

    let successor = SupervisorClient::connect(&path).unwrap();
    let (got, got_fds) = successor.take_over("d1").unwrap();
    assert_eq!(got, sent);
    assert_eq!(got_fds.len(), 2);
    for (file, fd) in files.iter().zip(&got_fds) {
        assert!(same_file(file, fd), "handed-over fd is another file");
    }
    // The supervisor keeps its copies until the successor reports.
    assert!(server.state("d1").is_some());

    assert!(matches!(
        successor.take_over("nope"),
        Err(SupervisorError::Refused(_))
    ));
    successor.forget("d1").unwrap();
    assert!(server.state("d1").is_none());
}

#[test]
fn take_removes_the_held_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let server = SupervisorServer::bind(&path).unwrap();
    let file = tempfile::tempfile().unwrap();
    SupervisorClient::connect(&path)
        .unwrap()
        .send_state(&state("d2", 1), &[file.as_fd()])
        .unwrap();
    let (got, fds) = server.take("d2").unwrap();
    assert_eq!(got.id, "d2");
    assert!(same_file(&file, &fds[0]));
    assert!(server.take("d2").is_none());
}

#[test]
fn descriptor_count_must_match_the_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let _server = SupervisorServer::bind(&path).unwrap();
    let client = SupervisorClient::connect(&path).unwrap();
    assert!(client.send_state(&state("d3", 2), &[]).is_err());
}

#[test]
fn malformed_packets_are_answered_with_errors_and_the_server_survives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let server = SupervisorServer::bind(&path).unwrap();
    let raw = SupervisorClient::connect(&path).unwrap();
    // An empty packet reads like end-of-file and ends the connection, so
    // it is not among these.
    for junk in [&b"LDSV"[..], b"LDSV\xff\xff\xff\xff{}", b"nonsense at all"] {
        let n = nix::sys::socket::send(
            raw.socket.as_raw_fd(),
            junk,
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        assert_eq!(n, junk.len());
        let (reply, fds) = wire::recv(raw.socket.as_fd()).unwrap();
        assert!(matches!(reply, Message::Error { .. }), "{reply:?}");
        assert!(fds.is_empty());
    }
    // A reply-type message is refused too.
    let (reply, _) = {
        wire::send(raw.socket.as_fd(), &Message::Ack, &[]).unwrap();
        wire::recv(raw.socket.as_fd()).unwrap()
    };
    assert!(matches!(reply, Message::Error { .. }));
    let file = tempfile::tempfile().unwrap();
    raw.send_state(&state("d4", 1), &[file.as_fd()]).unwrap();
    assert!(server.state("d4").is_some());
}

#[test]
fn descriptors_cross_a_socketpair_with_the_message() {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let file = tempfile::tempfile().unwrap();
    let sent = Message::State {
        state: state("d5", 1),
    };
    wire::send(a.as_fd(), &sent, &[file.as_fd()]).unwrap();
    let (got, fds) = wire::recv(b.as_fd()).unwrap();
    assert_eq!(got, sent);
    assert!(same_file(&file, &fds[0]));
    drop(a);
    assert!(matches!(
        wire::recv(b.as_fd()),
        Err(SupervisorError::Closed)
    ));
}

#[test]
fn resend_writes_the_notification_on_every_held_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sup.sock");
    let server = SupervisorServer::bind(&path).unwrap();
    assert!(!server.resend("d1").unwrap(), "nothing held yet");
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let client = SupervisorClient::connect(&path).unwrap();
    client
        .send_state(&state("d1", 1), &[theirs.as_fd()])
        .unwrap();
    drop(theirs);
    assert!(server.resend("d1").unwrap());
    let mut got = [0u8; 64];
    let n = nix::unistd::read(&ours, &mut got).unwrap();
    assert_eq!(&got[..n], &crate::supervisor::resend_notification());
}
