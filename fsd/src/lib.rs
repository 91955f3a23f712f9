//! `lode-fsd`: serves a Lode image instance over FUSE, read-only, fetching file
//! data lazily from a registry (or a local blob directory) and keeping verified
//! chunks in a persistent cache.
//!
//! - [`ops`]: the filesystem's logic as plain functions returning errnos;
//!   [`fuse`] adapts it to `fuser::Filesystem`.
//! - [`fetch`]: the read path (cache, merged range requests, readahead,
//!   in-flight dedup, deadlines) over a [`backend::BlobBackend`] and the
//!   [`cache::ChunkCache`].
//! - [`mount`]: mounting and unmounting, kept apart from the filesystem type.
//! - [`daemon`]: wires it together for the `lode-fsd` binary.

pub mod api;
pub mod backend;
mod bufpool;
pub mod cache;
pub mod daemon;
pub mod errno;
pub mod fetch;
pub mod fuse;
mod inflight;
pub mod inode_map;
pub mod instances;
mod job;
pub mod latency;
pub mod managed;
pub mod metrics;
pub mod mount;
pub mod ops;
mod pool;
pub mod shared;
pub mod shared_host;
pub mod state;
pub mod takeover;
mod verify;

#[cfg(test)]
mod testutil;
