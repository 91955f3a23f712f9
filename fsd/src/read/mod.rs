//! The read path of one image instance: a file range becomes chunks, found
//! in the cache or fetched with merged range requests, verified, cached and
//! handed to every reader waiting for them.
//!
//! - [`fetch`]: the [`fetch::Fetcher`] (with its neighbour merging and
//!   readahead), [`job`]s on the [`workers`] pool, fetches in flight
//!   ([`inflight`]), chunk checks ([`verify`]), what the link delivers
//!   ([`link`]), which bounds merging and readahead, and the image's
//!   prefetch list fetched in the background ([`prefetch`]).
//! - [`backend`]: where blobs come from (registry or directory), and
//!   [`ahead`]: blob fronts fetched before their image is mounted.
//! - [`cache`]: the persistent chunk cache.
//! - [`access`]: which files and chunks were read, in order.
//! - [`pools`]: reusable, aligned chunk buffers.

pub(crate) mod access;
pub(crate) mod ahead;
pub mod backend;
pub(crate) mod cache;
pub(crate) mod fetch;
mod inflight;
mod job;
mod link;
pub(crate) mod pools;
mod verify;
pub(crate) mod workers;
