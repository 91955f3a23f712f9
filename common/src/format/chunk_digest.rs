//! Chunk digests: how a bootstrap names, and a daemon checks, a chunk's bytes.
//!
//! Every chunk digest of one bootstrap uses the same hash, named by the
//! header flag [`FLAG_BLAKE3_CHUNKS`]:
//! BLAKE3, which the converter writes, or sha256, which bootstraps written
//! before it use and which every build still reads. A daemon hashes each
//! chunk it fetches; on x86-64 BLAKE3 hashes a 1 MiB chunk about 3.5 times
//! faster than sha256 does with the CPU's SHA extensions.

use std::fmt;

use sha2::{Digest as _, Sha256};

use super::layout::FLAG_BLAKE3_CHUNKS;

/// The hash of a bootstrap's chunk digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkHash {
    Sha256,
    Blake3,
}

impl ChunkHash {
    /// The hash the converter writes.
    pub const WRITTEN: ChunkHash = ChunkHash::Blake3;

    /// The digest of `data` under this hash.
    pub fn digest(self, data: &[u8]) -> ChunkDigest {
        let bytes = match self {
            ChunkHash::Sha256 => Sha256::digest(data).into(),
            ChunkHash::Blake3 => *blake3::hash(data).as_bytes(),
        };
        ChunkDigest { hash: self, bytes }
    }

    /// The hash a bootstrap header's `flags` name.
    pub(super) fn from_header_flags(flags: u32) -> ChunkHash {
        if flags & FLAG_BLAKE3_CHUNKS != 0 {
            ChunkHash::Blake3
        } else {
            ChunkHash::Sha256
        }
    }

    /// The header flags that name this hash.
    pub(super) fn header_flags(self) -> u32 {
        match self {
            ChunkHash::Blake3 => FLAG_BLAKE3_CHUNKS,
            ChunkHash::Sha256 => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }
}

/// The digest of a chunk's uncompressed bytes, with the hash that made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkDigest {
    hash: ChunkHash,
    bytes: [u8; 32],
}

impl ChunkDigest {
    pub const fn new(hash: ChunkHash, bytes: [u8; 32]) -> Self {
        Self { hash, bytes }
    }

    pub fn hash(&self) -> ChunkHash {
        self.hash
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hash.name(), hex::encode(self.bytes))
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hash_gives_its_known_digest_and_names_itself() {
        // The empty input's digests as published for each hash.
        assert_eq!(
            ChunkHash::Sha256.digest(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            ChunkHash::Blake3.digest(b"").to_string(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn digests_of_different_hashes_or_bytes_differ() {
        let sha = ChunkHash::Sha256.digest(b"chunk");
        let b3 = ChunkHash::Blake3.digest(b"chunk");
        assert_ne!(sha, b3);
        assert_eq!(sha, ChunkDigest::new(ChunkHash::Sha256, *sha.as_bytes()));
        // The same bytes under another hash are another digest.
        assert_ne!(b3, ChunkDigest::new(ChunkHash::Sha256, *b3.as_bytes()));
        assert_eq!(b3.hash().digest(b"chunk"), b3);
        assert_ne!(b3.hash().digest(b"chunk!"), b3);
    }
}
