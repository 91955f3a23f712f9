//! The host's FUSE connection: mounted fresh or resumed from a predecessor,
//! served by one session thread, reported to the supervisor after every
//! change, and ended by unmount, abort or the daemon's exit.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::INodeNo;
use lode_common::supervisor::{DaemonState as HandedState, FuseConnParams};
use tracing::{debug, error, info, warn};

use super::state::StateEvent;
use super::{io_err, lock, Host, HostError, HostEvent};
use crate::fs::adapter::{Adapter, KernelTuning};
use crate::instance::STOP_GRACE;
use crate::mount::{self, MountOptions};
use crate::takeover::{self, Predecessor};

/// Mode of the shared mount's pseudo root.
const PSEUDO_ROOT_MODE: u32 = 0o040_755;

pub(super) struct Connection {
    session: JoinHandle<std::io::Result<()>>,
    notifier: fuser::Notifier,
    /// Our own descriptor of the connection, and what INIT negotiated: what
    /// the supervisor keeps for a successor.
    dev: OwnedFd,
    params: FuseConnParams,
    /// Device number of the mount (0 if unknown); names its connection.
    kernel_dev: u64,
}

impl Host {
    fn session_config(&self) -> fuser::Config {
        let mut config = fuser::Config::default();
        config.n_threads = Some(self.options.config.fuse.threads);
        // One descriptor shared by all workers: a cloned descriptor is a
        // kernel file of its own with its own list of requests being
        // processed, which a successor could neither resend nor keep open.
        config.clone_fd = false;
        config
    }

    /// The adapter of a new session; a successor's answers INIT as
    /// `predecessor` (the parameters it negotiated) did.
    fn adapter(&self, predecessor: Option<&FuseConnParams>) -> Adapter {
        Adapter::new(
            std::sync::Arc::clone(&self.table),
            KernelTuning {
                max_background: self.options.config.fuse.max_background,
                root_ttl: Duration::from_secs(self.options.config.fuse.entry_timeout_secs),
                predecessor_flags: predecessor.map(|p| p.flags),
            },
        )
    }

    /// Mounts the filesystem (root directory mode `root_mode`), or resumes
    /// `predecessor`'s connection, and starts serving it. The daemon is
    /// READY afterwards, and RUNNING unless a supervisor starts it.
    pub(super) fn open(
        &self,
        predecessor: Option<Predecessor>,
        root_mode: u32,
    ) -> Result<(), HostError> {
        let mountpoint = &self.options.mountpoint;
        let (session, dev, params) = match predecessor {
            Some(p) => {
                let session = takeover::start_resumed(
                    self.adapter(Some(&p.params)),
                    &p.fd,
                    &p.params,
                    self.session_config(),
                )?;
                match p.fd.try_clone() {
                    Ok(fd) => takeover::resend_after_exit(p.state.pid, fd),
                    Err(e) => warn!(error = %e, "cannot watch the predecessor"),
                }
                (session, p.fd, p.params)
            }
            None => {
                takeover::check_not_mounted(mountpoint)?;
                let fd = mount::mount_fuse(mountpoint, &MountOptions::lode(root_mode))?;
                match takeover::start_fresh(self.adapter(None), &fd, self.session_config()) {
                    Ok((session, params)) => (session, fd, params),
                    Err(e) => {
                        if let Err(u) = mount::unmount(mountpoint) {
                            error!(error = %u, "cannot unmount after a failed start");
                        }
                        return Err(e.into());
                    }
                }
            }
        };
        let notifier = session.notifier();
        let events = self.events.clone();
        let session = std::thread::Builder::new()
            .name("lode-session".into())
            .spawn(move || {
                let result = session.run();
                let _ = events.send(HostEvent::SessionEnded);
                result
            })
            .map_err(io_err("spawn the FUSE session"))?;
        let kernel_dev = match mount::mounted_dev(mountpoint) {
            Ok(dev) => {
                mount::set_read_ahead(dev, self.options.config.fuse.read_ahead_kb);
                dev
            }
            Err(e) => {
                warn!(error = %e, "cannot stat the mount; readahead and abort unavailable");
                0
            }
        };
        *lock(&self.connection) = Some(Connection {
            session,
            notifier,
            dev,
            params,
            kernel_dev,
        });
        self.state.apply(StateEvent::FuseReady)?;
        if !self.options.waits_for_start() {
            self.state.apply(StateEvent::Start)?;
        }
        info!(mountpoint = %mountpoint.display(), mode = %self.options.mode, "serving");
        Ok(())
    }

    /// Shared mode: mounts the pseudo root, where instances appear as they
    /// are mounted.
    pub(super) fn open_shared(&self) -> Result<(), HostError> {
        let _changes = lock(&self.changes);
        self.open(None, PSEUDO_ROOT_MODE)?;
        self.reported();
        Ok(())
    }

    /// Tells the kernel to forget the pseudo root's entry `id`, so that a
    /// lookup of `<mnt>/<id>` asks the daemon again.
    pub(super) fn forget_entry(&self, id: &str) {
        let connection = lock(&self.connection);
        let Some(c) = connection.as_ref() else {
            return;
        };
        match c
            .notifier
            .inval_entry(INodeNo(self.table.root()), OsStr::new(id))
        {
            Ok(()) => debug!(instance = id, "kernel entry invalidated"),
            // Not in the kernel's cache: nothing to forget.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => warn!(instance = id, error = %e, "cannot invalidate the kernel's entry"),
        }
    }

    /// Hands the instances and the connection to the supervisor, if there
    /// is one and a connection to hand.
    pub(super) fn report(&self) -> Result<(), HostError> {
        let Some(path) = &self.options.supervisor else {
            return Ok(());
        };
        let connection = lock(&self.connection);
        let Some(c) = connection.as_ref() else {
            return Ok(());
        };
        let state = HandedState {
            id: self.options.id.clone(),
            pid: std::process::id(),
            mode: self.options.mode.to_string(),
            fuse: vec![c.params.clone()],
            instances: self
                .table
                .all()
                .iter()
                .map(|i| i.handover_state())
                .collect(),
        };
        Ok(takeover::report(path, &state, &c.dev)?)
    }

    /// [`Host::report`] where a failure must not fail the change itself.
    pub(super) fn reported(&self) {
        if let Err(e) = self.report() {
            error!(error = %e, "cannot hand the state to the supervisor; no takeover possible");
        }
    }

    /// Whether a FUSE connection is being served.
    pub fn serving(&self) -> bool {
        lock(&self.connection).is_some()
    }

    /// Unmounts; the session then ends. A mount still in use is detached
    /// lazily and served until its last user lets go.
    pub fn unmount(&self) -> Result<(), HostError> {
        Ok(mount::unmount(&self.options.mountpoint)?)
    }

    /// Ends the session at once, even while the mount is still in use:
    /// requests in flight fail with ENOTCONN.
    pub fn abort(&self) -> Result<(), HostError> {
        let dev = lock(&self.connection).as_ref().map_or(0, |c| c.kernel_dev);
        if dev == 0 {
            return Err(io_err("abort the FUSE connection")(std::io::Error::other(
                "device number of the mount unknown",
            )));
        }
        mount::abort_connection(dev).map_err(io_err("abort the FUSE connection"))
    }

    /// After the session ended: stops every instance (their running fetches
    /// are cached, the cache made durable) and tells the supervisor the
    /// connection is gone.
    pub fn finish(&self) -> Result<(), HostError> {
        let _ = self.state.apply(StateEvent::Stop);
        let connection = lock(&self.connection).take();
        let result = match connection.map(|c| c.session.join()) {
            Some(Ok(r)) => r.map_err(io_err("FUSE session")),
            Some(Err(_)) => Err(io_err("FUSE session")(std::io::Error::other(
                "session thread panicked",
            ))),
            None => Ok(()),
        };
        for instance in self.table.all() {
            instance.stop(STOP_GRACE);
        }
        if let Some(path) = &self.options.supervisor {
            takeover::forget(path, &self.options.id);
        }
        result
    }

    /// Leaves the mount and its connection to the supervisor and a
    /// successor: makes the caches durable and lets the process exit with
    /// the session still reading. The state is not reported again: a
    /// successor may already have replaced it with its own.
    pub fn detach(&self) {
        let _ = self.state.apply(StateEvent::Stop);
        for instance in self.table.all() {
            instance.flush();
        }
        info!(mountpoint = %self.options.mountpoint.display(), "detached; the mount stays for a successor");
    }
}
