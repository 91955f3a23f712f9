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

    /// Whether the snapshotter's disk is full (the store's file or a
    /// snapshot directory could not grow).
    pub fn disk_full(&self) -> bool {
        let enospc = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOSPC);
        match self {
            Self::Io { source, .. } => enospc(source),
            Self::Store(StoreError::Db(error)) => {
                matches!(&**error, redb::Error::Io(e) if enospc(e))
            }
            _ => false,
        }
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
