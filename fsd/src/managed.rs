//! The main loop of `lode-fsd --apisock`: serves the API, mounts the
//! instance given on the command line (if any), and runs until a signal,
//! the instance's unmount, or `PUT /daemon/exit`.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use lode_common::api::{DaemonMode, MountRequest};
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use crate::api::{server, DaemonControl};
use crate::daemon::{DaemonError, Event};
use crate::instances::{Host, HostEvent, HostOptions, Supervision};
use crate::state::StateEvent;

/// The daemon's own process settings besides [`HostOptions`].
pub struct ManagedOptions {
    pub host: HostOptions,
    pub apisock: PathBuf,
    /// Mount this instance at start (the `--bootstrap`/`--blob-source` flags).
    pub initial: Option<MountRequest>,
    pub supervision: Option<Arc<dyn Supervision>>,
}

fn io_err(what: &str, source: std::io::Error) -> DaemonError {
    DaemonError::Io {
        what: what.to_owned(),
        source,
    }
}

/// Runs the managed daemon to its end. Writes `pid_file` and `ready\n` to
/// `ready` once the API serves (and the initial instance, if any, is mounted).
pub fn run_managed(
    options: ManagedOptions,
    pid_file: Option<&Path>,
    ready: Option<OwnedFd>,
) -> Result<(), DaemonError> {
    // Before any thread exists, so that only the signal thread sees them.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| io_err("block signals", e.into()))?;
    let (events, received) = mpsc::channel();
    let signal_events = events.clone();
    std::thread::Builder::new()
        .name("lode-signals".into())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal_events
                    .send(HostEvent::Daemon(Event::Signal(signal)))
                    .is_err()
                {
                    return;
                }
            }
        })
        .map_err(|e| io_err("spawn signal thread", e))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lode-api")
        .enable_all()
        .build()
        .map_err(|e| io_err("start the API runtime", e))?;
    let mountpoint = options.host.mountpoint.clone();
    let mode = options.host.mode;
    let takeover = options.host.takeover;
    let host = Arc::new(Host::new(options.host, events, options.supervision));
    let listener = {
        let _entered = runtime.enter();
        server::bind(&options.apisock).map_err(|e| io_err("bind", std::io::Error::other(e)))?
    };
    let control: Arc<dyn DaemonControl> = Arc::clone(&host) as Arc<dyn DaemonControl>;
    let connections = Arc::new(server::Connections::default());
    let server = runtime.spawn(server::serve(listener, control, Arc::clone(&connections)));

    let result = (|| {
        let wait_for_takeover = host.mount_kept_for_takeover();
        if wait_for_takeover {
            info!(
                mountpoint = %mountpoint.display(),
                "the mountpoint is still a Lode mount (kept for a successor): waiting in INIT \
                 for PUT /api/v1/daemon/fuse/takeover"
            );
        } else if mode == DaemonMode::Shared {
            host.start_shared()?;
        } else if takeover {
            host.take_over_dedicated()?;
        }
        if let Some(request) = options.initial.filter(|_| !wait_for_takeover) {
            host.mount(&mountpoint, request)
                .map_err(|e| io_err("mount", std::io::Error::other(e)))?;
        }
        if let Some(path) = pid_file {
            let tmp = path.with_extension("pid.tmp");
            std::fs::write(&tmp, format!("{}\n", std::process::id()))
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| io_err(&format!("write pid file {}", path.display()), e))?;
        }
        if let Some(fd) = ready {
            if let Err(e) = File::from(fd).write_all(b"ready\n") {
                warn!(error = %e, "cannot write readiness notification");
            }
        }
        main_loop(&host, &received)
    })();
    let _ = host.state().apply(StateEvent::Stop);
    // Answer the requests being served (the exit request, typically) first.
    server.abort();
    let drained = runtime.block_on(connections.drained(Instant::now() + Duration::from_secs(2)));
    if !drained {
        warn!("API connections still open at exit");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_file(&options.apisock);
    if let Some(path) = pid_file {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn main_loop(host: &Host, received: &mpsc::Receiver<HostEvent>) -> Result<(), DaemonError> {
    while let Ok(event) = received.recv() {
        match event {
            HostEvent::Daemon(Event::Signal(Signal::SIGUSR1)) => {
                if let Some(json) = host.metrics_json() {
                    info!(metrics = %json, "metrics");
                }
            }
            HostEvent::Daemon(Event::Signal(signal)) => {
                info!(%signal, "stopping on signal");
                if !host.serving() {
                    return Ok(());
                }
                if let Err(e) = host.unmount_all() {
                    error!(error = %e, "unmount failed");
                    return Err(e);
                }
            }
            HostEvent::Daemon(Event::SessionEnded) => {
                let _ = host.state().apply(StateEvent::Stop);
                return host.finish();
            }
            HostEvent::Exit => {
                // Leave the mount and its connection as they are: a
                // supervisor (or nobody) holds them for a successor.
                info!("exiting without unmounting");
                return Ok(());
            }
        }
    }
    Ok(())
}
