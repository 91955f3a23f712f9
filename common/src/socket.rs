//! Unix sockets only their owner can use: bound with mode 0600 from the
//! first moment, and serving only peers of the owner's user (or root).
//!
//! A socket file takes the process's umask at `bind`, and changing the
//! umask affects every thread of the process; so the socket is bound in a
//! directory of its own (mode 0700, beside the final path), made 0600
//! there, then renamed into place, replacing a stale file. Nobody can reach
//! it before it is private.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use nix::sys::socket::{bind, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

#[derive(Debug, thiserror::Error)]
#[error("socket {path}: {what}: {source}")]
pub struct SocketError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// A bound, not yet listening, unix socket of `kind` at `path`, mode 0600.
/// Whatever was at `path` is replaced: the caller checks first whether a
/// live process still serves there, if that matters.
pub fn bind_private(path: &Path, kind: SockType) -> Result<OwnedFd, SocketError> {
    let fail = |what: &'static str| {
        move |source: std::io::Error| SocketError {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        fail("its name")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    // tempfile makes the directory with mode 0700.
    let private = tempfile::Builder::new()
        .prefix(".b")
        .tempdir_in(parent)
        .map_err(fail("make a private directory beside it"))?;
    let staged = private.path().join(name);
    let fd = socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| fail("create")(errno(e)))?;
    let addr = UnixAddr::new(&staged).map_err(|e| fail("address")(errno(e)))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| fail("bind")(errno(e)))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(fail("chmod 0600"))?;
    std::fs::rename(&staged, path).map_err(fail("move into place"))?;
    Ok(fd)
}

/// Whether the peer of connection `conn` runs as this process's user or
/// as root; logged when not.
pub fn peer_is_trusted(conn: &impl std::os::fd::AsFd) -> bool {
    let ours = nix::unistd::geteuid().as_raw();
    match nix::sys::socket::getsockopt(conn, sockopt::PeerCredentials) {
        Ok(peer) if peer.uid() == ours || peer.uid() == 0 => true,
        Ok(peer) => {
            tracing::warn!(
                uid = peer.uid(),
                pid = peer.pid(),
                "refused a connection from another user"
            );
            false
        }
        Err(error) => {
            tracing::warn!(%error, "refused a connection whose peer is unknown");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt as _;

    #[test]
    fn a_bound_socket_is_private_replaces_a_stale_file_and_leaves_nothing_beside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, "stale").unwrap();
        let _fd = bind_private(&path, SockType::Stream).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["api.sock"]);
        let e = bind_private(&dir.path().join("no/such/dir/s"), SockType::Stream).unwrap_err();
        assert!(e.to_string().contains("no/such/dir/s"), "{e}");
    }

    #[test]
    fn peers_of_the_same_user_are_trusted_and_of_another_not() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(peer_is_trusted(&a));
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED peers of another user: needs root to become another user");
            return;
        }
        // An abstract address: no file whose mode could keep the peer out.
        let name = format!("lode-peer-test-{}", std::process::id());
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &addr).unwrap();
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        // SAFETY: the child only makes system calls (no allocation, no
        // locks) before it exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let nobody = 65534;
                let ok = nix::unistd::setgid(nix::unistd::Gid::from_raw(nobody)).is_ok()
                    && nix::unistd::setuid(nix::unistd::Uid::from_raw(nobody)).is_ok()
                    && socket(
                        AddressFamily::Unix,
                        SockType::Stream,
                        SockFlag::empty(),
                        None,
                    )
                    .and_then(|fd| nix::sys::socket::connect(fd.as_raw_fd(), &addr))
                    .is_ok();
                // SAFETY: ends the child without running the parent's
                // destructors or exit handlers.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                // The child's connection waits in the backlog (with its
                // credentials) after the child is gone.
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                let conn = nix::sys::socket::accept(listener.as_raw_fd()).unwrap();
                // SAFETY: accept returned a new descriptor nothing else owns.
                let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
                assert!(!peer_is_trusted(&conn), "a peer of uid 65534 is refused");
            }
        }
    }
}
