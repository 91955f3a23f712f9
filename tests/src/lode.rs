//! Driving Lode's own binaries from tests: `lodectl convert`, `lodectl
//! mount`/`umount`, and `lode-fsd` started directly. Mount guards unmount on
//! drop, falling back to killing the daemon and a lazy unmount, so a failing
//! test leaves no mount behind.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use lode_common::format::{Bootstrap, Ino, InodeKind};
use lode_common::mountinfo;
use lode_common::registry::{Reference, RegistryClient, RegistryOptions};
use lode_common::Digest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{
    bin_path, fuse_available, require_root, skip_unless, skopeo_available, wait_until, KitError,
    Registry,
};

pub const LODECTL: &str = "lodectl";
pub const LODE_FSD: &str = "lode-fsd";
/// File system type of fsd mounts in mountinfo.
pub const FSD_FS_TYPE: &str = "fuse.lode";
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// The built binaries a real-component Lode test runs.
#[derive(Clone, Debug)]
pub struct LodeBinaries {
    pub lodectl: Lodectl,
    pub fsd: PathBuf,
}

/// Checks what tests that convert, push and mount need (root, `/dev/fuse`,
/// `docker-registry`, `skopeo`, the built `lodectl` and `lode-fsd`); prints
/// why the test is skipped and returns `None` when something is missing.
pub fn lode_prerequisites() -> Option<LodeBinaries> {
    if !require_root()
        || !skip_unless(fuse_available(), "/dev/fuse cannot be opened")
        || !skip_unless(
            Registry::available(),
            "docker-registry is not installed (apt-get install docker-registry)",
        )
        || !skip_unless(
            skopeo_available(),
            "skopeo is not installed (apt-get install skopeo)",
        )
    {
        return None;
    }
    let lodectl = bin_path(LODECTL);
    let fsd = bin_path(LODE_FSD);
    let built = skip_unless(
        lodectl.is_some() && fsd.is_some(),
        "lodectl and lode-fsd are not built (cargo build --release --workspace --bins)",
    );
    match (lodectl, fsd) {
        (Some(lodectl), Some(fsd)) if built => Some(LodeBinaries {
            lodectl: Lodectl::new(lodectl),
            fsd,
        }),
        _ => None,
    }
}

/// Runs `work` on its own thread and waits at most `limit` for it, so that
/// a read stuck in a FUSE request fails the test instead of hanging it.
/// Panics (naming `what`) on timeout; the stuck thread is left behind.
pub fn bounded<T: Send + 'static>(
    limit: Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

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

    /// `lodectl convert --plain-http [--chunk-size N] SOURCE TARGET`, as a run.
    pub fn convert_run(
        &self,
        source: &Reference,
        target: &Reference,
        chunk_size: Option<u32>,
    ) -> Result<Run, KitError> {
        let mut args: Vec<OsString> = vec!["convert".into(), "--plain-http".into()];
        if let Some(size) = chunk_size {
            args.push("--chunk-size".into());
            args.push(size.to_string().into());
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
    ) -> Result<Digest, KitError> {
        let run = self.convert_run(source, target, chunk_size)?;
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
                "lodectl mount returned but {} is not a {FSD_FS_TYPE} mount",
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
                "lode-fsd is ready but {} is not a {FSD_FS_TYPE} mount",
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

impl Drop for FsdDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
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
        force_unmount(&self.mountpoint);
    }
}

/// Whether `path` is currently an fsd mount.
pub fn is_fsd_mount(path: &Path) -> bool {
    // mountinfo has canonical paths; a dead daemon's mount cannot be
    // canonicalised (ENOTCONN), so fall back to the path as given.
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mountinfo::mount_at(&path)
        .ok()
        .flatten()
        .is_some_and(|m| m.fs_type == FSD_FS_TYPE)
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
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
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

/// Downloads the bootstrap of Lode image `image` into `dir` (plain HTTP);
/// returns the manifest digest the reference resolved to and the file.
pub fn fetch_bootstrap(image: &Reference, dir: &Path) -> Result<(Digest, PathBuf), KitError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(KitError::io("start tokio runtime"))?;
    runtime.block_on(async {
        let client = RegistryClient::new(RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        })
        .map_err(|e| KitError::Invalid(format!("registry client: {e}")))?;
        let lode = lode_common::image::resolve(&client, image)
            .await
            .map_err(|e| KitError::Invalid(format!("resolve {image}: {e}")))?;
        let path = lode_common::image::fetch_bootstrap(&client, image, &lode, dir)
            .await
            .map_err(|e| KitError::Invalid(format!("bootstrap of {image}: {e}")))?;
        Ok((lode.manifest_digest, path))
    })
}

/// Where one chunk of a file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The data blob (a layer digest of the Lode image).
    pub blob: Digest,
    /// Offset and length of the stored bytes in the blob.
    pub offset: u64,
    pub stored_size: u32,
    pub uncompressed_size: u32,
    /// Stored as a zstd frame (otherwise raw).
    pub compressed: bool,
}

/// The chunks of the regular file at `path` (relative to the image root,
/// `/`-separated), in file order.
pub fn file_chunks(bootstrap: &Bootstrap, path: &[u8]) -> Result<Vec<ChunkLocation>, KitError> {
    let bad = |e: lode_common::format::FormatError| {
        KitError::Invalid(format!("bootstrap, {}: {e}", path.escape_ascii()))
    };
    let mut ino = Ino::ROOT;
    for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
        ino = bootstrap
            .lookup(ino, name)
            .map_err(bad)?
            .ok_or_else(|| KitError::Invalid(format!("bootstrap has no {}", path.escape_ascii())))?
            .ino;
    }
    let inode = bootstrap.inode(ino).map_err(bad)?;
    if inode.kind != InodeKind::File {
        return Err(KitError::Invalid(format!(
            "{} is a {:?}, not a regular file",
            path.escape_ascii(),
            inode.kind
        )));
    }
    let count = bootstrap.file_chunk_count(ino).map_err(bad)?;
    let mut out = Vec::new();
    for i in 0..count {
        let chunk = bootstrap
            .chunk(bootstrap.file_chunk(ino, i).map_err(bad)?)
            .map_err(bad)?;
        let blob = bootstrap.blob(chunk.blob).map_err(bad)?;
        out.push(ChunkLocation {
            blob: blob.digest,
            offset: chunk.compressed_offset,
            stored_size: chunk.compressed_size,
            uncompressed_size: chunk.uncompressed_size,
            compressed: chunk.compressed,
        });
    }
    Ok(out)
}

/// Digests and stored sizes of every data blob of the bootstrap.
pub fn data_blobs(bootstrap: &Bootstrap) -> Result<Vec<(Digest, u64)>, KitError> {
    (0..bootstrap.blob_count())
        .map(|i| {
            bootstrap
                .blob(lode_common::format::BlobIndex(i))
                .map(|b| (b.digest, b.compressed_size))
                .map_err(|e| KitError::Invalid(format!("bootstrap blob {i}: {e}")))
        })
        .collect()
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
