//! Wiring for the `lode-fsd` binary: builds the read path for one image
//! instance, mounts it, serves it until a signal or an external unmount, and
//! shuts down cleanly (final cache flush, metrics, pid file).
//!
//! Readiness: when `--ready-fd N` is given, the daemon writes `ready\n` to
//! descriptor N once the mount answers requests, then closes it. A daemon
//! that fails to start closes N without writing, so a parent reading N to EOF
//! learns the outcome either way.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use lode_common::format::{Bootstrap, FormatError, Ino};
use lode_common::registry::{RegistryClient, RegistryError, RegistryOptions};
use lode_config::FsdConfig;
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use crate::backend::{BlobBackend, BlobSource, DirBackend, RegistryBackend};
use crate::cache::{CacheError, ChunkCache};
use crate::fetch::{FetchSettings, Fetcher};
use crate::fuse::{FuseFs, KernelTuning};
use crate::metrics::Metrics;
use crate::mount::{self, MountError, MountOptions};
use crate::ops::{LodeFs, Ttls};
use crate::takeover::{self, Failover, TakeoverError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("bootstrap {path}: {source}")]
    Bootstrap {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("invalid configuration: {0}")]
    Config(#[from] lode_config::ConfigError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// How long stopping waits for running fetches to finish and cache their chunks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What to serve and where.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub bootstrap: PathBuf,
    pub blob_source: BlobSource,
    pub mountpoint: PathBuf,
    /// Validated, with command-line overrides applied.
    pub config: FsdConfig,
    /// The instance's sequence number and image reference, as the state
    /// handed to a supervisor names them.
    pub seq: u32,
    pub image_ref: Option<String>,
}

/// Something the daemon's main loop reacts to.
#[derive(Debug)]
pub enum Event {
    Signal(Signal),
    /// The FUSE session ended (unmounted, or the connection was aborted).
    SessionEnded,
}

/// Makes written cache chunks durable periodically, and once more at stop.
struct Flusher {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Flusher {
    fn start(cache: Arc<ChunkCache>, interval: Duration) -> Result<Self, DaemonError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lode-flush".into())
            .spawn(move || loop {
                let last = !matches!(
                    stopped.recv_timeout(interval),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
                if let Err(e) = cache.flush() {
                    warn!(error = %e, "periodic cache flush failed");
                }
                if last {
                    return;
                }
            })
            .map_err(io_err("spawn cache flusher"))?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// A mounted, serving image instance.
pub struct Daemon {
    mountpoint: PathBuf,
    /// Device number of the mount (0 if unknown); names its FUSE connection.
    dev: u64,
    session: JoinHandle<std::io::Result<()>>,
    fetcher: Arc<Fetcher>,
    flusher: Flusher,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Runtime,
    /// Our own reference to the connection, for the supervisor.
    fuse: OwnedFd,
    /// What a successor needs to resume serving.
    handover: lode_common::supervisor::DaemonState,
    failover: Failover,
}

impl Daemon {
    /// Builds the read path, mounts and starts serving. `events` receives
    /// [`Event::SessionEnded`] when the session ends for any reason.
    pub fn start(options: DaemonOptions, events: mpsc::Sender<Event>) -> Result<Self, DaemonError> {
        Self::start_with(options, events, &Failover::default())
    }

    /// Like [`Daemon::start`]; with `failover.takeover` resumes the
    /// connection the supervisor holds instead of mounting, and with a
    /// supervisor hands it the state once serving.
    pub fn start_with(
        options: DaemonOptions,
        events: mpsc::Sender<Event>,
        failover: &Failover,
    ) -> Result<Self, DaemonError> {
        let predecessor = if failover.takeover {
            Some(takeover::fetch(failover, &options.mountpoint)?)
        } else {
            takeover::check_not_mounted(&options.mountpoint)?;
            None
        };
        let config = &options.config;
        config.validate()?;
        let bootstrap =
            Bootstrap::open(&options.bootstrap).map_err(|source| DaemonError::Bootstrap {
                path: options.bootstrap.clone(),
                source,
            })?;
        let root = bootstrap
            .inode(Ino::ROOT)
            .map_err(|source| DaemonError::Bootstrap {
                path: options.bootstrap.clone(),
                source,
            })?;
        let bootstrap = Arc::new(bootstrap);
        let metrics = Arc::new(Metrics::new());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lode-net")
            .enable_all()
            .build()
            .map_err(io_err("start tokio runtime"))?;
        let backend: Arc<dyn BlobBackend> = match &options.blob_source {
            BlobSource::Registry(reference) => {
                let client = RegistryClient::new(RegistryOptions {
                    plain_http: config.registry.plain_http,
                    request_timeout: config.registry.request_timeout(),
                    max_retries: config.registry.max_retries,
                    docker_config: config.registry.docker_config.clone(),
                })?;
                Arc::new(RegistryBackend::new(
                    client,
                    reference.clone(),
                    runtime.handle().clone(),
                ))
            }
            BlobSource::Dir(dir) => Arc::new(DirBackend::new(dir)),
        };
        let cache_dir = config.cache.dir.as_deref().unwrap_or(Path::new("."));
        let cache = Arc::new(ChunkCache::open(cache_dir)?.with_direct_io(config.cache.direct_io));
        let fetcher = Arc::new(
            Fetcher::new(
                Arc::clone(&bootstrap),
                backend,
                Arc::clone(&cache),
                Arc::clone(&metrics),
                FetchSettings::from(&config.fetch),
            )
            .map_err(io_err("start fetch workers"))?,
        );
        let ttls = Ttls {
            entry: Duration::from_secs(config.fuse.entry_timeout_secs),
            attr: Duration::from_secs(config.fuse.attr_timeout_secs),
        };
        let fs = Arc::new(LodeFs::new(Arc::clone(&fetcher), ttls));
        let flusher = Flusher::start(cache, Duration::from_millis(config.cache.flush_interval_ms))?;

        let fs = FuseFs::new(
            fs,
            Arc::clone(&metrics),
            KernelTuning {
                max_background: config.fuse.max_background,
            },
        );
        let started = match &predecessor {
            Some(p) => takeover::start_resumed(fs, &p.fd, &p.params, session_config(config))
                .map(|session| (p.fd.try_clone(), p.params.clone(), session))
                .map_err(DaemonError::from),
            None => match mount::mount_fuse(&options.mountpoint, &MountOptions::lode(root.mode)) {
                Ok(fd) => match takeover::start_fresh(fs, &fd, session_config(config)) {
                    Ok((session, params)) => Ok((Ok(fd), params, session)),
                    Err(e) => {
                        if let Err(u) = mount::unmount(&options.mountpoint) {
                            error!(error = %u, "cannot unmount after a failed start");
                        }
                        Err(e.into())
                    }
                },
                Err(e) => Err(e.into()),
            },
        };
        let (fuse, params, session) = match started {
            Ok((Ok(fuse), params, session)) => (fuse, params, session),
            Ok((Err(e), _, _)) => {
                flusher.stop();
                return Err(io_err("duplicate /dev/fuse descriptor")(e));
            }
            Err(e) => {
                flusher.stop();
                return Err(e);
            }
        };
        let session = match spawn_session(session, events) {
            Ok(session) => session,
            Err(e) => {
                flusher.stop();
                return Err(e);
            }
        };
        let handover = takeover::single_instance_state(
            &failover.id,
            &params,
            lode_common::supervisor::InstanceState {
                id: failover.id.clone(),
                seq: u64::from(options.seq),
                mountpoint: options.mountpoint.display().to_string(),
                bootstrap: options.bootstrap.display().to_string(),
                blob_source: options.blob_source.to_string(),
                image_ref: options.image_ref.clone(),
                config: serde_json::to_string(&options.config).unwrap_or_default(),
            },
        );
        if let Some(p) = &predecessor {
            match fuse.try_clone() {
                Ok(fd) => takeover::resend_after_exit(p.state.pid, fd),
                Err(e) => warn!(error = %e, "cannot watch the predecessor"),
            }
        }
        let dev = match mount::mounted_dev(&options.mountpoint) {
            Ok(dev) => dev,
            Err(e) => {
                warn!(error = %e, "cannot stat the mount; readahead and abort unavailable");
                0
            }
        };
        if dev != 0 {
            mount::set_read_ahead(dev, config.fuse.read_ahead_kb);
        }
        info!(
            mountpoint = %options.mountpoint.display(),
            bootstrap = %options.bootstrap.display(),
            source = %options.blob_source,
            "serving"
        );
        Ok(Self {
            mountpoint: options.mountpoint,
            dev,
            session,
            fetcher,
            flusher,
            metrics,
            runtime,
            fuse,
            handover,
            failover: failover.clone(),
        }
        .reported())
    }

    fn reported(self) -> Self {
        if let Err(e) = self.report_to_supervisor() {
            error!(error = %e, "cannot hand the state to the supervisor; no takeover possible");
        }
        self
    }

    /// Hands the current state and the /dev/fuse descriptor to the
    /// supervisor, if there is one. Call after every change of the instances.
    pub fn report_to_supervisor(&self) -> Result<(), DaemonError> {
        match &self.failover.supervisor {
            Some(path) => Ok(takeover::report(path, &self.handover, &self.fuse)?),
            None => Ok(()),
        }
    }

    /// Stops without unmounting, leaving the connection to the supervisor
    /// and a successor: makes the cache durable and lets the process exit
    /// with the session still reading. Requests this process read but did
    /// not answer are resent by the successor. The state is not reported
    /// again: a successor may already have replaced it with its own.
    pub fn detach(self) -> Result<(), DaemonError> {
        self.flusher.stop();
        self.runtime.shutdown_background();
        info!(mountpoint = %self.mountpoint.display(), "detached; the mount stays for a successor");
        Ok(())
    }

    /// Tells the supervisor this daemon's connection is gone.
    fn forget_at_supervisor(&self) {
        if let Some(path) = &self.failover.supervisor {
            takeover::forget(path, &self.failover.id);
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts; the session then ends and [`Event::SessionEnded`] follows.
    pub fn unmount(&self) -> Result<(), DaemonError> {
        Ok(mount::unmount(&self.mountpoint)?)
    }

    /// Ends the session at once, even while the mount is still in use
    /// (lazily detached): requests in flight fail with ENOTCONN.
    pub fn abort(&self) -> Result<(), DaemonError> {
        if self.dev == 0 {
            return Err(DaemonError::Io {
                what: "abort FUSE connection".into(),
                source: std::io::Error::other("device number of the mount unknown"),
            });
        }
        mount::abort_connection(self.dev).map_err(io_err("abort FUSE connection"))
    }

    /// Waits for the session to end, then stops fetching and makes the cache durable.
    pub fn wait(self) -> Result<(), DaemonError> {
        let result = match self.session.join() {
            Ok(r) => r.map_err(io_err("FUSE session")),
            Err(_) => Err(DaemonError::Io {
                what: "FUSE session".into(),
                source: std::io::Error::other("session thread panicked"),
            }),
        };
        if !self.fetcher.shutdown(SHUTDOWN_GRACE) {
            warn!("fetches still running at exit; their chunks stay uncached");
        }
        self.flusher.stop();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

fn session_config(config: &FsdConfig) -> fuser::Config {
    let mut session_config = fuser::Config::default();
    session_config.n_threads = Some(config.fuse.threads);
    // One descriptor shared by all workers: a cloned descriptor is a kernel
    // file of its own with its own list of requests being processed, which a
    // successor could neither resend nor keep open.
    session_config.clone_fd = false;
    session_config
}

fn spawn_session(
    session: fuser::Session<FuseFs>,
    events: mpsc::Sender<Event>,
) -> Result<JoinHandle<std::io::Result<()>>, DaemonError> {
    std::thread::Builder::new()
        .name("lode-session".into())
        .spawn(move || {
            let result = session.run();
            let _ = events.send(Event::SessionEnded);
            result
        })
        .map_err(io_err("spawn FUSE session"))
}

/// Signals the daemon handles; blocked in every thread and taken by `sigwait`.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Runs the daemon until SIGTERM/SIGINT (unmount, then exit) or an external
/// unmount. A busy mount is detached lazily and served until its last user
/// lets go; a second SIGTERM/SIGINT then aborts the connection. SIGUSR1 logs
/// the metrics as JSON. SIGUSR2 exits without unmounting, leaving the
/// connection to the supervisor for a successor (upgrade). Writes `pid_file`
/// once serving and removes it at exit; writes `ready\n` to `ready` once
/// serving.
pub fn run(
    options: DaemonOptions,
    failover: &Failover,
    pid_file: Option<&Path>,
    ready: Option<OwnedFd>,
) -> Result<(), DaemonError> {
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread below sees these signals.
    let signals = handled_signals();
    signals
        .thread_block()
        .map_err(|e| io_err("block signals")(std::io::Error::from(e)))?;
    let (events, received) = mpsc::channel();
    let signal_events = events.clone();
    std::thread::Builder::new()
        .name("lode-signals".into())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal_events.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(io_err("spawn signal thread"))?;

    let daemon = Daemon::start_with(options, events, failover)?;
    if let Some(path) = pid_file {
        write_pid_file(path)?;
    }
    if let Some(fd) = ready {
        notify_ready(fd);
    }
    let mut unmount_error = None;
    let mut detach = false;
    while let Ok(event) = received.recv() {
        match event {
            Event::Signal(Signal::SIGUSR1) => {
                info!(metrics = %daemon.metrics().to_json(), "metrics")
            }
            Event::Signal(Signal::SIGUSR2) => {
                info!("leaving the mount to a successor on SIGUSR2");
                detach = true;
                break;
            }
            Event::Signal(signal) => {
                info!(%signal, "unmounting on signal");
                if let Err(e) = daemon.unmount() {
                    error!(error = %e, "unmount failed");
                    unmount_error = Some(e);
                    break;
                }
            }
            Event::SessionEnded => break,
        }
    }
    let metrics = Arc::clone(daemon.metrics());
    // A failed unmount leaves the session serving; exit anyway (the kernel
    // answers ENOTCONN once we are gone) rather than hang on the join.
    let result = match (detach, unmount_error) {
        (true, _) => daemon.detach(),
        (false, Some(e)) => Err(e),
        (false, None) => {
            daemon.forget_at_supervisor();
            daemon.wait()
        }
    };
    info!(metrics = %metrics.to_json(), "exiting");
    if let Some(path) = pid_file {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn write_pid_file(path: &Path) -> Result<(), DaemonError> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err(format!("write pid file {}", path.display())))
}

fn notify_ready(fd: OwnedFd) {
    let mut file = File::from(fd);
    if let Err(e) = file.write_all(b"ready\n") {
        warn!(error = %e, "cannot write readiness notification");
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
