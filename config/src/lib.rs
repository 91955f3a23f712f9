//! Typed configuration of Lode's processes, read from TOML.
//!
//! Every section is a serde struct with `deny_unknown_fields` (a misspelt key is
//! an error, not a silently ignored setting) and defaults for every field, so an
//! empty file is a valid configuration. [`FsdConfig::validate`] reports values
//! that parse but make no sense.

mod fsd;
mod snapshotter;

pub use fsd::{CacheConfig, FetchConfig, FsdConfig, FuseConfig, RegistryConfig};
pub use snapshotter::{
    DaemonConfig, DaemonMode, MetricsConfig, MirrorConfig, RecoverPolicy, SnapshotterCacheConfig,
    SnapshotterConfig, SnapshotterRegistryConfig,
};

use std::path::Path;

/// What can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("daemon.config {path}: {source}")]
    Daemon {
        path: String,
        #[source]
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Parses TOML text; `origin` names the source in error messages.
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: origin.to_string(),
        source: Box::new(source),
    })
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}
