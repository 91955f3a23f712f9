//! `lode-fsd`: serves Lode image instances read-only over FUSE, fetching file
//! data lazily from a registry (or a local blob directory) and keeping
//! verified chunks in a persistent cache.
//!
//! A request goes: the kernel → [`fs::adapter`] (one `fuser::Filesystem`
//! for every mode) → [`fs::table`] (which instance an inode belongs to) →
//! [`fs::ops`] of that [`instance`] → its [`read`] path (cache, range
//! requests, verification). [`host`] owns the instances, the connection and
//! the main loop; [`api`] is its control socket; [`takeover`] hands the
//! connection to a successor; [`mount`] mounts and unmounts.

pub(crate) mod api;
pub(crate) mod fs;
pub mod host;
pub(crate) mod instance;
pub(crate) mod log_budget;
pub(crate) mod metrics;
pub(crate) mod mount;
pub mod read;
pub(crate) mod takeover;

#[cfg(test)]
mod testutil;
