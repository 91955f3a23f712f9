//! The presence map file of a cached blob, `<hex>.map`: a header, then one
//! byte per chunk (1 when the chunk is durable in the data file).
//!
//! The header names the chunk layout and the data file (its inode) the
//! bytes describe. A data file is replaced when the cache is trimmed while
//! daemons still use the blob: a map written for the old file must never
//! vouch for the new one, whose unwritten ranges read as zeros.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use lode_common::format::{BlobRecord, ChunkRecord};
use sha2::{Digest as _, Sha256};

const MAP_MAGIC: &[u8; 8] = b"LODEMAP2";
/// magic (8) + chunk count (4) + reserved (4) + uncompressed size (8) +
/// layout hash (32) + data file inode (8).
pub(super) const MAP_HEADER_LEN: u64 = 64;
/// Where the data file's inode number sits in the header.
const DATA_INODE_AT: u64 = 56;

/// The map header of `blob` laid out as `chunks`, for the data file with
/// inode `data_inode`.
pub(super) fn map_header(blob: &BlobRecord, chunks: &[ChunkRecord], data_inode: u64) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for rec in chunks {
        hasher.update(rec.digest.as_bytes());
        hasher.update(rec.uncompressed_offset.to_le_bytes());
        hasher.update(rec.uncompressed_size.to_le_bytes());
    }
    let mut header = Vec::with_capacity(MAP_HEADER_LEN as usize);
    header.extend_from_slice(MAP_MAGIC);
    header.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    header.extend_from_slice(&[0u8; 4]);
    header.extend_from_slice(&blob.uncompressed_size.to_le_bytes());
    header.extend_from_slice(&hasher.finalize());
    header.extend_from_slice(&data_inode.to_le_bytes());
    debug_assert_eq!(header.len() as u64, MAP_HEADER_LEN);
    header
}

/// The data file inode the map's header names now (another process may
/// have reset it for a new data file since this one opened it).
pub(super) fn data_inode_of(map: &File) -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    map.read_exact_at(&mut bytes, DATA_INODE_AT)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Opens the map file, creating it complete (header and zeros) through a
/// temporary file and a hard link, so that no process ever sees it half made.
/// The cache may be trimmed meanwhile (the file removed right after it was
/// made): then it is made again, a few times at most.
pub(super) fn open_map(path: &Path, header: &[u8], count: usize) -> std::io::Result<File> {
    let open = || OpenOptions::new().read(true).write(true).open(path);
    for _ in 0..3 {
        match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_extension(format!(
            "map.tmp.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut content = header.to_vec();
        content.resize(MAP_HEADER_LEN as usize + count, 0);
        std::fs::write(&tmp, &content)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    open()
}
