//! The lode-fsd control API: typed requests and responses ([`types`]) and an
//! HTTP/1.1 client over the daemon's unix socket ([`client`]). The server lives
//! in lode-fsd; every other process talks to it through [`DaemonClient`].
//! The protocol is documented in `docs/api.md`.

pub mod client;
pub mod query;
pub mod types;

pub use client::{ClientError, DaemonClient};
pub use types::*;

/// Path prefix of every endpoint.
pub const API_PREFIX: &str = "/api/v1";
