//! Applies one layer's tar stream to the merged tree and its file contents to
//! the layer's data blob.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use lode_common::format::rules::{name_problem, symlink_problem};
use lode_common::format::{write_bootstrap, Node, NodeKind, PrefetchSpan};
use tar::EntryType;
use tracing::debug;

use super::chunks::{AddError, ChunkCounters, ChunkStore, LayerBlob};
use super::entry::{device_numbers, read_meta};
use super::error::{ConvertError, EntryProblem};
use super::path::{components, escape, marker, Marker};
use super::tree::TreeBuilder;

/// What one layer contained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub fifos: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Entries without filesystem meaning (AUFS bookkeeping, global PAX headers).
    pub skipped: u64,
    pub chunks: ChunkCounters,
}

/// The merged tree and the chunk store of an image being converted.
#[derive(Debug)]
pub struct Converter {
    pub tree: TreeBuilder,
    pub store: ChunkStore,
}

impl Converter {
    pub fn new(chunk_size: u32, zstd_level: i32, threads: usize) -> Self {
        Self {
            tree: TreeBuilder::new(),
            store: ChunkStore::new(chunk_size, zstd_level, threads),
        }
    }

    /// Applies the tar stream `tar` (already decompressed) as the next layer,
    /// writing new chunks to a data blob at `blob_path`. `label` names the
    /// layer in errors. Returns the blob (if any chunk was new) and counters.
    pub fn apply_layer(
        &mut self,
        tar: impl Read,
        label: &str,
        blob_path: &Path,
    ) -> Result<(Option<LayerBlob>, LayerStats), ConvertError> {
        self.tree.begin_layer();
        self.store.begin_layer(blob_path)?;
        let read_err = |source| ConvertError::LayerRead {
            layer: label.to_owned(),
            source,
        };
        let mut stats = LayerStats::default();
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            let raw_path = entry.path_bytes().into_owned();
            match self.apply_entry(&mut entry, &raw_path, &mut stats) {
                Ok(()) => {}
                Err(Failure::Problem(problem)) => {
                    return Err(ConvertError::Entry {
                        layer: label.to_owned(),
                        entry: escape(&raw_path),
                        problem,
                    })
                }
                Err(Failure::Read(e)) => return Err(read_err(e)),
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        let (blob, counters) = self.store.finish_layer(self.tree.tree_mut())?;
        stats.chunks = counters;
        Ok((blob, stats))
    }

    /// Serialises the merged tree into a bootstrap.
    pub fn bootstrap(&self, prefetch: &[PrefetchSpan]) -> Result<Vec<u8>, ConvertError> {
        Ok(write_bootstrap(
            self.tree.tree(),
            self.store.chunk_size(),
            self.store.blobs(),
            self.store.records(),
            prefetch,
        )?)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        stats: &mut LayerStats,
    ) -> Result<(), Failure> {
        let entry_type = entry.header().entry_type();
        // 'g' (PAX global header) and 'V' (GNU volume label) describe the
        // archive, not a file.
        if entry_type == EntryType::XGlobalHeader || entry_type.as_byte() == b'V' {
            debug!(entry = %escape(raw_path), ?entry_type, "skipping archive metadata entry");
            stats.skipped += 1;
            return Ok(());
        }
        let path = components(raw_path)?;
        if let Some((last, parent)) = path.split_last() {
            match marker(last) {
                Marker::None => {}
                Marker::Opaque => {
                    self.tree.opaque(parent)?;
                    stats.opaque_dirs += 1;
                    return Ok(());
                }
                Marker::Whiteout(name) => {
                    if name.is_empty() {
                        return Err(EntryProblem::EmptyWhiteout.into());
                    }
                    if let Some(reason) = name_problem(name) {
                        return Err(EntryProblem::BadName {
                            component: escape(name),
                            reason,
                        }
                        .into());
                    }
                    self.tree.whiteout(parent, name)?;
                    stats.whiteouts += 1;
                    return Ok(());
                }
                Marker::AufsMeta => {
                    debug!(entry = %escape(raw_path), "skipping AUFS metadata entry");
                    stats.skipped += 1;
                    return Ok(());
                }
            }
        }

        if entry_type == EntryType::Link {
            let target = link_name(entry, "hard link")?;
            let target = components(&target).map_err(|problem| EntryProblem::HardlinkTarget {
                target: escape(&target),
                reason: match problem {
                    EntryProblem::DotDot => "has a '..' component",
                    _ => "is not a valid path",
                },
            })?;
            self.tree.hardlink(&path, &target)?;
            stats.hardlinks += 1;
            return Ok(());
        }

        let meta = read_meta(entry)?;
        // Pre-POSIX archives mark directories with a trailing slash only.
        let old_style_dir = entry_type == EntryType::Regular && raw_path.ends_with(b"/");
        let kind = match entry_type {
            EntryType::Directory => NodeKind::Dir {
                entries: BTreeMap::new(),
            },
            _ if old_style_dir => NodeKind::Dir {
                entries: BTreeMap::new(),
            },
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size_hint = entry.size();
                let pending = self.store.add_file(entry, size_hint).map_err(|e| match e {
                    AddError::Read(e) => Failure::Read(e),
                    AddError::Convert(e) => Failure::Other(e),
                })?;
                let node = Node {
                    meta,
                    kind: NodeKind::File {
                        size: pending.size,
                        chunks: Vec::new(),
                    },
                };
                let id = self.tree.put(&path, node)?;
                self.store.attach(id, pending);
                stats.files += 1;
                return Ok(());
            }
            EntryType::Symlink => {
                let target = link_name(entry, "symlink")?;
                if let Some(reason) = symlink_problem(&target) {
                    return Err(EntryProblem::SymlinkTarget { reason }.into());
                }
                NodeKind::Symlink { target }
            }
            EntryType::Char => {
                let (major, minor) = device_numbers(entry.header())?;
                NodeKind::CharDevice { major, minor }
            }
            EntryType::Block => {
                let (major, minor) = device_numbers(entry.header())?;
                NodeKind::BlockDevice { major, minor }
            }
            EntryType::Fifo => NodeKind::Fifo,
            other => return Err(EntryProblem::UnsupportedType(char::from(other.as_byte())).into()),
        };
        match kind {
            NodeKind::Dir { .. } => stats.dirs += 1,
            NodeKind::Symlink { .. } => stats.symlinks += 1,
            NodeKind::Fifo => stats.fifos += 1,
            _ => stats.devices += 1,
        }
        self.tree.put(&path, Node { meta, kind })?;
        Ok(())
    }
}

/// Why an entry could not be applied.
enum Failure {
    /// The entry itself is unacceptable.
    Problem(EntryProblem),
    /// Reading the archive failed.
    Read(std::io::Error),
    Other(ConvertError),
}

impl From<EntryProblem> for Failure {
    fn from(problem: EntryProblem) -> Self {
        Failure::Problem(problem)
    }
}

fn link_name<R: Read>(
    entry: &tar::Entry<'_, R>,
    kind: &'static str,
) -> Result<Vec<u8>, EntryProblem> {
    entry
        .link_name_bytes()
        .map(|name| name.into_owned())
        .ok_or(EntryProblem::MissingLinkName { kind })
}
