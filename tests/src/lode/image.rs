//! Reading a Lode image's bootstrap in tests: where a file's chunks are.

use std::path::{Path, PathBuf};

use lode_common::format::{Bootstrap, Ino, InodeKind};
use lode_common::registry::{Reference, RegistryClient, RegistryOptions};
use lode_common::Digest;

use crate::KitError;

/// Downloads the bootstrap of Lode image `image` into `dir` (plain HTTP);
/// returns the manifest digest the reference resolved to and the file.
pub fn fetch_bootstrap(image: &Reference, dir: &Path) -> Result<(Digest, PathBuf), KitError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(KitError::io("start tokio runtime"))?;
    runtime.block_on(async {
        let client = RegistryClient::new(RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        })
        .map_err(|e| KitError::Invalid(format!("registry client: {e}")))?;
        let lode = lode_common::image::resolve(&client, image)
            .await
            .map_err(|e| KitError::Invalid(format!("resolve {image}: {e}")))?;
        let path = lode_common::image::fetch_bootstrap(&client, image, &lode, dir)
            .await
            .map_err(|e| KitError::Invalid(format!("bootstrap of {image}: {e}")))?;
        Ok((lode.manifest_digest, path))
    })
}

/// Where one chunk of a file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The data blob (a layer digest of the Lode image).
    pub blob: Digest,
    /// Offset and length of the stored bytes in the blob.
    pub offset: u64,
    pub stored_size: u32,
    pub uncompressed_size: u32,
    /// Stored as a zstd frame (otherwise raw).
    pub compressed: bool,
    /// Index of the chunk among its blob's chunks (its byte in the cache's
    /// presence map).
    pub rel: u32,
}

/// The chunks of the regular file at `path` (relative to the image root,
/// `/`-separated), in file order.
pub fn file_chunks(bootstrap: &Bootstrap, path: &[u8]) -> Result<Vec<ChunkLocation>, KitError> {
    let bad = |e: lode_common::format::FormatError| {
        KitError::Invalid(format!("bootstrap, {}: {e}", path.escape_ascii()))
    };
    let mut ino = Ino::ROOT;
    for name in path.split(|b| *b == b'/').filter(|n| !n.is_empty()) {
        ino = bootstrap
            .lookup(ino, name)
            .map_err(bad)?
            .ok_or_else(|| KitError::Invalid(format!("bootstrap has no {}", path.escape_ascii())))?
            .ino;
    }
    let inode = bootstrap.inode(ino).map_err(bad)?;
    if inode.kind != InodeKind::File {
        return Err(KitError::Invalid(format!(
            "{} is a {:?}, not a regular file",
            path.escape_ascii(),
            inode.kind
        )));
    }
    let count = bootstrap.file_chunk_count(ino).map_err(bad)?;
    let mut out = Vec::new();
    for i in 0..count {
        let index = bootstrap.file_chunk(ino, i).map_err(bad)?;
        let chunk = bootstrap.chunk(index).map_err(bad)?;
        let blob = bootstrap.blob(chunk.blob).map_err(bad)?;
        out.push(ChunkLocation {
            blob: blob.digest,
            offset: chunk.compressed_offset,
            stored_size: chunk.compressed_size,
            uncompressed_size: chunk.uncompressed_size,
            compressed: chunk.compressed,
            rel: index.0 - blob.first_chunk.0,
        });
    }
    Ok(out)
}

/// Digests and stored sizes of every data blob of the bootstrap.
pub fn data_blobs(bootstrap: &Bootstrap) -> Result<Vec<(Digest, u64)>, KitError> {
    (0..bootstrap.blob_count())
        .map(|i| {
            bootstrap
                .blob(lode_common::format::BlobIndex(i))
                .map(|b| (b.digest, b.compressed_size))
                .map_err(|e| KitError::Invalid(format!("bootstrap blob {i}: {e}")))
        })
        .collect()
}

/// Header length of a cache presence map (`<hex>.map`, see fsd's cache.rs):
/// then one byte per chunk of the blob, 1 once the chunk is durable.
const CACHE_MAP_HEADER: u64 = 64;

/// Whether the chunk cache in `cache_dir` records `chunk` as durable (its
/// presence map byte is 1, written only after the data was fdatasync'ed).
pub fn cache_durable(cache_dir: &Path, chunk: &ChunkLocation) -> bool {
    use std::os::unix::fs::FileExt as _;
    let map = cache_dir.join(format!("{}.map", chunk.blob.hex()));
    let mut byte = [0u8; 1];
    std::fs::File::open(map)
        .and_then(|f| f.read_exact_at(&mut byte, CACHE_MAP_HEADER + u64::from(chunk.rel)))
        .is_ok_and(|()| byte[0] == 1)
}

/// Bytes the files in the chunk cache `cache_dir` occupy on disk.
pub fn cache_disk_bytes(cache_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(cache_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Removes every cached blob in `cache_dir` as `lode-snapshotter`'s size
/// limit does (the map, then the data file), while daemons may use them.
/// Returns how many blobs it removed.
pub fn remove_cached_blobs(cache_dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(cache_dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(hex) = name.strip_suffix(".map") {
            std::fs::remove_file(entry.path())?;
            std::fs::remove_file(cache_dir.join(hex))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// How many descriptors the processes `pids` hold on files of `cache_dir`
/// that were removed (their space is not freed while they are held).
pub fn removed_cache_files_held(pids: &[u32], cache_dir: &Path) -> usize {
    let prefix = format!("{}/", cache_dir.display());
    pids.iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|t| t.starts_with(&prefix) && t.ends_with(" (deleted)"))
        .count()
}
