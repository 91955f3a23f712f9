//! `lode-fsd` in any of its three modes behind one type, so that a test runs
//! unchanged over all of them: standalone (one image at the mount root, no
//! API), dedicated (the image mounted at the root through the API) and
//! shared (the image mounted through the API as the subdirectory
//! [`INSTANCE_ID`] of the mount). [`ModeFsd`] says where the image's root
//! is, reads the daemon's counters (SIGUSR1 and its log line for standalone,
//! the metrics API otherwise), and signals, kills and replaces the daemon
//! with a successor that takes its mount over from an in-process
//! supervisor.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lode_common::api::{DaemonClient, DaemonState, InstanceConfig, MountRequest};
use lode_common::supervisor::SupervisorServer;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::fsd::{counter, is_fsd_mount, request_metrics, FsdOptions};
use crate::{wait_until, KitError};

/// How `lode-fsd` serves the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--bootstrap --blob-source`, no API.
    Standalone,
    /// `--apisock --mode dedicated`, then `POST /mount` of the mountpoint.
    Dedicated,
    /// `--apisock --mode shared`, then `POST /mount` of `<mountpoint>/<id>`.
    Shared,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Standalone, Mode::Dedicated, Mode::Shared];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Dedicated => "dedicated",
            Mode::Shared => "shared",
        }
    }

    /// Whether the daemon serves the control API.
    pub fn managed(self) -> bool {
        self != Mode::Standalone
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The shared-mode instance id of the image (its directory under the mount).
pub const INSTANCE_ID: &str = "img";
/// Its sequence number.
pub const INSTANCE_SEQ: u32 = 1;
/// The daemons' id at the supervisor.
pub const SUPERVISOR_ID: &str = "modes";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The counters every mode reports, under one set of names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// File bytes returned to FUSE reads.
    pub bytes_read: u64,
    /// Range requests started and ended.
    pub backend_requests: u64,
    pub backend_requests_done: u64,
    /// Stored bytes received from the registry.
    pub backend_bytes: u64,
    /// Of those, the bytes of blob fronts fetched ahead of the mount.
    pub ahead_bytes: u64,
    pub backend_errors: u64,
    pub digest_errors: u64,
    /// Chunks that could not be written to the cache (served all the same).
    pub cache_write_errors: u64,
}

impl Counters {
    /// Whether every range request the daemon started has ended.
    pub fn settled(&self) -> bool {
        self.backend_requests == self.backend_requests_done
    }
}

/// A `lode-fsd` of one [`Mode`] on a fresh temporary mountpoint, and the
/// successors that take its mount over. The current daemon is stopped
/// (SIGTERM, then SIGKILL and a lazy unmount) on drop.
pub struct ModeFsd {
    mode: Mode,
    binary: PathBuf,
    options: FsdOptions,
    dir: tempfile::TempDir,
    mountpoint: PathBuf,
    supervisor: Option<SupervisorServer>,
    api: Option<DaemonClient>,
    child: Option<Child>,
    /// Daemons killed with SIGKILL, reaped at drop.
    killed: Vec<Child>,
    starts: u32,
    runtime: tokio::runtime::Runtime,
}

impl ModeFsd {
    /// Starts `binary` in `mode` serving `options`' image, with an
    /// in-process supervisor when `supervised`; returns once the image's
    /// root serves (and the supervisor holds the daemon's state).
    pub fn start(
        binary: &Path,
        mode: Mode,
        options: &FsdOptions,
        supervised: bool,
    ) -> Result<Self, KitError> {
        let fsd = Self::start_unmounted(binary, mode, options, supervised)?;
        if fsd.mode.managed() {
            fsd.mount_image()?;
        }
        Ok(fsd)
    }

    /// Like [`ModeFsd::start`], but a managed daemon is left serving no
    /// image (shared: RUNNING; dedicated: INIT) until [`ModeFsd::mount_image`].
    pub fn start_unmounted(
        binary: &Path,
        mode: Mode,
        options: &FsdOptions,
        supervised: bool,
    ) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lode-fsd-{mode}-"))
            .tempdir()
            .map_err(KitError::io("create fsd directories"))?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)
            .map_err(KitError::io(format!("create {}", mountpoint.display())))?;
        let supervisor = supervised
            .then(|| SupervisorServer::bind(&dir.path().join("supervisor.sock")))
            .transpose()
            .map_err(|e| KitError::Invalid(format!("bind the supervisor: {e}")))?;
        let api = mode
            .managed()
            .then(|| DaemonClient::new(dir.path().join("api.sock")));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KitError::io("start tokio runtime"))?;
        let mut fsd = Self {
            mode,
            binary: binary.to_path_buf(),
            options: options.clone(),
            dir,
            mountpoint,
            supervisor,
            api,
            child: None,
            killed: Vec::new(),
            starts: 0,
            runtime,
        };
        fsd.launch(false)?;
        Ok(fsd)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The FUSE mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The image's root: the mountpoint, or its instance directory in shared mode.
    pub fn root(&self) -> PathBuf {
        match self.mode {
            Mode::Shared => self.mountpoint.join(INSTANCE_ID),
            _ => self.mountpoint.clone(),
        }
    }

    /// A path of the image.
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root().join(relative)
    }

    /// The current daemon's pid.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Every daemon's log, one after the other.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// The log every daemon of this mount appends to.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("fsd.log")
    }

    /// The API client (managed modes).
    pub fn api(&self) -> Option<&DaemonClient> {
        self.api.as_ref()
    }

    pub fn supervisor(&self) -> Option<&SupervisorServer> {
        self.supervisor.as_ref()
    }

    fn client(&self) -> Result<&DaemonClient, KitError> {
        self.api
            .as_ref()
            .ok_or_else(|| KitError::Invalid(format!("a {} daemon has no API", self.mode)))
    }

    /// Runs an API call to completion.
    pub fn block_on<T, E: fmt::Display>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, KitError> {
        self.runtime.block_on(call).map_err(|e| KitError::Command {
            what: format!("{what} ({} daemon)", self.mode),
            message: e.to_string(),
        })
    }

    /// Whether the mountpoint is in the mount table as an fsd mount.
    pub fn is_mounted(&self) -> bool {
        is_fsd_mount(&self.mountpoint)
    }

    /// The current daemon's counters for the image.
    pub fn counters(&self) -> Result<Counters, KitError> {
        if !self.mode.managed() {
            let pid = self
                .pid()
                .ok_or_else(|| KitError::Invalid("lode-fsd is not running".into()))?;
            let m = request_metrics(pid, &self.log())?;
            return Ok(Counters {
                bytes_read: counter(&m, "bytes_read"),
                backend_requests: counter(&m, "backend_requests"),
                backend_requests_done: counter(&m, "backend_requests_done"),
                backend_bytes: counter(&m, "bytes_fetched"),
                ahead_bytes: counter(&m, "ahead_bytes"),
                backend_errors: counter(&m, "backend_errors"),
                digest_errors: counter(&m, "digest_errors"),
                cache_write_errors: counter(&m, "cache_write_errors"),
            });
        }
        let id = (self.mode == Mode::Shared).then_some(INSTANCE_ID);
        let api = self.client()?;
        let fs = self.block_on("GET /metrics", api.fs_metrics(id))?;
        let cache = self.block_on("GET /metrics/cache", api.cache_metrics(id))?;
        let backend = self.block_on("GET /metrics/backend", api.backend_metrics(id))?;
        Ok(Counters {
            bytes_read: fs.bytes_read,
            backend_requests: backend.requests,
            backend_requests_done: backend.latency.counts.iter().sum(),
            backend_bytes: backend.bytes,
            ahead_bytes: cache.ahead_bytes,
            backend_errors: backend.errors,
            digest_errors: cache.digest_errors,
            cache_write_errors: cache.write_errors,
        })
    }

    /// Waits until every range request the daemon started has ended, and
    /// returns the counters then.
    pub fn settled_counters(&self) -> Result<Counters, KitError> {
        let mut last = Counters::default();
        let mut failed = None;
        wait_until(START_TIMEOUT, "lode-fsd's range requests to end", || {
            match self.counters() {
                Ok(c) => last = c,
                Err(e) => failed = Some(e),
            }
            failed.is_some() || last.settled()
        })?;
        failed.map_or(Ok(last), Err)
    }

    /// Mounts the image again as shared instance `id` with `seq`; returns
    /// its root.
    pub fn mount_shared(&self, id: &str, seq: u32) -> Result<PathBuf, KitError> {
        let root = self.mountpoint.join(id);
        let request = self.mount_request(seq);
        self.block_on("POST /mount", self.client()?.mount(&root, &request))?;
        Ok(root)
    }

    /// `DELETE /mount` of `mountpoint` (managed modes).
    pub fn unmount(&self, mountpoint: &Path) -> Result<(), KitError> {
        self.block_on("DELETE /mount", self.client()?.umount(mountpoint))
    }

    fn mount_request(&self, seq: u32) -> MountRequest {
        MountRequest {
            source: self.options.bootstrap.clone(),
            config: InstanceConfig {
                blob_source: self.options.blob_source.clone(),
                plain_http: self.options.plain_http,
                docker_config: None,
                hosts: Vec::new(),
            },
            seq,
            image_ref: None,
            credentials: None,
        }
    }

    /// Sends `signal` to the current daemon.
    pub fn signal(&self, signal: Signal) -> Result<(), KitError> {
        let pid = self
            .pid()
            .ok_or_else(|| KitError::Invalid("lode-fsd is not running".into()))?;
        kill(Pid::from_raw(pid), signal)
            .map_err(|e| KitError::Invalid(format!("{signal} to lode-fsd: {e}")))
    }

    /// SIGKILL. The killed daemon is reaped at drop: one of its threads can
    /// stay blocked on the connection until a successor answers it.
    pub fn kill(&mut self) -> Result<(), KitError> {
        self.signal(Signal::SIGKILL)?;
        self.killed.extend(self.child.take());
        Ok(())
    }

    /// Waits for the current daemon to exit (after a signal) and reaps it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, KitError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| KitError::Invalid("lode-fsd is not running".into()))?;
        let mut status = None;
        let waited = wait_until(timeout, "lode-fsd to exit", || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match (waited, status) {
            (Ok(()), Some(status)) => Ok(status),
            (waited, _) => {
                self.child = Some(child);
                Err(waited
                    .err()
                    .unwrap_or_else(|| KitError::Invalid("no status".into())))
            }
        }
    }

    /// Starts a successor with `--takeover` (after the current daemon was
    /// killed or left on SIGUSR2) and waits until it serves the mount.
    pub fn take_over(&mut self) -> Result<(), KitError> {
        if self.supervisor.is_none() {
            return Err(KitError::Invalid("take over: no supervisor".into()));
        }
        if let Some(child) = &mut self.child {
            if child.try_wait().ok().flatten().is_none() {
                return Err(KitError::Invalid("take over: the daemon still runs".into()));
            }
            self.child = None;
        }
        self.launch(true)
    }

    /// Spawns a daemon and waits until the image's root serves.
    fn launch(&mut self, takeover: bool) -> Result<(), KitError> {
        self.starts += 1;
        let pid_file = self.dir.path().join(format!("fsd-{}.pid", self.starts));
        let mut command = self.command(takeover, &pid_file)?;
        let child = command
            .spawn()
            .map_err(KitError::io(format!("start {}", self.binary.display())))?;
        self.child = Some(child);
        let mut exited = None;
        wait_until(START_TIMEOUT, "lode-fsd to write its pid file", || {
            exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || pid_file.exists()
        })?;
        if let Some(status) = exited {
            self.child = None;
            return Err(self.failed(&format!("lode-fsd exited with {status}")));
        }
        if self.mode.managed() {
            self.settle_managed(takeover)
                .map_err(|e| self.failed(&e.to_string()))?;
            if !takeover {
                return Ok(());
            }
        }
        self.wait_reported()
    }

    fn command(&self, takeover: bool, pid_file: &Path) -> Result<Command, KitError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(KitError::io("open the fsd log"))?;
        let log_err = log.try_clone().map_err(KitError::io("clone the fsd log"))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--cache-dir")
            .arg(&self.options.cache_dir)
            .arg("--mountpoint")
            .arg(&self.mountpoint)
            .arg("--pid-file")
            .arg(pid_file)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        match &self.api {
            Some(api) => {
                command
                    .arg("--apisock")
                    .arg(api.socket())
                    .args(["--mode", self.mode.name()]);
            }
            None => {
                command
                    .arg("--bootstrap")
                    .arg(&self.options.bootstrap)
                    .arg("--blob-source")
                    .arg(&self.options.blob_source);
            }
        }
        if self.options.plain_http {
            command.arg("--plain-http");
        }
        if let Some(config) = &self.options.config {
            command.arg("--config").arg(config);
        }
        if let Some(supervisor) = &self.supervisor {
            command
                .arg("--supervisor")
                .arg(supervisor.path())
                .args(["--id", SUPERVISOR_ID]);
            if takeover {
                command.arg("--takeover");
            }
        }
        Ok(command)
    }

    /// Managed modes: mounts the image through the API and makes the
    /// daemon RUNNING; returns once the image's root serves.
    pub fn mount_image(&self) -> Result<(), KitError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mounted = (|| {
            let request = self.mount_request(INSTANCE_SEQ);
            let api = self.client()?;
            self.block_on("POST /mount", api.mount(&self.root(), &request))?;
            self.reach(&[DaemonState::Ready, DaemonState::Running], deadline)
        })();
        mounted.map_err(|e: KitError| self.failed(&e.to_string()))?;
        self.wait_reported()
    }

    /// Waits until the daemon is in one of `states`; one that is READY is
    /// made RUNNING.
    fn reach(&self, states: &[DaemonState], deadline: Instant) -> Result<(), KitError> {
        let api = self.client()?;
        let reached = self.block_on(
            "wait for the daemon's state",
            api.wait_for_states(states, deadline, || false),
        )?;
        if reached.state == DaemonState::Ready {
            self.block_on("PUT /daemon/start", api.start())?;
        }
        Ok(())
    }

    /// The instance configuration of the image's mount.
    pub fn instance_config(&self) -> InstanceConfig {
        self.mount_request(INSTANCE_SEQ).config
    }

    /// Managed modes: a daemon ready for the image's mount (shared:
    /// RUNNING; dedicated: INIT), or a successor that took one over made
    /// RUNNING. A shared daemon mounts only once RUNNING; a dedicated one
    /// only from INIT.
    fn settle_managed(&self, takeover: bool) -> Result<(), KitError> {
        let deadline = Instant::now() + START_TIMEOUT;
        if takeover || self.mode == Mode::Shared {
            self.reach(&[DaemonState::Ready, DaemonState::Running], deadline)
        } else {
            self.reach(&[DaemonState::Init], deadline)
        }
    }

    /// With a supervisor: waits until it holds the current daemon's state
    /// with the image's instance in it.
    fn wait_reported(&self) -> Result<(), KitError> {
        let (Some(supervisor), Some(child)) = (&self.supervisor, &self.child) else {
            return Ok(());
        };
        let pid = child.id();
        wait_until(
            START_TIMEOUT,
            "lode-fsd to report to the supervisor",
            || {
                supervisor
                    .state(SUPERVISOR_ID)
                    .is_some_and(|s| s.pid == pid && !s.instances.is_empty())
            },
        )
        .map_err(|e| self.failed(&e.to_string()))
    }

    fn failed(&self, what: &str) -> KitError {
        KitError::Command {
            what: format!("{} lode-fsd on {}", self.mode, self.mountpoint.display()),
            message: format!("{what}\n--- log ---\n{}", self.log_text()),
        }
    }
}

impl Drop for ModeFsd {
    fn drop(&mut self) {
        super::fsd::stop_daemon(self.child.take(), &self.mountpoint);
        // Closes the descriptors it holds, which ends the connection.
        drop(self.supervisor.take());
        for mut child in self.killed.drain(..) {
            let _ = wait_until(Duration::from_secs(5), "a killed lode-fsd to end", || {
                child.try_wait().ok().flatten().is_some()
            });
        }
    }
}

/// Declares a `#[test]` per listed daemon mode in a module named after the
/// test function, each calling it with its [`Mode`]:
/// `mode_tests!(faults: dedicated => Dedicated, shared => Shared);` runs
/// `faults::dedicated` and `faults::shared`. Use it only for what a mode
/// cannot do (say why); [`every_mode!`] is the rule.
#[macro_export]
macro_rules! mode_tests {
    ($test:ident: $($name:ident => $mode:ident),+ $(,)?) => {
        mod $test {
            $(
                #[test]
                fn $name() {
                    super::$test($crate::lode::Mode::$mode);
                }
            )+
        }
    };
}

/// [`mode_tests!`] in every mode, for each test function listed (every
/// behaviour of `lode-fsd` holds in every mode).
#[macro_export]
macro_rules! every_mode {
    ($($test:ident),+ $(,)?) => {
        $($crate::mode_tests!($test: standalone => Standalone, dedicated => Dedicated, shared => Shared);)+
    };
}
