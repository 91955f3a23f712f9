//! The daemon's side of the supervisor protocol.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::{wire, DaemonState, Message, SupervisorError};

/// A connection to a supervisor. Calls are synchronous: each sends one
/// request and waits for its reply.
#[derive(Debug)]
pub struct SupervisorClient {
    pub(super) socket: OwnedFd,
    path: PathBuf,
}

impl SupervisorClient {
    pub fn connect(path: &Path) -> Result<Self, SupervisorError> {
        let err = |source| SupervisorError::Socket {
            path: path.display().to_string(),
            source,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err)?;
        let addr = UnixAddr::new(path).map_err(err)?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &addr).map_err(err)?;
        Ok(Self {
            socket,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands `state` and its FUSE descriptors (one per `state.fuse` entry)
    /// to the supervisor, replacing what it held for `state.id`.
    pub fn send_state(
        &self,
        state: &DaemonState,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SupervisorError> {
        if fds.len() != state.fuse.len() {
            return Err(SupervisorError::Malformed(format!(
                "{} descriptors for {} FUSE connections",
                fds.len(),
                state.fuse.len()
            )));
        }
        let message = Message::State {
            state: state.clone(),
        };
        self.expect_ack(self.call(&message, fds)?)
    }

    /// Asks for the state and descriptors held for daemon `id`.
    pub fn take_over(&self, id: &str) -> Result<(DaemonState, Vec<OwnedFd>), SupervisorError> {
        match self.call(&Message::Takeover { id: id.into() }, &[])? {
            (Message::Handover { state }, fds) => {
                if fds.len() != state.fuse.len() {
                    return Err(SupervisorError::Malformed(format!(
                        "handover of {} carries {} descriptors for {} FUSE connections",
                        state.id,
                        fds.len(),
                        state.fuse.len()
                    )));
                }
                if state.id != id {
                    return Err(SupervisorError::Malformed(format!(
                        "asked for daemon {id}, got {}",
                        state.id
                    )));
                }
                Ok((state, fds))
            }
            (Message::Error { message }, _) => Err(SupervisorError::Refused(message)),
            (other, _) => Err(SupervisorError::Unexpected {
                expected: "handover",
                got: other.name(),
            }),
        }
    }

    /// Tells the supervisor daemon `id` stopped cleanly: nothing to take over.
    pub fn forget(&self, id: &str) -> Result<(), SupervisorError> {
        self.expect_ack(self.call(&Message::Forget { id: id.into() }, &[])?)
    }

    fn call(
        &self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Message, Vec<OwnedFd>), SupervisorError> {
        wire::send(self.socket.as_fd(), message, fds)?;
        wire::recv(self.socket.as_fd())
    }

    fn expect_ack(&self, reply: (Message, Vec<OwnedFd>)) -> Result<(), SupervisorError> {
        match reply.0 {
            Message::Ack => Ok(()),
            Message::Error { message } => Err(SupervisorError::Refused(message)),
            other => Err(SupervisorError::Unexpected {
                expected: "ack",
                got: other.name(),
            }),
        }
    }
}
