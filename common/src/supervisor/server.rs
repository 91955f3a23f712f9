//! The supervisor's side: holds the latest state and FUSE descriptors of
//! each daemon and hands them to a successor.
//!
//! Holding a /dev/fuse descriptor is what keeps a connection alive while no
//! daemon runs: the kernel aborts a FUSE connection when its last descriptor
//! closes. The supervisor never reads from or writes to these descriptors;
//! only a daemon serves the mount.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::socket::{accept4, listen, shutdown, Backlog, Shutdown, SockFlag, SockType};
use tracing::{debug, info, warn};

use super::{wire, DaemonState, Message, SupervisorError};

struct Held {
    state: DaemonState,
    fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct Shared {
    daemons: Mutex<HashMap<String, Held>>,
    /// Counts stored states, so a caller can wait for the next one.
    updates: Mutex<u64>,
}

impl Shared {
    fn daemons(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.daemons.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, message: Message, fds: Vec<OwnedFd>) -> (Message, Vec<OwnedFd>) {
        match message {
            Message::State { state } => {
                if fds.len() != state.fuse.len() {
                    let message = format!(
                        "{} descriptors for {} FUSE connections",
                        fds.len(),
                        state.fuse.len()
                    );
                    return (Message::Error { message }, Vec::new());
                }
                info!(daemon_id = %state.id, instances = state.instances.len(), fds = fds.len(), "daemon state stored");
                self.daemons().insert(state.id.clone(), Held { state, fds });
                *self.updates.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                (Message::Ack, Vec::new())
            }
            Message::Takeover { id } => {
                let daemons = self.daemons();
                let Some(held) = daemons.get(&id) else {
                    let message = format!("no state held for daemon {id}");
                    return (Message::Error { message }, Vec::new());
                };
                let copies: Result<Vec<OwnedFd>, _> =
                    held.fds.iter().map(|fd| fd.try_clone()).collect();
                match copies {
                    Ok(fds) => {
                        info!(daemon_id = %id, fds = fds.len(), "handing daemon state over");
                        let state = held.state.clone();
                        (Message::Handover { state }, fds)
                    }
                    Err(e) => {
                        let message = format!("duplicate descriptors of daemon {id}: {e}");
                        (Message::Error { message }, Vec::new())
                    }
                }
            }
            Message::Forget { id } => {
                if self.daemons().remove(&id).is_some() {
                    info!(daemon_id = %id, "daemon state forgotten");
                }
                (Message::Ack, Vec::new())
            }
            other => {
                let message = format!("{} is not a request", other.name());
                (Message::Error { message }, Vec::new())
            }
        }
    }
}

/// A listening supervisor. Dropping it stops accepting connections and
/// closes the descriptors it holds.
pub struct SupervisorServer {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl SupervisorServer {
    /// Listens at `path` (a stale socket file there is replaced), readable
    /// and writable by the owner only.
    pub fn bind(path: &Path) -> Result<Self, SupervisorError> {
        let err = |source| SupervisorError::Socket {
            path: path.display().to_string(),
            source,
        };
        let listener = crate::socket::bind_private(path, SockType::SeqPacket)
            .map_err(|e| err(Errno::from_raw(e.source.raw_os_error().unwrap_or(0))))?;
        listen(&listener, Backlog::new(16).map_err(err)?).map_err(err)?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::default());
        let accept = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("lode-supervisor".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?
        };
        info!(path = %path.display(), "supervisor listening");
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            shared,
            accept: Some(accept),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state held for daemon `id`.
    pub fn state(&self, id: &str) -> Option<DaemonState> {
        self.shared.daemons().get(id).map(|h| h.state.clone())
    }

    /// How many states have been stored so far.
    pub fn updates(&self) -> u64 {
        *self
            .shared
            .updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the kernel to queue again the requests read but not answered on
    /// daemon `id`'s connections; false if nothing is held for `id`. For
    /// set-ups where several daemons serve one connection (a standby next
    /// to the active daemon): when one of them dies, the requests it had
    /// read wait in the kernel until this is written, and the survivors
    /// then answer them. Harmless when there are none.
    pub fn resend(&self, id: &str) -> Result<bool, SupervisorError> {
        let daemons = self.shared.daemons();
        let Some(held) = daemons.get(id) else {
            return Ok(false);
        };
        let notification = super::resend_notification();
        for fd in &held.fds {
            nix::unistd::write(fd, &notification).map_err(|source| SupervisorError::Io {
                what: "FUSE_NOTIFY_RESEND",
                source,
            })?;
        }
        info!(daemon_id = %id, "asked the kernel to resend unanswered FUSE requests");
        Ok(true)
    }

    /// Removes and returns what is held for daemon `id`.
    pub fn take(&self, id: &str) -> Option<(DaemonState, Vec<OwnedFd>)> {
        self.shared.daemons().remove(id).map(|h| (h.state, h.fds))
    }
}

impl Drop for SupervisorServer {
    fn drop(&mut self) {
        // Wakes the blocked accept (EINVAL) so its thread ends.
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        if let Some(thread) = self.accept.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &OwnedFd, shared: &Arc<Shared>) {
    loop {
        let conn = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                debug!(error = %e, "supervisor stops accepting");
                return;
            }
        };
        if !crate::socket::peer_is_trusted(&conn) {
            continue;
        }
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("lode-supervisor-conn".into())
            .spawn(move || serve(&conn, &shared));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot serve supervisor connection");
        }
    }
}

fn serve(conn: &OwnedFd, shared: &Shared) {
    loop {
        let (message, fds) = match wire::recv(conn.as_fd()) {
            Ok(received) => received,
            Err(SupervisorError::Closed) => return,
            Err(e @ SupervisorError::Malformed(_)) => {
                warn!(error = %e, "malformed supervisor request");
                let reply = Message::Error {
                    message: e.to_string(),
                };
                if wire::send(conn.as_fd(), &reply, &[]).is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "supervisor connection failed");
                return;
            }
        };
        let (reply, fds) = shared.handle(message, fds);
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        if let Err(e) = wire::send(conn.as_fd(), &reply, &borrowed) {
            warn!(error = %e, "cannot answer supervisor request");
            return;
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
