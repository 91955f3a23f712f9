//! The daemon's main loop, the same in every mode: start serving (mount,
//! take over, or wait for the API), announce readiness, and react to
//! signals, the session's end and `PUT /daemon/exit`.
//!
//! Signals: SIGTERM or SIGINT unmounts (a busy mount is detached lazily and
//! served until its last user lets go) and a second one aborts the
//! connection; SIGUSR1 logs the metrics as JSON; SIGUSR2 exits without
//! unmounting when a supervisor holds the connection for a successor, and
//! is ignored otherwise.
//!
//! Readiness: with `ready`, the daemon writes `ready\n` to it once it
//! serves (or waits in INIT for a takeover), then closes it; a daemon that
//! fails to start closes it without writing.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lode_common::api::{DaemonMode, MountRequest};
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use super::state::StateEvent;
use super::{io_err, Host, HostError, HostEvent, HostOptions};
use crate::api::{server, DaemonControl};

/// Everything `lode-fsd` was started with.
pub struct RunOptions {
    pub host: HostOptions,
    /// Serve the control API here.
    pub apisock: Option<PathBuf>,
    /// Mount this instance at start (`--bootstrap`/`--blob-source`).
    pub initial: Option<MountRequest>,
    pub pid_file: Option<PathBuf>,
    pub ready: Option<OwnedFd>,
}

/// Runs the daemon to its end.
pub fn run(options: RunOptions) -> Result<(), HostError> {
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread below sees these signals.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| io_err("block signals")(e.into()))?;
    let (events, received) = mpsc::channel();
    let signal_events = events.clone();
    std::thread::Builder::new()
        .name("lode-signals".into())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal_events.send(HostEvent::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(io_err("spawn the signal thread"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lode-net")
        .enable_all()
        .build()
        .map_err(io_err("start the tokio runtime"))?;
    let host = Arc::new(Host::new(options.host, runtime.handle().clone(), events)?);
    let api = match &options.apisock {
        Some(path) => Some(Api::serve(&host, &runtime, path)?),
        None => None,
    };
    let result = start(&host, options.initial).and_then(|()| {
        if let Some(path) = &options.pid_file {
            write_pid_file(path)?;
        }
        if let Some(fd) = options.ready {
            if let Err(e) = File::from(fd).write_all(b"ready\n") {
                warn!(error = %e, "cannot write the readiness notification");
            }
        }
        main_loop(&host, &received)
    });
    let _ = host.state().apply(StateEvent::Stop);
    host.log_metrics("exiting");
    if let Some(api) = api {
        api.stop(&runtime);
    }
    if let Some(path) = &options.pid_file {
        let _ = std::fs::remove_file(path);
    }
    // Requests a detached daemon leaves running are the successor's to answer.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Mounts, takes over, or waits for the API, as the options say.
fn start(host: &Host, initial: Option<MountRequest>) -> Result<(), HostError> {
    if host.mount_kept_for_takeover() {
        info!(
            mountpoint = %host.options.mountpoint.display(),
            "the mountpoint is still a Lode mount (kept for a successor): waiting in INIT \
             for PUT /api/v1/daemon/fuse/takeover"
        );
        return Ok(());
    }
    if host.options.takeover {
        return host.take_over();
    }
    if host.options.mode == DaemonMode::Shared {
        host.open_shared()?;
    }
    if let Some(request) = initial {
        let mountpoint = host.options.mountpoint.clone();
        host.mount(&mountpoint, request)
            .map_err(|e| io_err("mount")(std::io::Error::other(e)))?;
    }
    Ok(())
}

fn main_loop(host: &Host, received: &mpsc::Receiver<HostEvent>) -> Result<(), HostError> {
    let mut unmounting = false;
    while let Ok(event) = received.recv() {
        match event {
            HostEvent::Signal(Signal::SIGUSR1) => host.log_metrics("metrics"),
            HostEvent::Signal(Signal::SIGUSR2) if host.options.supervisor.is_none() => {
                warn!("SIGUSR2 ignored: no supervisor keeps the connection for a successor (SIGTERM stops the daemon)");
            }
            HostEvent::Signal(Signal::SIGUSR2) => {
                info!("leaving the mount to a successor on SIGUSR2");
                host.detach();
                return Ok(());
            }
            HostEvent::Signal(signal) => {
                if !host.serving() {
                    info!(%signal, "stopping on signal");
                    return Ok(());
                }
                let result = if unmounting {
                    info!(%signal, "aborting the FUSE connection on a second signal");
                    host.abort()
                } else {
                    info!(%signal, "unmounting on signal");
                    host.unmount()
                };
                // A failed unmount leaves the session serving; exit anyway
                // (the kernel answers ENOTCONN once we are gone) rather than
                // hang.
                if let Err(e) = result {
                    error!(error = %e, "cannot stop serving");
                    return Err(e);
                }
                unmounting = true;
            }
            HostEvent::SessionEnded => return host.finish(),
            HostEvent::Exit => {
                // Leave the mount and its connection as they are: a
                // supervisor (or nobody) holds them for a successor.
                info!("exiting without unmounting");
                host.detach();
                return Ok(());
            }
        }
    }
    Ok(())
}

fn write_pid_file(path: &Path) -> Result<(), HostError> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err(format!("write pid file {}", path.display())))
}

/// The control API being served.
struct Api {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<server::Connections>,
}

impl Api {
    fn serve(
        host: &Arc<Host>,
        runtime: &tokio::runtime::Runtime,
        path: &Path,
    ) -> Result<Self, HostError> {
        let listener = {
            let _entered = runtime.enter();
            server::bind(path).map_err(|e| io_err("API socket")(std::io::Error::other(e)))?
        };
        let control: Arc<dyn DaemonControl> = Arc::clone(host) as Arc<dyn DaemonControl>;
        let connections = Arc::new(server::Connections::default());
        let task = runtime.spawn(server::serve(listener, control, Arc::clone(&connections)));
        Ok(Self {
            path: path.to_path_buf(),
            task,
            connections,
        })
    }

    /// Answers the requests being served (the exit request, typically),
    /// then stops listening and removes the socket.
    fn stop(self, runtime: &tokio::runtime::Runtime) {
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(2);
        if !runtime.block_on(self.connections.drained(deadline)) {
            warn!("API connections still open at exit");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
