//! Turning stored chunk bytes into verified file bytes.

use std::cell::RefCell;
use std::sync::Arc;

use lode_common::format::{ChunkDigest, ChunkRecord, MAX_CHUNK_SIZE};

use crate::read::pools::{BufPool, ChunkBuf};

/// Why stored bytes were not accepted as a chunk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkDefect {
    #[error("stored size {actual}, record says {expected}")]
    StoredSize { expected: u32, actual: usize },
    #[error("record claims {0} uncompressed bytes, more than any chunk can hold")]
    Oversized(u32),
    #[error("raw chunk with stored size {stored} and uncompressed size {uncompressed}")]
    RawSizeMismatch { stored: u32, uncompressed: u32 },
    #[error("stored size {0} exceeds the image's chunk size")]
    StoredOversized(u32),
    #[error("zstd: {0}")]
    Decompress(String),
    #[error("decompressed to {actual} bytes, record says {expected}")]
    Length { expected: u32, actual: usize },
    #[error("content digest is {actual}")]
    Digest { actual: ChunkDigest },
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompresses (if the record says so) into a buffer from `pool` and checks
/// length and digest against the record. Decompression never produces more
/// than the record's size, so a hostile frame cannot make us allocate more
/// than one chunk.
pub fn decode_chunk(
    rec: &ChunkRecord,
    stored: ChunkBuf,
    pool: &Arc<BufPool>,
) -> Result<ChunkBuf, ChunkDefect> {
    if stored.len() != rec.compressed_size as usize {
        return Err(ChunkDefect::StoredSize {
            expected: rec.compressed_size,
            actual: stored.len(),
        });
    }
    let size = rec.uncompressed_size as usize;
    if rec.uncompressed_size > MAX_CHUNK_SIZE || size > pool.capacity() {
        return Err(ChunkDefect::Oversized(rec.uncompressed_size));
    }
    let data = if rec.compressed {
        let mut out = pool
            .take(size)
            .ok_or(ChunkDefect::Oversized(rec.uncompressed_size))?;
        let written = DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let decompressor = match slot.as_mut() {
                Some(d) => d,
                None => slot.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| ChunkDefect::Decompress(e.to_string()))?,
                ),
            };
            decompressor
                .decompress_to_buffer(stored.as_slice(), &mut out.space()[..size])
                .map_err(|e| ChunkDefect::Decompress(e.to_string()))
        })?;
        out.set_len(written);
        out
    } else {
        if rec.compressed_size != rec.uncompressed_size {
            return Err(ChunkDefect::RawSizeMismatch {
                stored: rec.compressed_size,
                uncompressed: rec.uncompressed_size,
            });
        }
        stored
    };
    if data.len() != size {
        return Err(ChunkDefect::Length {
            expected: rec.uncompressed_size,
            actual: data.len(),
        });
    }
    let actual = rec.digest.hash().digest(data.as_slice());
    if actual != rec.digest {
        return Err(ChunkDefect::Digest { actual });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_common::format::{BlobIndex, ChunkHash};

    const CAPACITY: usize = 64 << 10;

    /// Decodes `stored` with a pool of 64 KiB buffers.
    fn decode(rec: &ChunkRecord, stored: &[u8]) -> Result<Vec<u8>, ChunkDefect> {
        let pool = BufPool::new(CAPACITY);
        let mut buf = pool.take(stored.len().min(CAPACITY)).unwrap();
        buf.fill_from(stored);
        decode_chunk(rec, buf, &pool).map(|b| b.as_slice().to_vec())
    }

    fn record(data: &[u8], stored: &[u8], compressed: bool) -> ChunkRecord {
        ChunkRecord {
            digest: ChunkHash::WRITTEN.digest(data),
            blob: BlobIndex(0),
            compressed_offset: 0,
            compressed_size: stored.len() as u32,
            uncompressed_offset: 0,
            uncompressed_size: data.len() as u32,
            compressed,
        }
    }

    #[test]
    fn accepts_raw_and_zstd_chunks() {
        let data = b"hello hello hello hello".repeat(100);
        let rec = record(&data, &data, false);
        assert_eq!(decode(&rec, &data).unwrap(), data);
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let rec = record(&data, &z, true);
        assert_eq!(decode(&rec, &z).unwrap(), data);
    }

    #[test]
    fn rejects_wrong_content_under_either_hash() {
        let data = vec![1u8; 1000];
        let mut other = data.clone();
        other[500] = 2;
        for hash in [ChunkHash::Blake3, ChunkHash::Sha256] {
            let rec = ChunkRecord {
                digest: hash.digest(&data),
                ..record(&data, &data, false)
            };
            assert_eq!(decode(&rec, &data).unwrap(), data);
            let Err(ChunkDefect::Digest { actual }) = decode(&rec, &other) else {
                panic!("{hash:?}: other bytes passed");
            };
            assert_eq!(actual, hash.digest(&other));
            // A digest of the right bytes under the other hash is refused too.
            let swapped = ChunkRecord {
                digest: ChunkDigest::new(
                    match hash {
                        ChunkHash::Blake3 => ChunkHash::Sha256,
                        ChunkHash::Sha256 => ChunkHash::Blake3,
                    },
                    *rec.digest.as_bytes(),
                ),
                ..rec
            };
            assert!(matches!(
                decode(&swapped, &data),
                Err(ChunkDefect::Digest { .. })
            ));
        }
        let rec = record(&data, &data, false);
        assert!(matches!(
            decode(&rec, &vec![1u8; 999]),
            Err(ChunkDefect::StoredSize { .. })
        ));
    }

    #[test]
    fn rejects_frames_that_decompress_to_more_or_less() {
        let data = vec![9u8; 10_000];
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let mut rec = record(&data, &z, true);
        rec.uncompressed_size = 5_000;
        assert!(matches!(decode(&rec, &z), Err(ChunkDefect::Decompress(_))));
        rec.uncompressed_size = 20_000;
        assert!(matches!(
            decode(&rec, &z),
            Err(ChunkDefect::Length { actual: 10_000, .. })
        ));
    }

    #[test]
    fn garbage_frames_are_errors_not_panics() {
        let data = vec![3u8; 4096];
        for garbage in [vec![], vec![0u8; 17], b"\x28\xb5\x2f\xfd garbage".to_vec()] {
            let rec = record(&data, &garbage, true);
            assert!(decode(&rec, &garbage).is_err());
        }
        let mut rec = record(&data, &data, true);
        rec.uncompressed_size = u32::MAX;
        assert!(matches!(
            decode(&rec, &data),
            Err(ChunkDefect::Oversized(_))
        ));
    }
}
