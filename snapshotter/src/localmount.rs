//! `lodectl mount` / `lodectl umount`: serve a Lode image from a registry at a
//! local directory with a background `lode-fsd`, without containerd.
//!
//! A small record per mount (`<state dir>/mounts/<id>.json`) remembers the
//! daemon's pid so that `umount` can stop exactly that daemon.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lode_common::contract::FUSE_FS_TYPE;
use lode_common::image::{self, ImageError};
use lode_common::mountinfo;
use lode_common::registry::{Reference, RegistryClient, RegistryError, RegistryOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The descriptor number the daemon's readiness pipe gets in the child.
const READY_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is already a mount point")]
    AlreadyMounted(PathBuf),
    #[error("{0} is not a Lode mount")]
    NotMounted(PathBuf),
    #[error("lode-fsd ({fsd}) failed to start: {message}; its log is {log}")]
    DaemonFailed {
        fsd: String,
        message: String,
        log: String,
    },
    #[error("{mountpoint}: still mounted {waited:?} after asking lode-fsd (pid {pid}) to stop")]
    StopTimeout {
        mountpoint: PathBuf,
        pid: i32,
        waited: Duration,
    },
    #[error("unmount {mountpoint}: {source}")]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.display().to_string();
    move |source| MountError::Io { path, source }
}

/// What `lodectl mount` was asked to do.
#[derive(Clone, Debug)]
pub struct MountRequest {
    pub image: Reference,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    pub registry: RegistryOptions,
    pub fsd_binary: PathBuf,
    /// Optional `lode-fsd` TOML configuration passed through.
    pub fsd_config: Option<PathBuf>,
    /// How long to wait for the daemon to serve the mount.
    pub ready_timeout: Duration,
}

/// What `lodectl mount` leaves behind to find the daemon again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub image: String,
    pub manifest_digest: String,
    pub bootstrap: PathBuf,
    pub pid: i32,
    pub log: PathBuf,
}

fn record_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let id = lode_common::Digest::of(mountpoint.as_os_str().as_encoded_bytes()).hex();
    state_dir.join("mounts").join(format!("{}.json", &id[..16]))
}

fn canonical_dir(path: &Path) -> Result<PathBuf, MountError> {
    std::fs::canonicalize(path).map_err(io_err(path))
}

/// Fetches the image's bootstrap, starts `lode-fsd` in the background and
/// returns once the mount serves requests.
pub async fn mount(request: &MountRequest) -> Result<MountRecord, MountError> {
    let mountpoint = canonical_dir(&request.mountpoint)?;
    if mountinfo::mount_at(&mountpoint)
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?
        .is_some()
    {
        return Err(MountError::AlreadyMounted(mountpoint));
    }
    let client = RegistryClient::new(request.registry.clone())?;
    let lode = image::resolve(&client, &request.image).await?;
    let bootstrap = image::fetch_bootstrap(
        &client,
        &request.image,
        &lode,
        &request.cache_dir.join("bootstraps"),
    )
    .await?;
    info!(image = %request.image, manifest = %lode.manifest_digest, bootstrap = %bootstrap.display(), "bootstrap ready");

    let mounts_dir = request.state_dir.join("mounts");
    std::fs::create_dir_all(&mounts_dir).map_err(io_err(&mounts_dir))?;
    let record_file = record_path(&request.state_dir, &mountpoint);
    let log = record_file.with_extension("log");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--bootstrap".into(),
        bootstrap.clone().into(),
        "--blob-source".into(),
        format!(
            "registry://{}/{}",
            request.image.registry, request.image.repository
        )
        .into(),
        "--cache-dir".into(),
        request.cache_dir.clone().into(),
        "--mountpoint".into(),
        mountpoint.clone().into(),
        "--ready-fd".into(),
        READY_FD.to_string().into(),
    ];
    if request.registry.plain_http {
        args.push("--plain-http".into());
    }
    if let Some(config) = &request.fsd_config {
        args.push("--config".into());
        args.push(config.clone().into());
    }
    let pid = spawn_daemon(&request.fsd_binary, &args, &log, request.ready_timeout)?;
    let record = MountRecord {
        mountpoint,
        image: request.image.to_string(),
        manifest_digest: lode.manifest_digest.to_string(),
        bootstrap,
        pid,
        log,
    };
    let json = serde_json::to_vec_pretty(&record).expect("mount record serialises");
    std::fs::write(&record_file, json).map_err(io_err(&record_file))?;
    Ok(record)
}

/// Starts the daemon detached (own session, output to `log`) and waits for
/// its readiness line. Returns its pid.
fn spawn_daemon(
    binary: &Path,
    args: &[std::ffi::OsString],
    log: &Path,
    timeout: Duration,
) -> Result<i32, MountError> {
    let failed = |message: String| MountError::DaemonFailed {
        fsd: binary.display().to_string(),
        message,
        log: log.display().to_string(),
    };
    let log_file = std::fs::File::create(log).map_err(io_err(log))?;
    let log_err = log_file.try_clone().map_err(io_err(log))?;
    let (ready_read, ready_write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| failed(format!("pipe: {e}")))?;
    let write_fd = ready_write.as_raw_fd();
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setsid, dup2).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // dup2 clears close-on-exec on the new descriptor, so exactly
            // this end of the pipe reaches the daemon.
            if libc::dup2(write_fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| failed(format!("cannot execute: {e}")))?;
    drop(ready_write);
    let pid = i32::try_from(child.id()).map_err(|_| failed("pid out of range".into()))?;

    // The daemon writes "ready" and closes its end, or dies (end of file).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let result = std::fs::File::from(ready_read)
            .read_to_string(&mut text)
            .map(|_| text);
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(text)) if text.trim() == "ready" => {
            // The daemon lives on; reap it in the background should it exit
            // while this process still runs.
            std::thread::spawn(move || child.wait());
            Ok(pid)
        }
        Ok(result) => {
            let status = child.wait().ok();
            Err(failed(format!(
                "exited before the mount was ready ({}){}",
                status.map_or("status unknown".into(), |s| s.to_string()),
                match result {
                    Err(e) => format!(", reading readiness: {e}"),
                    Ok(_) => String::new(),
                }
            )))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(failed(format!("not ready within {timeout:?}; killed")))
        }
    }
}

/// Stops the daemon serving `mountpoint` and waits until the mount is gone.
pub fn umount(state_dir: &Path, mountpoint: &Path, timeout: Duration) -> Result<(), MountError> {
    let mountpoint = canonical_dir(mountpoint)?;
    let record_file = record_path(state_dir, &mountpoint);
    let record: Option<MountRecord> = std::fs::read(&record_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let mounted = is_fsd_mount(&mountpoint)?;
    let start = Instant::now();
    match &record {
        Some(r) if process_alive(r.pid) => {
            kill(Pid::from_raw(r.pid), Signal::SIGTERM).map_err(|e| MountError::Unmount {
                mountpoint: mountpoint.clone(),
                source: e,
            })?;
            while is_fsd_mount(&mountpoint)? || process_alive(r.pid) {
                if start.elapsed() > timeout {
                    return Err(MountError::StopTimeout {
                        mountpoint,
                        pid: r.pid,
                        waited: timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ if mounted => {
            // No live daemon known: detach the mount itself. A dead daemon's
            // mount answers ENOTCONN; the lazy unmount never blocks on it.
            warn!(mountpoint = %mountpoint.display(), "no live lode-fsd recorded for this mount; unmounting it directly");
            nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                |source| MountError::Unmount {
                    mountpoint: mountpoint.clone(),
                    source,
                },
            )?;
        }
        _ => return Err(MountError::NotMounted(mountpoint)),
    }
    let _ = std::fs::remove_file(&record_file);
    Ok(())
}

fn is_fsd_mount(mountpoint: &Path) -> Result<bool, MountError> {
    Ok(mountinfo::mount_at(mountpoint)
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?
        .is_some_and(|m| m.fs_type == FUSE_FS_TYPE))
}

/// Whether `pid` names a live (not zombie) process.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_paths_are_stable_and_distinct() {
        let state = Path::new("/run/lode");
        let a = record_path(state, Path::new("/mnt/a"));
        assert_eq!(a, record_path(state, Path::new("/mnt/a")));
        assert_ne!(a, record_path(state, Path::new("/mnt/b")));
        assert!(a.starts_with("/run/lode/mounts"));
    }

    #[test]
    fn liveness_of_processes() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn umount_of_a_plain_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = umount(dir.path(), dir.path(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, MountError::NotMounted(_)), "{err}");
    }

    #[test]
    fn a_daemon_that_exits_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fsd.log");
        let err = spawn_daemon(
            Path::new("/bin/sh"),
            &["-c".into(), "echo broken >&2; exit 3".into()],
            &log,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("exited before the mount was ready"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "broken\n");
    }

    #[test]
    fn readiness_line_is_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let pid = spawn_daemon(
            Path::new("/bin/sh"),
            &["-c".into(), "echo ready >&3; exec 3>&-; sleep 30".into()],
            &dir.path().join("log"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(process_alive(pid));
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }
}
