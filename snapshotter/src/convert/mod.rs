//! `lodectl convert`: turns an OCI image into a Lode image.

mod chunks;
mod entry;
mod error;
mod layer;
mod path;
mod tree;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_chunks;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_tree;

pub use chunks::{ChunkCounters, ChunkStore, LayerBlob};
pub use error::{ConvertError, EntryProblem};
pub use layer::{Converter, LayerStats};
pub use tree::TreeBuilder;
