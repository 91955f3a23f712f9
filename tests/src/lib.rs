//! Shared kit for Lode's real-component tests: a throw-away
//! `docker-registry` with access-log accounting (and, for token
//! authentication, a token server of its own: [`token_server`]), an OCI
//! image layout builder with `skopeo` pushes, wrappers of Lode's own
//! binaries (`lodectl`, `lode-fsd`), a registry-snapshotter-containerd
//! stack with container readers ([`stack`]), a directory tree
//! capture-and-compare, and small helpers for polling and skipping.
//!
//! Tests that need something the machine lacks (root, `/dev/fuse`, a
//! Debian package, a workspace binary) call [`skip_unless`] and return early;
//! the reason is printed past the test harness's output capture.

pub mod containerd;
pub mod cri;
mod error;
pub mod failover;
pub mod fstree;
pub mod layout;
pub mod link;
pub mod lode;
pub mod mounts;
pub mod registry;
mod skopeo;
pub mod snapshotter;
pub mod stack;
mod tar_writer;
pub mod token_server;
pub mod umoci;
mod util;

pub use error::KitError;
pub use fstree::{compare_trees, FileInfo, FileKind, TreeSnapshot};
pub use layout::{BuiltImage, BuiltLayer, Compression, Layer, LongNames, OciLayoutBuilder};
pub use lode::{
    bounded, lode_prerequisites, FsdDaemon, FsdOptions, LodeBinaries, LodeMount, Lodectl,
};
pub use registry::{write_docker_config, AccessLogEntry, Registry};
pub use skopeo::{skopeo_available, skopeo_copy, skopeo_copy_with_creds};
pub use tar_writer::{pseudo_random_bytes, EntryKind, TarEntry};
pub use umoci::{umoci_available, umoci_unpack};
pub use util::{bin_path, fuse_available, is_root, require_root, skip_unless, wait_until};
