//! Starting `lode-fsd` processes, waiting for them to serve, and noticing
//! when they die.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lode_common::api::{DaemonClient, DaemonState};
use tokio::io::unix::AsyncFd;

use super::records::DaemonRecord;
use super::DaemonError;

/// What a new daemon process is started with.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub record: &'a DaemonRecord,
    pub cache_dir: &'a Path,
    pub fsd_config: Option<&'a Path>,
    pub threads: usize,
    /// Pass `--supervisor` (failover policy): the daemon hands its FUSE
    /// descriptor to the supervisor so a successor can take it over.
    pub supervised: bool,
    /// Take the connection over from the supervisor instead of mounting.
    pub takeover: bool,
    pub log: &'a Path,
}

/// Starts the daemon in its own process group, so that it outlives the
/// snapshotter (and a terminal's signals to it). The child is reaped by a
/// background task; death is noticed through a pidfd ([`wait_for_exit`]).
pub fn spawn(launch: &Launch<'_>) -> Result<u32, DaemonError> {
    let record = launch.record;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(launch.log)
        .map_err(DaemonError::io(launch.log))?;
    let log_err = log.try_clone().map_err(DaemonError::io(launch.log))?;
    let mut command = tokio::process::Command::new(launch.binary);
    command
        .arg("--apisock")
        .arg(&record.apisock)
        .arg("--mode")
        .arg(&record.mode)
        .arg("--id")
        .arg(&record.id)
        .arg("--cache-dir")
        .arg(launch.cache_dir)
        .arg("--mountpoint")
        .arg(&record.mountpoint)
        .arg("--threads")
        .arg(launch.threads.to_string());
    if let Some(config) = launch.fsd_config {
        command.arg("--config").arg(config);
    }
    if launch.supervised {
        command.arg("--supervisor").arg(&record.supervisor);
    }
    if launch.takeover {
        command.arg("--takeover");
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = command.spawn().map_err(|source| DaemonError::Spawn {
        binary: launch.binary.display().to_string(),
        source,
    })?;
    let pid = child.id().ok_or_else(|| DaemonError::Daemon {
        daemon_id: record.id.clone(),
        message: "exited at once".into(),
    })?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// Waits until the daemon's API answers with one of `states`; fails early
/// when its process exits. `pid` is a daemon known to be ours (just spawned,
/// or checked with [`is_live_fsd`]).
pub async fn wait_for_states(
    client: &DaemonClient,
    daemon_id: &str,
    pid: u32,
    states: &[DaemonState],
    timeout: Duration,
) -> Result<DaemonState, DaemonError> {
    client
        .wait_for_states(states, Instant::now() + timeout, || has_exited(pid))
        .await
        .map(|info| info.state)
        .map_err(|e| DaemonError::Daemon {
            daemon_id: daemon_id.to_string(),
            message: format!("process {pid}: {e}"),
        })
}

/// Adds the end of the daemon's log to a start-up failure, where the
/// daemon says why it did not come up.
pub fn with_log_tail(error: DaemonError, log: &Path) -> DaemonError {
    const LINES: usize = 5;
    match error {
        DaemonError::Daemon { daemon_id, message } => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LINES)..].join(" | ");
            DaemonError::Daemon {
                daemon_id,
                message: format!("{message}; log {} ends: {tail}", log.display()),
            }
        }
        other => other,
    }
}

/// A handle on a process that says when it has exited, whether or not it
/// is our child (after a snapshotter restart the daemons are not).
pub fn pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Returns once the process behind `pidfd` has exited.
pub async fn wait_for_exit(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same
    // descriptor until the AsyncFd is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(error) => {
            tracing::warn!(error = %error.into_parts().1, "cannot watch a daemon's pidfd")
        }
    }
}

/// Whether `pid` is a live `lode-fsd` (not a recycled pid of something else).
pub fn is_live_fsd(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            argv0.ends_with(b"lode-fsd")
        })
        .unwrap_or(false)
        && !has_exited(pid)
}

/// Whether `pid` is gone or a zombie. Unlike [`is_live_fsd`] this does not
/// read the command line, which is empty for a moment while a process just
/// spawned is still being exec'd: a daemon we started ourselves must not
/// look dead then.
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain them.
        Ok(stat) => matches!(
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next(),
            Some('Z' | 'X') | None
        ),
        Err(_) => true,
    }
}

/// Detaches whatever is mounted at `path` (a dead daemon's FUSE mount);
/// nothing mounted there is not an error. Runs off the async threads.
pub async fn detach_mount(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::info!(mountpoint = %path.display(), "detached a dead daemon's mount")
            }
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(error) => {
                tracing::warn!(mountpoint = %path.display(), %error, "cannot detach mount")
            }
        }
    })
    .await;
}

/// Stops a daemon (SIGTERM: it unmounts and exits) and waits for it up to
/// `grace`, then kills it (a hung daemon ignores SIGTERM); then detaches
/// whatever is left of its mount.
pub async fn stop(record: &DaemonRecord, grace: Duration) {
    if let Some(fd) = live_pidfd(record.pid) {
        let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::TERM);
        if tokio::time::timeout(grace, wait_for_exit(fd))
            .await
            .is_err()
        {
            tracing::warn!(daemon_id = %record.id, pid = record.pid, ?grace, "daemon did not stop in time; killing it");
            kill(record).await;
        }
    }
    detach_mount(record.mountpoint.clone()).await;
    let _ = std::fs::remove_file(&record.apisock);
    let _ = std::fs::remove_file(&record.supervisor);
}

/// Kills a daemon with SIGKILL (which a stopped process does not hold up)
/// and waits until it is gone. Its mounts and sockets stay for recovery.
pub async fn kill(record: &DaemonRecord) {
    let Some(fd) = live_pidfd(record.pid) else {
        return;
    };
    let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
    if tokio::time::timeout(Duration::from_secs(10), wait_for_exit(fd))
        .await
        .is_err()
    {
        tracing::error!(daemon_id = %record.id, pid = record.pid, "daemon still there 10 s after SIGKILL");
    }
}

/// A pidfd of `pid` if it is a live `lode-fsd`; opened before the check, so
/// the check cannot be about a recycled pid.
fn live_pidfd(pid: u32) -> Option<OwnedFd> {
    let fd = pidfd(pid)?;
    is_live_fsd(pid).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_is_told_from_the_process_state() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(!has_exited(pid));
        assert!(!is_live_fsd(pid), "sleep is not lode-fsd");
        child.kill().unwrap();
        // Not reaped yet: a zombie has exited too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_exited(pid) {
            assert!(Instant::now() < deadline, "killed child never exited");
            std::thread::yield_now();
        }
        child.wait().unwrap();
        assert!(has_exited(pid), "reaped");
    }
}
