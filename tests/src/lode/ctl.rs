//! `lodectl` runs and the mounts `lodectl mount` makes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lode_common::contract::FUSE_FS_TYPE;
use lode_common::format::Bootstrap;
use lode_common::registry::Reference;
use lode_common::Digest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::fsd::{force_unmount, is_fsd_mount, process_alive, request_metrics};
use super::LODECTL;
use crate::{bin_path, wait_until, KitError};

/// A finished `lodectl` run.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            success: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The `lodectl` binary, talking plain HTTP to loopback registries.
#[derive(Clone, Debug)]
pub struct Lodectl {
    pub binary: PathBuf,
    /// Extra environment for every run (e.g. `TMPDIR`).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory of every run (default: inherited).
    pub cwd: Option<PathBuf>,
}

impl Lodectl {
    /// The built `lodectl`, if any.
    pub fn find() -> Option<Self> {
        Some(Self::new(bin_path(LODECTL)?))
    }

    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Runs `lodectl ARGS` to completion.
    pub fn run<I, S>(&self, args: I) -> Result<Run, KitError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut command = Command::new(&self.binary);
        command.args(&args).stdin(Stdio::null());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let output = command
            .output()
            .map_err(KitError::io(format!("run {}", self.binary.display())))?;
        Ok(output.into())
    }

    /// `lodectl convert --plain-http [--chunk-size N] [--prefetch-paths
    /// LIST] SOURCE TARGET`, as a run.
    pub fn convert_run(
        &self,
        source: &Reference,
        target: &Reference,
        chunk_size: Option<u32>,
        prefetch: Option<&Path>,
    ) -> Result<Run, KitError> {
        let mut args: Vec<OsString> = vec!["convert".into(), "--plain-http".into()];
        if let Some(size) = chunk_size {
            args.push("--chunk-size".into());
            args.push(size.to_string().into());
        }
        if let Some(list) = prefetch {
            args.push("--prefetch-paths".into());
            args.push(list.into());
        }
        args.push(source.to_string().into());
        args.push(target.to_string().into());
        self.run(args)
    }

    /// Converts and returns the target manifest digest printed on stdout.
    pub fn convert(
        &self,
        source: &Reference,
        target: &Reference,
        chunk_size: Option<u32>,
        prefetch: Option<&Path>,
    ) -> Result<Digest, KitError> {
        let run = self.convert_run(source, target, chunk_size, prefetch)?;
        if !run.success {
            return Err(KitError::Command {
                what: format!("lodectl convert {source} {target}"),
                message: format!("exit {:?}: {}", run.code, run.stderr.trim()),
            });
        }
        let line = run.stdout.lines().rev().find(|l| !l.trim().is_empty());
        line.and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| KitError::Command {
                what: format!("lodectl convert {source} {target}"),
                message: format!("stdout has no manifest digest: {:?}", run.stdout),
            })
    }

    /// `lodectl mount --plain-http --cache-dir .. --state-dir .. [EXTRA..]
    /// IMAGE MOUNTPOINT` on a fresh temporary mountpoint; returns once
    /// mounted.
    pub fn mount(
        &self,
        image: &Reference,
        cache_dir: &Path,
        extra_args: &[OsString],
    ) -> Result<LodeMount, KitError> {
        let dirs = tempfile::Builder::new()
            .prefix("lode-mount-")
            .tempdir()
            .map_err(KitError::io("create mount directories"))?;
        let mountpoint = dirs.path().join("mnt");
        let state_dir = dirs.path().join("state");
        for dir in [&mountpoint, &state_dir] {
            std::fs::create_dir(dir).map_err(KitError::io(format!("create {}", dir.display())))?;
        }
        let mut args: Vec<OsString> = vec![
            "mount".into(),
            "--plain-http".into(),
            "--cache-dir".into(),
            cache_dir.into(),
            "--state-dir".into(),
            state_dir.clone().into(),
        ];
        args.extend(extra_args.iter().cloned());
        args.push(image.to_string().into());
        args.push(mountpoint.clone().into());
        let run = self.run(args)?;
        if !run.success {
            // A half-started daemon must not outlive the test.
            force_unmount(&mountpoint);
            return Err(KitError::Command {
                what: format!("lodectl mount {image} {}", mountpoint.display()),
                message: format!("exit {:?}: {}", run.code, run.stderr.trim()),
            });
        }
        let mut guard = LodeMount {
            lodectl: self.clone(),
            mountpoint,
            state_dir,
            record: None,
            mounted: true,
            _dirs: dirs,
        };
        guard.record = Some(read_record(&guard.state_dir)?);
        if !is_fsd_mount(&guard.mountpoint) {
            return Err(KitError::Invalid(format!(
                "lodectl mount returned but {} is not a {FUSE_FS_TYPE} mount",
                guard.mountpoint.display()
            )));
        }
        Ok(guard)
    }
}

/// `<state dir>/mounts/*.json` of a `lodectl mount`.
#[derive(Clone, Debug)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub image: String,
    pub manifest_digest: String,
    pub bootstrap: PathBuf,
    pub pid: i32,
    pub log: PathBuf,
}

fn read_record(state_dir: &Path) -> Result<MountRecord, KitError> {
    let dir = state_dir.join("mounts");
    let listing =
        std::fs::read_dir(&dir).map_err(KitError::io(format!("list {}", dir.display())))?;
    let mut records = Vec::new();
    for entry in listing {
        let path = entry
            .map_err(KitError::io(format!("list {}", dir.display())))?
            .path();
        if path.extension().is_some_and(|e| e == "json") {
            records.push(path);
        }
    }
    let [path] = records.as_slice() else {
        return Err(KitError::Invalid(format!(
            "{}: expected one mount record, found {records:?}",
            dir.display()
        )));
    };
    let bytes = std::fs::read(path).map_err(KitError::io(format!("read {}", path.display())))?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| KitError::Invalid(format!("{}: {e}", path.display())))?;
    let text = |field: &str| -> Result<String, KitError> {
        json[field].as_str().map(str::to_owned).ok_or_else(|| {
            KitError::Invalid(format!("{}: no string field {field:?}", path.display()))
        })
    };
    Ok(MountRecord {
        mountpoint: text("mountpoint")?.into(),
        image: text("image")?,
        manifest_digest: text("manifest_digest")?,
        bootstrap: text("bootstrap")?.into(),
        pid: json["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| KitError::Invalid(format!("{}: no pid", path.display())))?,
        log: text("log")?.into(),
    })
}

/// An image mounted with `lodectl mount`; `lodectl umount` on drop.
pub struct LodeMount {
    lodectl: Lodectl,
    mountpoint: PathBuf,
    state_dir: PathBuf,
    record: Option<MountRecord>,
    mounted: bool,
    // Last: removed only after the drop above has unmounted.
    _dirs: tempfile::TempDir,
}

impl LodeMount {
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `mountpoint/relative`.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(relative)
    }

    pub fn record(&self) -> &MountRecord {
        self.record.as_ref().expect("record is read at mount")
    }

    /// The bootstrap the daemon serves.
    pub fn bootstrap(&self) -> Result<Bootstrap, KitError> {
        let path = &self.record().bootstrap;
        Bootstrap::open(path).map_err(|e| KitError::Invalid(format!("{}: {e}", path.display())))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.record().log).unwrap_or_default()
    }

    /// The daemon's counters (see `fsd/src/metrics.rs`), asked for with
    /// SIGUSR1.
    pub fn metrics(&self) -> Result<Value, KitError> {
        request_metrics(self.record().pid, &self.record().log)
    }

    /// Waits until every range request the daemon started has ended.
    pub fn wait_fetches_settled(&self) -> Result<(), KitError> {
        wait_until(Duration::from_secs(30), "range requests to end", || {
            self.metrics()
                .is_ok_and(|m| super::fsd::fetches_settled(&m))
        })
    }

    /// `lodectl umount`; fails if the mount or the daemon outlives it.
    pub fn umount(mut self) -> Result<(), KitError> {
        self.mounted = false;
        let run = self.lodectl.run([
            OsString::from("umount"),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            self.mountpoint.clone().into(),
        ])?;
        if !run.success {
            force_unmount(&self.mountpoint);
            return Err(KitError::Command {
                what: format!("lodectl umount {}", self.mountpoint.display()),
                message: format!("exit {:?}: {}", run.code, run.stderr.trim()),
            });
        }
        if is_fsd_mount(&self.mountpoint) {
            return Err(KitError::Invalid(format!(
                "{} still mounted after lodectl umount",
                self.mountpoint.display()
            )));
        }
        let pid = self.record().pid;
        wait_until(Duration::from_secs(10), "lode-fsd to exit", || {
            !process_alive(pid)
        })
    }
}

impl Drop for LodeMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let _ = self.lodectl.run([
            OsString::from("umount"),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            self.mountpoint.clone().into(),
        ]);
        if let Some(record) = &self.record {
            if process_alive(record.pid) {
                let _ = kill(Pid::from_raw(record.pid), Signal::SIGKILL);
            }
        }
        force_unmount(&self.mountpoint);
    }
}
