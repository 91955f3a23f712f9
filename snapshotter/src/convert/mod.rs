//! `lodectl convert`: turns an OCI image into a Lode image.
//!
//! The layers are applied in order to one merged tree ([`TreeBuilder`]) as
//! containerd would extract them; regular files' contents are cut into
//! chunks, each distinct chunk stored once per image in the data blob of the
//! layer that first has it ([`ChunkStore`]); the prefetch list's files are
//! then moved to the front of their blobs ([`front`]). The tree and chunk table become
//! the bootstrap, which is packaged with the blobs as an OCI image
//! (docs/format.md). Nothing is ever created on disk from an entry name: the
//! working directory holds only downloaded layers and blobs named by index.

mod blob_writer;
mod chunks;
mod decompress;
mod entry;
mod error;
mod front;
mod layer;
mod location;
mod package;
mod path;
pub mod prefetch_list;
mod progress;
mod run;
mod source;
mod target;
mod tree;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_chunks;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_tree;

use std::path::PathBuf;

use lode_common::format::DEFAULT_CHUNK_SIZE;
use lode_common::registry::RegistryOptions;
use lode_common::Digest;

pub use chunks::{ChunkCounters, ChunkStore, LayerBlob};
pub use decompress::{LayerCompression, LayerReader};
pub use error::{ConvertError, EntryProblem};
pub use layer::{Converter, LayerStats};
pub use location::{ImageLocation, PlatformSpec};
pub use run::convert;
pub use tree::TreeBuilder;

/// zstd level of stored chunks: fast to compress, and decompression speed
/// (what matters for lazy reads) barely depends on it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// What to convert and how.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub source: ImageLocation,
    pub target: ImageLocation,
    /// Platform picked from a multi-platform source (default linux/amd64).
    pub platform: PlatformSpec,
    /// Power of two, 64 KiB ..= 16 MiB.
    pub chunk_size: u32,
    pub zstd_level: i32,
    /// Threads hashing and compressing chunks; 0 means one per CPU.
    pub threads: usize,
    pub registry: RegistryOptions,
    /// Where the temporary working directory is made (default: the system's
    /// temporary directory). Needs room for two compressed layers and the
    /// data blobs.
    pub work_dir: Option<PathBuf>,
    /// Also write the raw bootstrap to this file.
    pub bootstrap_out: Option<PathBuf>,
    /// Files, or byte ranges of files, to prefetch, in order.
    pub prefetch: Vec<prefetch_list::Listed>,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl ConvertOptions {
    /// Options with defaults for everything but the two locations.
    pub fn new(source: ImageLocation, target: ImageLocation) -> Self {
        Self {
            source,
            target,
            platform: PlatformSpec::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            threads: 0,
            registry: RegistryOptions::default(),
            work_dir: None,
            bootstrap_out: None,
            prefetch: Vec::new(),
            progress: false,
        }
    }
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertOutcome {
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
    pub config_digest: Digest,
    pub source_manifest_digest: Digest,
    /// Data blobs (digest, size) in layer order.
    pub blobs: Vec<(Digest, u64)>,
    /// Digest of the bootstrap layer (gzip tar).
    pub bootstrap_layer: Digest,
    pub bootstrap_diff_id: Digest,
    /// Size of the raw bootstrap.
    pub bootstrap_size: u64,
    /// Per source layer.
    pub layers: Vec<LayerStats>,
}
