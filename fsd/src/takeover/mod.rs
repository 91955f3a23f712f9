//! Handing a live FUSE connection from one daemon process to another.
//!
//! A daemon keeps its /dev/fuse descriptor and the parameters negotiated at
//! INIT with a supervisor ([`lode_common::supervisor`]). While a descriptor
//! of the connection stays open anywhere, the kernel keeps the mount: when
//! the daemon dies (even by SIGKILL) requests simply wait in the kernel's
//! queue. A successor started with `--takeover` gets the descriptor back and
//! serves the same connection; the mountpoint never disappears.
//!
//! The INIT problem: `fuser::Session::from_fd` insists on reading and
//! answering an INIT request, which the kernel sends once per connection.
//! So the session never touches /dev/fuse during its handshake: it is given
//! one end of a `SOCK_SEQPACKET` socketpair, on which we write an INIT
//! request (the kernel's own on a fresh mount; on takeover one rebuilt from
//! the saved parameters), and read its reply back. On a fresh mount the
//! reply is forwarded to the kernel; on takeover the successor asks for the
//! capabilities the first daemon chose, even those a newer version no
//! longer asks for ([`crate::fs::adapter::KernelTuning`]), and its reply is
//! compared with the choices the kernel saw (the kernel never sees the
//! successor's reply, so both must behave alike) and dropped. Then, before
//! the session loop starts, the real /dev/fuse descriptor is `dup3`ed over
//! the session's descriptor number, and the session reads the kernel's
//! requests as if it had done the handshake there.
//!
//! Requests the dead daemon had read but not answered sit in the kernel's
//! processing list, where nobody will answer them. The successor writes
//! `FUSE_NOTIFY_RESEND` (Linux 6.9+), which moves them back to the pending
//! queue; the successor then reads and answers them. FORGETs the dead daemon
//! read are lost, which is harmless here: inode numbers come from the
//! bootstrap and stay valid in every process serving it.
//!
//! Before Linux 6.9 the kernel rejects RESEND (EINVAL); requests in flight
//! at the crash then wait forever (the reading process hangs, killable)
//! while new requests are served. Aborting the connection through
//! /sys/fs/fuse/connections/N/abort would unblock them, but it also fails
//! every later request with ENOTCONN and kills the mount, which is exactly
//! what takeover exists to avoid; so we log the condition and carry on.

mod handover;
mod init;

pub use handover::{fetch, forget, report, resend_after_exit, Failover, Predecessor};

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use fuser::{Filesystem, Session, SessionACL};
use lode_common::supervisor::{FuseConnParams, SupervisorError};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("FUSE INIT: {0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("the successor answers INIT differently ({now:?}) from the daemon the kernel knows ({was:?})")]
    Mismatch {
        was: Box<FuseConnParams>,
        now: Box<FuseConnParams>,
    },
    #[error(
        "{mountpoint} is already a Lode mount (a live daemon's, or a crashed one's kept by a \
         supervisor); take it over with --takeover --supervisor PATH --id ID, or unmount it"
    )]
    AlreadyMounted { mountpoint: PathBuf },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TakeoverError {
    move |source| TakeoverError::Io { what, source }
}

fn errno(what: &'static str) -> impl FnOnce(Errno) -> TakeoverError {
    move |e| TakeoverError::Io {
        what,
        source: e.into(),
    }
}

/// Large enough for any first request: the kernel refuses reads into
/// buffers smaller than its largest request.
const READ_BUFFER: usize = 2 * 1024 * 1024 + 4096;

/// Starts a session on a freshly mounted connection: reads the kernel's INIT
/// from `dev`, lets `fs` answer it, forwards the answer and returns the
/// session (reading from `dev`) with the negotiated parameters.
pub fn start_fresh<FS: Filesystem>(
    fs: FS,
    dev: &OwnedFd,
    config: fuser::Config,
) -> Result<(Session<FS>, FuseConnParams), TakeoverError> {
    let mut buf = vec![0u8; READ_BUFFER];
    let n = loop {
        match nix::unistd::read(dev, &mut buf) {
            Ok(n) => break n,
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => continue,
            Err(e) => return Err(errno("read INIT from /dev/fuse")(e)),
        }
    };
    let request = buf.get(..n).unwrap_or(&[]);
    let mut params = init::parse_request(request)?;
    let (session, reply) = handshake(fs, request, config)?;
    init::parse_reply(&reply, &mut params)?;
    write_all(dev.as_fd(), &reply).map_err(io("answer INIT on /dev/fuse"))?;
    attach(&session, dev)?;
    info!(
        major = params.major,
        minor = params.minor,
        flags = format_args!("{:#x}", params.flags),
        "FUSE connection initialised"
    );
    Ok((session, params))
}

/// Starts a session on a connection another process initialised with
/// `saved`, then asks the kernel to resend what that process left
/// unanswered.
pub fn start_resumed<FS: Filesystem>(
    fs: FS,
    dev: &OwnedFd,
    saved: &FuseConnParams,
    config: fuser::Config,
) -> Result<Session<FS>, TakeoverError> {
    let request = init::build_request(saved);
    let mut now = init::parse_request(&request)?;
    let (session, reply) = handshake(fs, &request, config)?;
    init::parse_reply(&reply, &mut now)?;
    if !init::same_choices(saved, &now) {
        return Err(TakeoverError::Mismatch {
            was: Box::new(saved.clone()),
            now: Box::new(now),
        });
    }
    attach(&session, dev)?;
    request_resend(dev.as_fd());
    Ok(session)
}

/// Asks the kernel to queue again every request read but not answered on
/// this connection. Harmless when there are none; a request answered twice
/// gets ENOENT on the second answer.
pub fn request_resend(dev: BorrowedFd<'_>) {
    match write_all(dev, &init::resend_notification()) {
        Ok(()) => info!("asked the kernel to resend unanswered FUSE requests"),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => warn!(
            "kernel lacks FUSE_NOTIFY_RESEND (Linux < 6.9): requests in flight at the \
             predecessor's exit stay blocked"
        ),
        Err(e) => warn!(error = %e, "FUSE_NOTIFY_RESEND failed"),
    }
}

/// Runs the session's INIT handshake against `request` over a socketpair;
/// returns the session and its raw reply.
fn handshake<FS: Filesystem>(
    fs: FS,
    request: &[u8],
    config: fuser::Config,
) -> Result<(Session<FS>, Vec<u8>), TakeoverError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(errno("socketpair for INIT"))?;
    write_all(ours.as_fd(), request).map_err(io("write INIT to the session"))?;
    let session =
        Session::from_fd(fs, theirs, SessionACL::All, config).map_err(io("FUSE handshake"))?;
    let mut reply = vec![0u8; 4096];
    let n = nix::unistd::read(&ours, &mut reply).map_err(errno("read the INIT reply"))?;
    reply.truncate(n);
    Ok((session, reply))
}

/// Points the session's descriptor number at the real connection.
fn attach<FS: Filesystem>(session: &Session<FS>, dev: &OwnedFd) -> Result<(), TakeoverError> {
    let target = session.as_fd().as_raw_fd();
    // SAFETY: dup3 onto a descriptor number the session owns replaces, in one
    // step, the socket it was given with the /dev/fuse file; the session
    // keeps owning (and eventually closes) that number. O_CLOEXEC because
    // dup2/dup3 would otherwise clear it.
    let r = unsafe { libc::dup3(dev.as_raw_fd(), target, OFlag::O_CLOEXEC.bits()) };
    if r < 0 {
        return Err(io("dup3 /dev/fuse over the session")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn write_all(fd: BorrowedFd<'_>, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::from(fd.try_clone_to_owned()?);
    // FUSE device and seqpacket writes are whole-message: one write.
    let n = file.write(bytes)?;
    if n != bytes.len() {
        return Err(std::io::Error::other(format!(
            "short write: {n} of {}",
            bytes.len()
        )));
    }
    Ok(())
}

/// Refuses to mount over a mountpoint that already has a Lode mount: a
/// second mount would hide the first from its users.
pub fn check_not_mounted(mountpoint: &Path) -> Result<(), TakeoverError> {
    if crate::mount::is_mounted(mountpoint) {
        return Err(TakeoverError::AlreadyMounted {
            mountpoint: mountpoint.to_path_buf(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use fuser::InitFlags;
    use lode_common::api::DaemonMode;

    use super::*;
    use crate::fs::adapter::{Adapter, KernelTuning};
    use crate::fs::table::Table;

    fn adapter(predecessor_flags: Option<u64>) -> Adapter {
        Adapter::new(
            Arc::new(Table::new(DaemonMode::Dedicated)),
            KernelTuning {
                max_background: 64,
                root_ttl: Duration::from_secs(1),
                predecessor_flags,
            },
        )
    }

    /// The parameters a daemon that follows nobody negotiates with a kernel
    /// that offers every capability.
    fn fresh() -> FuseConnParams {
        let mut p = FuseConnParams {
            major: 7,
            minor: 45,
            kernel_max_readahead: 131072,
            kernel_flags: u64::MAX,
            init_unique: 2,
            ..FuseConnParams::default()
        };
        let request = init::build_request(&p);
        let (_session, reply) =
            handshake(adapter(None), &request, fuser::Config::default()).expect("handshake");
        init::parse_reply(&reply, &mut p).expect("INIT reply");
        p
    }

    fn resume(predecessor_flags: Option<u64>, saved: &FuseConnParams) -> Result<(), TakeoverError> {
        let (dev, _kernel) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        start_resumed(
            adapter(predecessor_flags),
            &dev,
            saved,
            fuser::Config::default(),
        )
        .map(drop)
    }

    /// A successor answers INIT as the daemon the kernel knows did, also
    /// where that daemon is of an earlier version that chose otherwise
    /// (readdirplus in each directory's first batch only).
    #[test]
    fn a_successor_chooses_the_capabilities_its_predecessor_chose() {
        let ours = fresh();
        let (plus, auto) = (
            InitFlags::FUSE_DO_READDIRPLUS.bits(),
            InitFlags::FUSE_READDIRPLUS_AUTO.bits(),
        );
        assert_eq!(ours.flags & (plus | auto), plus, "{:#x}", ours.flags);
        let mut earlier = ours.clone();
        earlier.flags |= auto;
        for saved in [&ours, &earlier] {
            resume(Some(saved.flags), saved)
                .unwrap_or_else(|e| panic!("resuming {:#x}: {e}", saved.flags));
        }
        assert!(
            matches!(resume(None, &earlier), Err(TakeoverError::Mismatch { .. })),
            "a successor that chooses otherwise is refused"
        );
    }
}
