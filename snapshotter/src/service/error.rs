//! The service's errors and their gRPC codes (the one place they are mapped).

use containerd_snapshots::tonic::{Code, Status};

use crate::instances::InstanceError;
use crate::lazy::LazyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Lazy(#[from] LazyError),
    #[error("lazy image: {0}")]
    Instance(#[from] InstanceError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The layer is available without unpacking (a Lode layer).
    #[error("target snapshot {0} already exists")]
    LayerAvailable(String),
}

impl ServiceError {
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Whether the snapshotter's disk is full: an ENOSPC anywhere in the
    /// error's chain of causes (the store's file, the daemon records in it,
    /// a snapshot directory).
    pub fn disk_full(&self) -> bool {
        let enospc = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = next {
            // redb's errors do not name their io::Error as a source.
            let db = error
                .downcast_ref::<redb::Error>()
                .or_else(|| error.downcast_ref::<Box<redb::Error>>().map(|b| &**b));
            let io = match db {
                Some(redb::Error::Io(e)) => Some(e),
                _ => error.downcast_ref::<std::io::Error>(),
            };
            if io.is_some_and(enospc) {
                return true;
            }
            next = error.source();
        }
        false
    }

    pub fn code(&self) -> Code {
        if self.disk_full() {
            return Code::ResourceExhausted;
        }
        match self {
            Self::Store(StoreError::NotFound(_)) => Code::NotFound,
            Self::Store(StoreError::AlreadyExists(_)) | Self::LayerAvailable(_) => {
                Code::AlreadyExists
            }
            Self::Store(StoreError::FailedPrecondition(_)) => Code::FailedPrecondition,
            Self::InvalidArgument(_) | Self::Lazy(LazyError::BadLabel { .. }) => {
                Code::InvalidArgument
            }
            Self::Instance(InstanceError::Unavailable(_)) => Code::Unavailable,
            Self::Store(_) | Self::Lazy(_) | Self::Instance(_) | Self::Io { .. } => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let mut message = error.to_string();
        if error.disk_full() {
            message.push_str(
                " (the filesystem of the snapshotter's root is full: free space there; \
                 what was recorded before is kept)",
            );
        }
        Status::new(error.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemons::records::RecordError;
    use crate::daemons::DaemonError;

    fn os_error(errno: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno)
    }

    fn from_daemon_records(errno: i32) -> ServiceError {
        let db = redb::Error::Io(os_error(errno));
        ServiceError::Instance(DaemonError::Records(RecordError::Db(Box::new(db))).into())
    }

    #[test]
    fn a_full_disk_is_found_wherever_it_is_among_the_causes() {
        let full = [
            ServiceError::Io {
                path: "/root/snapshots/7".into(),
                source: os_error(libc::ENOSPC),
            },
            ServiceError::Store(StoreError::Db(Box::new(redb::Error::Io(os_error(
                libc::ENOSPC,
            ))))),
            from_daemon_records(libc::ENOSPC),
            ServiceError::Instance(
                DaemonError::Io {
                    path: "/root/daemons/shared.log".into(),
                    source: os_error(libc::ENOSPC),
                }
                .into(),
            ),
        ];
        for error in full {
            assert!(error.disk_full(), "{error}");
            assert_eq!(error.code(), Code::ResourceExhausted, "{error}");
            let status = Status::from(error);
            assert!(status.message().contains("is full"), "{status:?}");
        }
        let denied = from_daemon_records(libc::EACCES);
        assert!(!denied.disk_full(), "{denied}");
        assert_eq!(denied.code(), Code::Unavailable);
    }
}
