//! `lode-fsd` started directly, its metrics, and mount-table helpers.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lode_common::contract::FUSE_FS_TYPE;
use lode_common::mountinfo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{wait_until, KitError};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// What to pass to `lode-fsd` when starting it directly.
#[derive(Clone, Debug)]
pub struct FsdOptions {
    pub bootstrap: PathBuf,
    /// `registry://HOST:PORT/REPO` or `dir:///PATH`.
    pub blob_source: String,
    pub cache_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub plain_http: bool,
}

/// `lode-fsd` run directly by the test; stopped (SIGTERM, then SIGKILL and a
/// lazy unmount) on drop.
pub struct FsdDaemon {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
    _dirs: tempfile::TempDir,
}

impl FsdDaemon {
    /// Starts `binary` on a fresh temporary mountpoint and waits until it
    /// has written its pid file (which it does once the mount serves).
    pub fn start(binary: &Path, options: &FsdOptions) -> Result<Self, KitError> {
        let dirs = tempfile::Builder::new()
            .prefix("lode-fsd-")
            .tempdir()
            .map_err(KitError::io("create fsd directories"))?;
        let mountpoint = dirs.path().join("mnt");
        std::fs::create_dir(&mountpoint)
            .map_err(KitError::io(format!("create {}", mountpoint.display())))?;
        let log = dirs.path().join("fsd.log");
        let pid_file = dirs.path().join("fsd.pid");
        let log_file =
            File::create(&log).map_err(KitError::io(format!("create {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(KitError::io(format!("clone {}", log.display())))?;
        let mut command = Command::new(binary);
        command
            .arg("--bootstrap")
            .arg(&options.bootstrap)
            .arg("--blob-source")
            .arg(&options.blob_source)
            .arg("--cache-dir")
            .arg(&options.cache_dir)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--pid-file")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        if options.plain_http {
            command.arg("--plain-http");
        }
        if let Some(config) = &options.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .spawn()
            .map_err(KitError::io(format!("start {}", binary.display())))?;
        let mut daemon = Self {
            child: Some(child),
            mountpoint,
            log,
            _dirs: dirs,
        };
        let mut exited = None;
        wait_until(MOUNT_TIMEOUT, "lode-fsd to serve its mount", || {
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                exited = Some(status);
                return true;
            }
            pid_file.exists()
        })?;
        if let Some(status) = exited {
            daemon.child = None;
            return Err(KitError::Command {
                what: format!(
                    "{} --mountpoint {}",
                    binary.display(),
                    daemon.mountpoint.display()
                ),
                message: format!("exited with {status}: {}", daemon.log_text()),
            });
        }
        if !is_fsd_mount(&daemon.mountpoint) {
            return Err(KitError::Invalid(format!(
                "lode-fsd is ready but {} is not a {FUSE_FS_TYPE} mount",
                daemon.mountpoint.display()
            )));
        }
        Ok(daemon)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(relative)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's counters, asked for with SIGUSR1.
    pub fn metrics(&self) -> Result<Value, KitError> {
        let pid = self
            .pid()
            .ok_or_else(|| KitError::Invalid("lode-fsd is not running".into()))?;
        request_metrics(pid, &self.log)
    }

    /// SIGTERM; waits for the daemon to exit and the mount to vanish.
    pub fn stop(mut self) -> Result<(), KitError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| KitError::Invalid("lode-fsd is not running".into()))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        kill(pid, Signal::SIGTERM)
            .map_err(|e| KitError::Invalid(format!("SIGTERM lode-fsd: {e}")))?;
        let mut status = None;
        wait_until(Duration::from_secs(20), "lode-fsd to exit", || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        })
        .inspect_err(|_| {
            let _ = child.kill();
            let _ = child.wait();
        })?;
        if is_fsd_mount(&self.mountpoint) {
            return Err(KitError::Invalid(format!(
                "{} still mounted after lode-fsd exited",
                self.mountpoint.display()
            )));
        }
        match status {
            Some(s) if s.success() => Ok(()),
            other => Err(KitError::Command {
                what: "lode-fsd".into(),
                message: format!("exited with {other:?}: {}", self.log_text()),
            }),
        }
    }
}

/// Stops a daemon the test started: SIGTERM, then SIGKILL after 10 s, and
/// a forced unmount of what it leaves.
pub fn stop_daemon(child: Option<Child>, mountpoint: &Path) {
    if let Some(mut child) = child {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let exited = wait_until(Duration::from_secs(10), "lode-fsd to exit", || {
            child.try_wait().ok().flatten().is_some()
        });
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    force_unmount(mountpoint);
}

impl Drop for FsdDaemon {
    fn drop(&mut self) {
        stop_daemon(self.child.take(), &self.mountpoint);
    }
}

/// Whether `path` is currently an fsd mount.
pub fn is_fsd_mount(path: &Path) -> bool {
    // mountinfo has canonical paths. Only the parent is canonicalised: any
    // access to the mount itself blocks while no daemon serves it (during a
    // takeover) and fails once its daemon is gone.
    let path = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    };
    mountinfo::mount_at(&path)
        .ok()
        .flatten()
        .is_some_and(|m| m.fs_type == FUSE_FS_TYPE)
}

/// Last resort: detaches whatever fsd mount is at `path` (several times
/// if mounts are stacked). A lazy unmount never blocks, even on a dead
/// daemon's mount.
pub fn force_unmount(path: &Path) {
    for _ in 0..4 {
        if !is_fsd_mount(path) {
            return;
        }
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn process_alive(pid: i32) -> bool {
    proc_stat_fields(format!("/proc/{pid}/stat"))
        .and_then(|fields| fields.first()?.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// The fields of a `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) file
/// after the command name, which may hold spaces and parentheses: the
/// process state first, the niceness 17th (`stat` fields 3 and 19).
/// `None` if the file cannot be read (the process is gone).
pub fn proc_stat_fields(path: impl AsRef<Path>) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Sends SIGUSR1 to the daemon `pid` and returns the metrics JSON it then
/// logs to `log` (the daemon writes `metrics={...}` in its log line).
pub fn request_metrics(pid: i32, log: &Path) -> Result<Value, KitError> {
    let before = metrics_lines(log).len();
    kill(Pid::from_raw(pid), Signal::SIGUSR1)
        .map_err(|e| KitError::Invalid(format!("SIGUSR1 to lode-fsd pid {pid}: {e}")))?;
    let mut found = None;
    wait_until(METRICS_TIMEOUT, "lode-fsd to log its metrics", || {
        let lines = metrics_lines(log);
        if lines.len() > before {
            found = lines.into_iter().last();
        }
        found.is_some()
    })?;
    found.ok_or_else(|| KitError::Invalid("no metrics line".into()))
}

/// Every metrics JSON object in the log, oldest first.
fn metrics_lines(log: &Path) -> Vec<Value> {
    let mut text = String::new();
    if let Ok(mut file) = File::open(log) {
        let _ = file.read_to_string(&mut text);
    }
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .map(strip_ansi)
        .filter_map(|line| {
            let start = line.find("metrics={")? + "metrics=".len();
            serde_json::Deserializer::from_str(&line[start..])
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .collect()
}

/// Removes terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A counter from a metrics JSON object (0 if absent).
pub fn counter(metrics: &Value, name: &str) -> u64 {
    metrics[name].as_u64().unwrap_or(0)
}

/// Whether every range request the daemon started has ended. A read
/// returns as soon as its chunks are in, while the rest of their request
/// may still stream (and be missing from the registry's access log).
pub fn fetches_settled(metrics: &Value) -> bool {
    counter(metrics, "backend_requests") == counter(metrics, "backend_requests_done")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_found_in_plain_and_coloured_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00Z  INFO lode_fsd::daemon: serving\n\
             2026-01-01T00:00:01Z  INFO lode_fsd::daemon: metrics metrics={\"digest_errors\":2,\"fops\":{}}\n\
             \u{1b}[2m2026\u{1b}[0m INFO metrics \u{1b}[3mmetrics\u{1b}[0m\u{1b}[2m=\u{1b}[0m{\"digest_errors\":5} more=1\n\
             partial metrics={\"digest_errors\":9}",
        )
        .unwrap();
        let lines = metrics_lines(&log);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(counter(&lines[0], "digest_errors"), 2);
        assert_eq!(counter(&lines[1], "digest_errors"), 5);
        assert_eq!(counter(&lines[1], "absent"), 0);
    }

    #[test]
    fn liveness_of_processes() {
        assert!(process_alive(i32::try_from(std::process::id()).unwrap()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn a_plain_directory_is_not_an_fsd_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_fsd_mount(dir.path()));
        force_unmount(dir.path());
        assert!(dir.path().is_dir());
    }
}
