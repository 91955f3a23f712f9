//! Truncated, damaged and hostile bootstraps: every failure is an error,
//! never a panic or a hang.

use proptest::prelude::*;

use super::layout::{
    self, DirentRecord, Header, InodeRecord, RawBlob, RawChunk, Section, CHECKSUM_OFFSET,
    FILE_LEN_OFFSET, HEADER_SIZE, SECTION_TABLE_OFFSET, VERSION, VERSION_OFFSET,
};
use super::test_support::{arb_image, small_image};
use super::{BlobIndex, Bootstrap, ChunkIndex, FormatError, Ino, PrefetchRange};

/// Calls every accessor on a bounded number of inodes, entries and chunks.
/// Results are ignored: the point is that nothing panics or hangs.
pub(super) fn exercise(b: &Bootstrap) {
    let _ = (b.chunk_size(), b.checksum());
    let inodes = b.inode_count().min(64) + 1;
    for i in 0..=inodes {
        let ino = Ino(i);
        let _ = b.inode(ino);
        let _ = b.lookup(ino, b"x");
        let _ = b.dir_len(ino);
        let len = b.dir_len(ino).unwrap_or(0).min(32);
        for e in 0..=len {
            if let Ok(Some(entry)) = b.dir_entry(ino, e) {
                let _ = b.lookup(ino, entry.name);
            }
        }
        let mut up = ino;
        for _ in 0..100 {
            match b.parent(up) {
                Ok(p) if p != up => up = p,
                _ => break,
            }
        }
        let _ = b.symlink_target(ino);
        if let Ok(names) = b.xattr_names(ino) {
            for name in names {
                let _ = b.xattr(ino, name);
            }
        }
        let _ = b.xattr(ino, b"user.x");
        let count = b.file_chunk_count(ino).unwrap_or(0).min(16);
        for c in 0..=count {
            if let Ok(chunk) = b.file_chunk(ino, c) {
                let _ = b.chunk(chunk);
            }
        }
    }
    for c in 0..=b.chunk_count().min(64) {
        let _ = b.chunk(ChunkIndex(c));
    }
    for i in 0..=b.blob_count().min(64) {
        let _ = b.blob(BlobIndex(i));
    }
    let _ = b.prefetch_list();
    let _ = b.verify_all();
}

fn small_bytes() -> Vec<u8> {
    small_image().write()
}

#[test]
fn every_truncation_is_refused() {
    let bytes = small_bytes();
    for n in 0..bytes.len() {
        match Bootstrap::from_bytes(bytes[..n].to_vec()) {
            Err(FormatError::Truncated(_)) => {}
            other => panic!("truncated to {n}: {other:?}"),
        }
    }
    assert!(Bootstrap::from_bytes(bytes).is_ok());
}

#[test]
fn every_flipped_byte_is_refused() {
    let bytes = small_bytes();
    for pos in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 0x5a;
        let err = Bootstrap::from_bytes(damaged).expect_err("damage accepted");
        let ok = match pos {
            0..8 => matches!(err, FormatError::BadMagic),
            VERSION_OFFSET..12 => matches!(err, FormatError::UnsupportedVersion(_)),
            FILE_LEN_OFFSET..SECTION_TABLE_OFFSET => {
                matches!(err, FormatError::Truncated(_) | FormatError::Corrupt(_))
            }
            _ => matches!(err, FormatError::ChecksumMismatch { .. }),
        };
        assert!(ok, "byte {pos}: {err:?}");
    }
}

/// A well-checksummed copy of the small bootstrap with `f` applied.
struct Hostile {
    bytes: Vec<u8>,
    header: Header,
}

impl Hostile {
    fn new() -> Self {
        let bytes = small_bytes();
        let header = Header::decode(bytes[..HEADER_SIZE].try_into().unwrap());
        Hostile { bytes, header }
    }

    fn at(&self, s: Section, record: u64, field: usize) -> usize {
        let e = self.header.sections[s as usize];
        e.offset as usize + record as usize * s.record_size(VERSION) + field
    }

    fn put(mut self, s: Section, record: u64, field: usize, value: u32) -> Self {
        let at = self.at(s, record, field);
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        self
    }

    fn put_header(mut self, at: usize, value: &[u8]) -> Self {
        self.bytes[at..at + value.len()].copy_from_slice(value);
        self
    }

    fn get(&self, s: Section, record: u64, field: usize) -> u32 {
        let at = self.at(s, record, field);
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }

    fn open(mut self) -> Result<Bootstrap, FormatError> {
        layout::fix_checksum(&mut self.bytes);
        Bootstrap::from_bytes(self.bytes)
    }

    /// Opens, checks that verify_all refuses it, and exercises every accessor.
    fn opened(self) -> Bootstrap {
        let b = self
            .open()
            .expect("hostile content is only found on access");
        exercise(&b);
        let err = b
            .verify_all()
            .expect_err("verify_all accepted hostile content");
        assert!(matches!(err, FormatError::Corrupt(_)), "{err:?}");
        b
    }
}

/// Inode index of `path` in the clean small bootstrap.
fn index_of(path: &[&[u8]]) -> u64 {
    let b = Bootstrap::from_bytes(small_bytes()).unwrap();
    let mut ino = Ino::ROOT;
    for name in path {
        ino = b.lookup(ino, name).unwrap().unwrap().ino;
    }
    ino.0 - 1
}

const MODE: usize = 0;
const NLINK: usize = 12;
const SIZE: usize = 16;
const PARENT: usize = 44;
const DATA_START: usize = 48;
const DATA_COUNT: usize = 52;
const XATTR_START: usize = 56;
const DIRENT_NAME_OFFSET: usize = 0;
const DIRENT_INODE: usize = 8;
const CHUNK_BLOB: usize = 56;
const CHUNK_FLAGS: usize = 60;
const BLOB_FIRST_CHUNK: usize = 48;

fn corrupt<T: std::fmt::Debug>(r: Result<T, FormatError>) -> bool {
    matches!(r, Err(FormatError::Corrupt(_)))
}

#[test]
fn record_offsets_used_by_these_tests_match_the_layout() {
    let rec = InodeRecord {
        mode: 1,
        nlink: 2,
        size: 3,
        parent: 4,
        data_start: 5,
        data_count: 6,
        xattr_start: 7,
        ..Default::default()
    };
    let mut out = Vec::new();
    rec.encode(&mut out);
    let at = |o: usize| u32::from_le_bytes(out[o..o + 4].try_into().unwrap());
    let fields = [
        MODE,
        NLINK,
        SIZE,
        PARENT,
        DATA_START,
        DATA_COUNT,
        XATTR_START,
    ];
    assert_eq!(fields.map(at), [1, 2, 3, 4, 5, 6, 7]);
    let mut out = Vec::new();
    DirentRecord {
        name_offset: 1,
        inode: 2,
        ..Default::default()
    }
    .encode(&mut out);
    assert_eq!(out[DIRENT_NAME_OFFSET], 1);
    assert_eq!(out[DIRENT_INODE], 2);
    let mut out = Vec::new();
    RawChunk {
        blob: 1,
        flags: 2,
        ..Default::default()
    }
    .encode(&mut out);
    assert_eq!((out[CHUNK_BLOB], out[CHUNK_FLAGS]), (1, 2));
    let mut out = Vec::new();
    RawBlob {
        first_chunk: 1,
        ..Default::default()
    }
    .encode(&mut out);
    assert_eq!(out[BLOB_FIRST_CHUNK], 1);
}

#[test]
fn hostile_directories_are_refused_on_access() {
    // Root's entries point far outside the dirent table.
    let b = Hostile::new()
        .put(Section::Inodes, 0, DATA_COUNT, u32::MAX)
        .opened();
    assert!(corrupt(b.lookup(Ino::ROOT, b"etc")));
    assert!(corrupt(b.dir_len(Ino::ROOT)));
    assert!(corrupt(b.dir_entry(Ino::ROOT, 0)));
    let b = Hostile::new()
        .put(Section::Inodes, 0, DATA_START, u32::MAX - 1)
        .opened();
    assert!(corrupt(b.dir_entry(Ino::ROOT, 0)));

    // An entry naming an inode that does not exist.
    let b = Hostile::new()
        .put(Section::Dirents, 0, DIRENT_INODE, 0xffff_fff0)
        .opened();
    assert!(corrupt(b.dir_entry(Ino::ROOT, 0)));
    // An entry whose name lies outside the heap.
    let b = Hostile::new()
        .put(Section::Dirents, 0, DIRENT_NAME_OFFSET, u32::MAX)
        .opened();
    assert!(corrupt(b.dir_entry(Ino::ROOT, 0)));

    // Entries out of order: lookup may miss, but neither it nor verify panics.
    let h = Hostile::new();
    let (a, z) = (h.get(Section::Dirents, 0, 0), h.get(Section::Dirents, 1, 0));
    let (la, lz) = (h.get(Section::Dirents, 0, 4), h.get(Section::Dirents, 1, 4));
    let b = h
        .put(Section::Dirents, 0, 0, z)
        .put(Section::Dirents, 0, 4, lz)
        .put(Section::Dirents, 1, 0, a)
        .put(Section::Dirents, 1, 4, la)
        .opened();
    let _ = b.lookup(Ino::ROOT, b"etc");
}

#[test]
fn bad_names_are_refused() {
    let h = Hostile::new();
    let b = Bootstrap::from_bytes(h.bytes.clone()).unwrap();
    let name = b.dir_entry(Ino::ROOT, 0).unwrap().unwrap().name.to_vec();
    let off = h.get(Section::Dirents, 0, DIRENT_NAME_OFFSET) as usize;
    let heap = h.header.sections[Section::Strings as usize].offset as usize;
    for bad in [&b"."[..], b"..", b"/", b"\0"] {
        let mut h = Hostile::new().put(Section::Dirents, 0, 4, bad.len() as u32);
        h.bytes[heap + off..heap + off + bad.len()].copy_from_slice(bad);
        let b = h.opened();
        assert!(corrupt(b.dir_entry(Ino::ROOT, 0)), "{bad:?}");
    }
    let b = Hostile::new().put(Section::Dirents, 0, 4, 0).opened();
    assert!(corrupt(b.dir_entry(Ino::ROOT, 0)));
    assert!(!name.is_empty());
}

#[test]
fn parent_cycles_are_refused_by_verify() {
    let etc = index_of(&[b"etc"]) as u32;
    let tmp = index_of(&[b"tmp"]) as u32;
    let b = Hostile::new()
        .put(Section::Inodes, etc.into(), PARENT, tmp)
        .put(Section::Inodes, tmp.into(), PARENT, etc)
        .opened();
    // One step is still answered; walking up never reaches the root.
    assert_eq!(
        b.parent(Ino(u64::from(etc) + 1)).unwrap(),
        Ino(u64::from(tmp) + 1)
    );
    let b = Hostile::new()
        .put(Section::Inodes, 0, PARENT, u32::MAX)
        .opened();
    assert!(corrupt(b.parent(Ino::ROOT)));
    // A parent that is not a directory.
    let link = index_of(&[b"link"]) as u32;
    let b = Hostile::new()
        .put(Section::Inodes, etc.into(), PARENT, link)
        .opened();
    assert!(corrupt(b.parent(Ino(u64::from(etc) + 1))));
}

#[test]
fn hostile_files_symlinks_and_xattrs_are_refused_on_access() {
    let passwd = index_of(&[b"etc", b"passwd"]);
    let ino = Ino(passwd + 1);
    let b = Hostile::new()
        .put(Section::FileChunks, 0, 0, u32::MAX)
        .opened();
    assert!(corrupt(b.file_chunk(ino, 0)));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, DATA_COUNT, 1)
        .opened();
    assert!(corrupt(b.file_chunk_count(ino)));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, SIZE, u32::MAX)
        .opened();
    assert!(corrupt(b.file_chunk(ino, 0)));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, DATA_START, u32::MAX)
        .opened();
    assert!(corrupt(b.file_chunk_count(ino)));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, XATTR_START, u32::MAX)
        .opened();
    assert!(corrupt(b.xattr_names(ino)));
    assert!(corrupt(b.xattr(ino, b"user.a")));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, NLINK, 7)
        .opened();
    assert_eq!(b.inode(ino).unwrap().nlink, 7);
    let b = Hostile::new()
        .put(Section::Inodes, passwd, MODE, 0o170644)
        .opened();
    assert!(corrupt(b.inode(ino)));
    let b = Hostile::new()
        .put(Section::Inodes, passwd, MODE, 0o1100644)
        .opened();
    assert!(corrupt(b.inode(ino)));

    let link = index_of(&[b"link"]);
    let b = Hostile::new()
        .put(Section::Inodes, link, DATA_START, u32::MAX)
        .opened();
    assert!(corrupt(b.symlink_target(Ino(link + 1))));
    let b = Hostile::new().put(Section::Inodes, link, SIZE, 3).opened();
    assert!(corrupt(b.symlink_target(Ino(link + 1))));
}

#[test]
fn hostile_chunks_blobs_and_prefetch_are_refused_on_access() {
    let b = Hostile::new()
        .put(Section::Chunks, 0, CHUNK_BLOB, 99)
        .opened();
    assert!(corrupt(b.chunk(ChunkIndex(0))));
    let b = Hostile::new()
        .put(Section::Chunks, 0, CHUNK_FLAGS, 6)
        .opened();
    assert!(corrupt(b.chunk(ChunkIndex(0))));
    let b = Hostile::new()
        .put(Section::Blobs, 0, BLOB_FIRST_CHUNK, u32::MAX)
        .opened();
    assert!(corrupt(b.blob(BlobIndex(0))));
    // A stored range that overflows u64 and leaves its blob.
    let b = Hostile::new()
        .put(Section::Chunks, 0, 32, u32::MAX)
        .put(Section::Chunks, 0, 36, u32::MAX)
        .opened();
    assert_eq!(b.chunk(ChunkIndex(0)).unwrap().compressed_offset, u64::MAX);
    // Prefetch records: (inode index, first chunk, chunk count).
    let b = Hostile::new()
        .put(Section::Prefetch, 0, 0, u32::MAX)
        .opened();
    assert!(corrupt(b.prefetch_list()));
    let b = Hostile::new().put(Section::Prefetch, 0, 0, 0).opened();
    assert!(corrupt(b.prefetch_list()), "the root is no file");
    let b = Hostile::new().put(Section::Prefetch, 0, 8, 0).opened();
    assert!(corrupt(b.prefetch_list()), "no chunk");
    let b = Hostile::new()
        .put(Section::Prefetch, 0, 4, u32::MAX)
        .opened();
    assert!(corrupt(b.prefetch_list()), "first chunk + count overflows");
    let b = Hostile::new().put(Section::Prefetch, 0, 8, 99).opened();
    assert!(corrupt(b.prefetch_list()), "past the file's end");
    let clean = Bootstrap::from_bytes(small_bytes()).unwrap();
    assert!(!clean.prefetch_list().unwrap().is_empty());
}

/// A bootstrap of version 1 (written by an older lodectl, kept in the fuzz
/// corpus) opens, and its prefetch list names whole files, empty ones left
/// out.
#[test]
fn version_1_bootstraps_prefetch_whole_files() {
    let bytes = include_bytes!("../../../fuzz/corpus/bootstrap/small.bootstrap").to_vec();
    assert_eq!(bytes[VERSION_OFFSET], 1);
    let b = Bootstrap::from_bytes(bytes).unwrap();
    b.verify_all().unwrap();
    let etc = b.lookup(Ino::ROOT, b"etc").unwrap().unwrap().ino;
    let passwd = b.lookup(etc, b"passwd").unwrap().unwrap().ino;
    assert_eq!(
        b.prefetch_list().unwrap(),
        vec![PrefetchRange {
            ino: passwd,
            chunks: 0..2
        }]
    );
}

#[test]
fn hostile_headers_are_refused_at_open() {
    let entry = |s: Section| SECTION_TABLE_OFFSET + 16 * s as usize;
    let cases: Vec<(&str, Hostile)> = vec![
        ("flags", Hostile::new().put_header(12, &2u32.to_le_bytes())),
        ("flags", Hostile::new().put_header(12, &3u32.to_le_bytes())),
        ("reserved", Hostile::new().put_header(HEADER_SIZE - 1, &[1])),
        (
            "offset in header",
            Hostile::new().put_header(entry(Section::Inodes), &8u64.to_le_bytes()),
        ),
        ("misaligned", {
            let h = Hostile::new();
            let off = h.header.sections[Section::Dirents as usize].offset + 4;
            h.put_header(entry(Section::Dirents), &off.to_le_bytes())
        }),
        ("not a record multiple", {
            let h = Hostile::new();
            let len = h.header.sections[Section::Inodes as usize].length - 8;
            h.put_header(entry(Section::Inodes) + 8, &len.to_le_bytes())
        }),
        (
            "past the end",
            Hostile::new().put_header(entry(Section::Strings) + 8, &u64::MAX.to_le_bytes()),
        ),
        ("overlap", {
            let h = Hostile::new();
            let off = h.header.sections[Section::Inodes as usize].offset;
            h.put_header(entry(Section::Dirents), &off.to_le_bytes())
        }),
        (
            "no inodes",
            Hostile::new().put_header(entry(Section::Inodes) + 8, &0u64.to_le_bytes()),
        ),
        (
            "root not a directory",
            Hostile::new().put(Section::Inodes, 0, MODE, 0o100644),
        ),
    ];
    for (what, h) in cases {
        let err = h.open().expect_err(what);
        assert!(matches!(err, FormatError::Corrupt(_)), "{what}: {err:?}");
    }
    let err = Hostile::new()
        .put_header(16, &1000u32.to_le_bytes())
        .open()
        .unwrap_err();
    assert!(matches!(err, FormatError::InvalidChunkSize(1000)));
    let mut h = Hostile::new();
    h.bytes.extend_from_slice(&[0; 8]);
    assert!(corrupt(h.open()));
    assert_eq!(CHECKSUM_OFFSET, 20);
}

/// Overwrites bytes (or u32 words with boundary values) at random places,
/// fixes the checksum up and makes sure every accessor survives.
fn mutation() -> impl Strategy<Value = (usize, u32, bool)> {
    (
        any::<usize>(),
        prop_oneof![
            any::<u32>(),
            Just(0),
            Just(1),
            Just(0x7fff_ffff),
            Just(u32::MAX)
        ],
        any::<bool>(),
    )
}

fn mutate(bytes: &mut [u8], muts: &[(usize, u32, bool)], header_too: bool) {
    let floor = if header_too { 0 } else { HEADER_SIZE };
    for &(pos, value, word) in muts {
        let span = bytes.len().saturating_sub(floor + 4).max(1);
        let at = floor + pos % span;
        if word {
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        } else {
            bytes[at] = value as u8;
        }
    }
    layout::fix_checksum(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_damage_with_valid_checksum_never_panics(
        image in arb_image(),
        muts in prop::collection::vec(mutation(), 1..8),
        header_too in any::<bool>(),
    ) {
        let mut bytes = image.write();
        mutate(&mut bytes, &muts, header_too);
        if let Ok(b) = Bootstrap::from_bytes(bytes) {
            exercise(&b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&layout::MAGIC);
        }
        if let Ok(b) = Bootstrap::from_bytes_unchecked_checksum(bytes) {
            exercise(&b);
        }
    }
}
