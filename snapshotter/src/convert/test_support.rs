//! Runs synthetic layers (built with the shared test kit's byte-exact tar
//! writer) through [`Converter`] and reads results back.

use std::collections::HashMap;
use std::path::PathBuf;

use lode_common::format::{ChunkHash, ImageTree, Node, NodeId, NodeKind, MIN_CHUNK_SIZE};
use lode_common::Digest;
use lode_tests::{Compression, Layer, TarEntry};

use super::chunks::LayerBlob;
use super::error::ConvertError;
use super::layer::{Converter, LayerStats};
use super::path::components;

pub(super) const CS: u32 = MIN_CHUNK_SIZE;

/// A finished conversion of in-memory layers.
pub(super) struct Converted {
    pub conv: Converter,
    pub blobs: Vec<Option<LayerBlob>>,
    pub stats: Vec<LayerStats>,
    _dir: tempfile::TempDir,
}

pub(super) fn layer(entries: Vec<TarEntry>) -> Layer {
    Layer::new(Compression::None, entries)
}

/// Converts layers given as entry lists (GNU long names).
pub(super) fn convert(layers: Vec<Vec<TarEntry>>) -> Result<Converted, ConvertError> {
    convert_layers(layers.into_iter().map(layer).collect(), CS, 2)
}

pub(super) fn convert_layers(
    layers: Vec<Layer>,
    chunk_size: u32,
    threads: usize,
) -> Result<Converted, ConvertError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conv = Converter::new(chunk_size, 3, threads);
    let mut blobs = Vec::new();
    let mut stats = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let tar = layer.to_tar().expect("tar");
        let (blob, s) = conv.apply_layer(
            &tar[..],
            &format!("#{}", i + 1),
            &dir.path().join(format!("blob-{i}")),
        )?;
        blobs.push(blob);
        stats.push(s);
    }
    Ok(Converted {
        conv,
        blobs,
        stats,
        _dir: dir,
    })
}

/// The error of a conversion expected to fail.
pub(super) fn convert_err(layers: Vec<Vec<TarEntry>>) -> ConvertError {
    match convert(layers) {
        Ok(_) => panic!("conversion unexpectedly succeeded"),
        Err(e) => e,
    }
}

impl Converted {
    pub fn tree(&self) -> &ImageTree {
        self.conv.tree.tree()
    }

    pub fn id(&self, path: &str) -> Option<NodeId> {
        self.conv
            .tree
            .lookup(&components(path.as_bytes()).expect("valid path"))
    }

    pub fn node(&self, path: &str) -> &Node {
        let id = self.id(path).unwrap_or_else(|| panic!("{path} missing"));
        self.tree().node(id)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.id(path).is_some()
    }

    /// Sorted names in directory `path`.
    pub fn names(&self, path: &str) -> Vec<String> {
        match &self.node(path).kind {
            NodeKind::Dir { entries } => entries
                .keys()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect(),
            other => panic!("{path} is not a directory: {other:?}"),
        }
    }

    /// Blob files by digest.
    fn blob_files(&self) -> HashMap<Digest, PathBuf> {
        self.blobs
            .iter()
            .flatten()
            .map(|b| (b.digest, b.path.clone()))
            .collect()
    }

    /// The content of the file at `path`, read back from the data blobs.
    pub fn content(&self, path: &str) -> Vec<u8> {
        let NodeKind::File { size, chunks } = &self.node(path).kind else {
            panic!("{path} is not a file");
        };
        let files = self.blob_files();
        let store = &self.conv.store;
        let mut out = Vec::new();
        for index in chunks {
            let rec = store.records()[index.0 as usize];
            let blob = store.blobs()[rec.blob.0 as usize];
            let data = std::fs::read(&files[&blob.digest]).expect("blob");
            let start = rec.compressed_offset as usize;
            let stored = &data[start..start + rec.compressed_size as usize];
            let chunk = if rec.compressed {
                zstd::bulk::decompress(stored, rec.uncompressed_size as usize).expect("zstd")
            } else {
                stored.to_vec()
            };
            assert_eq!(chunk.len(), rec.uncompressed_size as usize);
            assert_eq!(
                ChunkHash::Blake3.digest(&chunk),
                rec.digest,
                "chunk digest of {path}"
            );
            out.extend(chunk);
        }
        assert_eq!(out.len() as u64, *size, "{path}");
        out
    }
}
