//! The daemon's use of its supervisor: reporting its state and descriptor,
//! fetching a predecessor's, and resending once a live predecessor exits.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use lode_common::supervisor::{DaemonState, FuseConnParams, SupervisorClient};
use tracing::{info, warn};

use super::TakeoverError;

/// Command-line settings for working with a supervisor.
#[derive(Clone, Debug, Default)]
pub struct Failover {
    /// The supervisor's socket; none: no hand-over possible.
    pub supervisor: Option<PathBuf>,
    /// Names this daemon to the supervisor.
    pub id: String,
}

/// What a successor got from the supervisor.
pub struct Predecessor {
    pub fd: OwnedFd,
    pub params: FuseConnParams,
    pub state: DaemonState,
}

/// Fetches the connection the supervisor holds for `failover.id`, checking
/// that it serves `mountpoint` and that the mount is still there.
pub fn fetch(failover: &Failover, mountpoint: &Path) -> Result<Predecessor, TakeoverError> {
    let path = failover
        .supervisor
        .as_deref()
        .ok_or_else(|| TakeoverError::Protocol("--takeover needs --supervisor".into()))?;
    let client = SupervisorClient::connect(path)?;
    let (state, fds) = client.take_over(&failover.id)?;
    let (Some(fd), Some(params), 1) =
        (fds.into_iter().next(), state.fuse.first(), state.fuse.len())
    else {
        return Err(TakeoverError::Protocol(format!(
            "daemon {} held {} FUSE connections; this daemon serves exactly one",
            state.id,
            state.fuse.len()
        )));
    };
    let want = mountpoint.display().to_string();
    // A shared daemon's instances live below the one mount it serves.
    if state.mode != "shared" && !state.instances.iter().any(|i| i.mountpoint == want) {
        return Err(TakeoverError::Protocol(format!(
            "daemon {} did not serve {want}",
            state.id
        )));
    }
    if !crate::mount::is_mounted(mountpoint) {
        return Err(TakeoverError::Protocol(format!(
            "{want} is no longer mounted; nothing to take over"
        )));
    }
    info!(daemon_id = %state.id, predecessor = state.pid, mountpoint = %want, "taking over");
    Ok(Predecessor {
        params: params.clone(),
        fd,
        state,
    })
}

/// Sends `state` and `fd` to the supervisor at `path`.
pub fn report(path: &Path, state: &DaemonState, fd: &OwnedFd) -> Result<(), TakeoverError> {
    SupervisorClient::connect(path)?.send_state(state, &[fd.as_fd()])?;
    info!(daemon_id = %state.id, supervisor = %path.display(), "state handed to the supervisor");
    Ok(())
}

/// Tells the supervisor this daemon stopped cleanly.
pub fn forget(path: &Path, id: &str) {
    if let Err(e) = SupervisorClient::connect(path).and_then(|c| c.forget(id)) {
        warn!(error = %e, daemon_id = id, "cannot tell the supervisor we stopped");
    }
}

/// When taking over from a live predecessor (an upgrade), requests it reads
/// until it exits would stay unanswered: resend once more after it exits.
pub fn resend_after_exit(pid: u32, dev: OwnedFd) {
    if pid == 0 || pid == std::process::id() {
        return;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        // Already gone: the resend at takeover covered it.
        return;
    }
    // SAFETY: pidfd_open returned a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let spawned = std::thread::Builder::new()
        .name("lode-predecessor".into())
        .spawn(move || {
            let mut fds = [libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            loop {
                // SAFETY: `fds` is a valid array of one pollfd for the call.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
                if r > 0 {
                    break;
                }
                if r < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    warn!("cannot wait for the predecessor to exit");
                    return;
                }
            }
            info!(predecessor = pid, "predecessor exited");
            super::request_resend(dev.as_fd());
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot watch the predecessor");
    }
}
