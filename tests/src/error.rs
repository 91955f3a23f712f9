//! Errors of the test kit.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {message}")]
    Command { what: String, message: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Invalid(String),
}

impl KitError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KitError {
        let context = context.into();
        move |source| KitError::Io { context, source }
    }
}
