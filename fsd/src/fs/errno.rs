//! The one place where the filesystem's errors become errnos and log lines.
//!
//! Expected answers (a name that does not exist, an absent xattr, a write to a
//! read-only filesystem) are traced quietly; anything else means a broken image,
//! a failing blob source or a bug, and is logged at error level, rate-limited
//! because a container can trigger it in a loop.

use std::sync::Arc;
use std::time::Duration;

use fuser::Errno;
use lode_common::format::FormatError;
use tracing::{debug, error, trace};

use crate::log_budget::LogBudget;
use crate::read::fetch::FetchError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no entry {name:?} in directory {dir}")]
    NotFound { dir: u64, name: String },
    #[error("inode {0} is not a directory")]
    NotDir(u64),
    #[error("inode {0} is a directory")]
    IsDir(u64),
    #[error("inode {0} is not a symlink")]
    NotSymlink(u64),
    #[error("inode {ino} has no xattr {name:?}")]
    NoXattr { ino: u64, name: String },
    #[error("reply of {needed} bytes does not fit the caller's {size}")]
    Range { needed: usize, size: u32 },
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("inode {0} belongs to an instance that is no longer mounted")]
    Stale(u64),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// Whether the error is a normal answer rather than a fault.
fn expected(err: &FsError) -> bool {
    matches!(
        err,
        FsError::NotFound { .. }
            | FsError::NotDir(_)
            | FsError::IsDir(_)
            | FsError::NotSymlink(_)
            | FsError::NoXattr { .. }
            | FsError::Range { .. }
            | FsError::ReadOnly
            | FsError::Stale(_)
    )
}

impl FsError {
    pub fn errno(&self) -> Errno {
        match self {
            FsError::NotFound { .. } => Errno::ENOENT,
            FsError::NotDir(_) => Errno::ENOTDIR,
            FsError::IsDir(_) => Errno::EISDIR,
            FsError::NotSymlink(_) => Errno::EINVAL,
            FsError::NoXattr { .. } => Errno::NO_XATTR,
            FsError::Range { .. } => Errno::ERANGE,
            FsError::ReadOnly => Errno::EROFS,
            // The kernel asks about an inode we handed out that no longer
            // exists: its instance was removed, or it outlived a bootstrap.
            FsError::Stale(_) => Errno::ESTALE,
            FsError::Format(FormatError::NoSuchInode(_)) => Errno::ESTALE,
            FsError::Format(_) => Errno::EIO,
            FsError::Fetch(FetchError::NotAFile { .. }) => Errno::EISDIR,
            FsError::Fetch(_) => Errno::EIO,
        }
    }
}

/// Error lines allowed per second before they are only counted.
const ERRORS_PER_SECOND: u64 = 20;

/// Logs failed operations: expected ones at trace/debug, faults at error
/// level with a per-second budget.
pub struct ErrorLog {
    budget: LogBudget,
}

impl Default for ErrorLog {
    fn default() -> Self {
        Self {
            budget: LogBudget::new(ERRORS_PER_SECOND, Duration::from_secs(1)),
        }
    }
}

impl ErrorLog {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Logs `err` from operation `op` on inode `ino` and returns its errno.
    pub fn report(&self, op: &'static str, ino: u64, err: &FsError) -> Errno {
        let errno = err.errno();
        if expected(err) {
            if matches!(err, FsError::ReadOnly) {
                debug!(op, ino, error = %err, "refused");
            } else {
                trace!(op, ino, error = %err, "failed");
            }
            return errno;
        }
        if let Some(suppressed) = self.budget.admit() {
            error!(op, ino, errno = i32::from(errno), suppressed, error = %err, "filesystem operation failed");
        }
        errno
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_common::format::ChunkHash;
    use lode_common::Digest;
    use std::time::Duration;

    #[test]
    fn errors_map_to_their_errnos() {
        let cases = [
            (
                FsError::NotFound {
                    dir: 1,
                    name: "x".into(),
                },
                Errno::ENOENT,
            ),
            (FsError::NotDir(2), Errno::ENOTDIR),
            (FsError::IsDir(2), Errno::EISDIR),
            (
                FsError::NoXattr {
                    ino: 2,
                    name: "user.a".into(),
                },
                Errno::NO_XATTR,
            ),
            (
                FsError::Range {
                    needed: 10,
                    size: 5,
                },
                Errno::ERANGE,
            ),
            (FsError::ReadOnly, Errno::EROFS),
            (FsError::Stale(1 << 40), Errno::ESTALE),
            (FsError::Format(FormatError::NoSuchInode(99)), Errno::ESTALE),
            (
                FsError::Format(FormatError::Corrupt("x".into())),
                Errno::EIO,
            ),
            (
                FsError::Fetch(FetchError::Timeout {
                    chunk: ChunkHash::WRITTEN.digest(b"c"),
                    blob: Digest::of(b"b"),
                    deadline: Duration::from_secs(1),
                }),
                Errno::EIO,
            ),
        ];
        let log = ErrorLog::new();
        for (err, errno) in cases {
            assert_eq!(err.errno(), errno, "{err}");
            assert_eq!(log.report("test", 1, &err), errno);
        }
    }

    #[test]
    fn error_lines_are_rate_limited() {
        let log = ErrorLog::default();
        let admitted = (0..100).filter(|_| log.budget.admit().is_some()).count() as u64;
        // A second boundary may fall inside the loop and admit one more batch.
        assert!(
            (ERRORS_PER_SECOND..=2 * ERRORS_PER_SECOND).contains(&admitted),
            "{admitted}"
        );
    }
}
