//! Types and protocols shared by Lode's processes: digests, the Lode image
//! format (bootstrap reader and writer), OCI packaging, registry access, and
//! the mount names and containerd labels they agree on ([`contract`]).

pub mod api;
pub mod contract;
pub mod digest;
pub mod format;
pub mod image;
pub mod mountinfo;
pub mod oci;
pub mod registry;
pub mod socket;
pub mod supervisor;

pub use digest::Digest;
