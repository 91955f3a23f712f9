//! Tar entries described in code, written byte-exactly: names are raw bytes
//! (non-UTF-8, `..`, absolute paths are all allowed, so tests can build
//! hostile layers), long names use GNU or PAX records, xattrs use PAX
//! `SCHILY.xattr.*` records.

use std::io::{self, Read, Write};

use tar::{EntryType, Header};

use crate::layout::LongNames;

/// Content of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File(Vec<u8>),
    /// A regular file of `size` bytes of [`pseudo_random_bytes`]`(seed, ..)`,
    /// generated while writing (large files without large buffers).
    RandomFile {
        size: u64,
        seed: u64,
    },
    Dir,
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One tar entry. Build with the constructors, adjust with the chained setters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Written as `SCHILY.xattr.<name>` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Further PAX records, written verbatim.
    pub pax: Vec<(String, Vec<u8>)>,
}

/// Fixed mtime so layers are reproducible (2023-11-14).
const DEFAULT_MTIME: u64 = 1_700_000_000;
const BLOCK: usize = 512;
/// Longest name the header's own field holds.
const NAME_FIELD: usize = 100;

impl TarEntry {
    fn new(path: impl AsRef<[u8]>, kind: EntryKind, mode: u32) -> Self {
        Self {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
            pax: Vec::new(),
        }
    }

    pub fn file(path: impl AsRef<[u8]>, content: impl Into<Vec<u8>>) -> Self {
        Self::new(path, EntryKind::File(content.into()), 0o644)
    }

    pub fn random_file(path: impl AsRef<[u8]>, size: u64, seed: u64) -> Self {
        Self::new(path, EntryKind::RandomFile { size, seed }, 0o644)
    }

    /// A directory; a trailing `/` is added to the name as tar tools do.
    pub fn dir(path: impl AsRef<[u8]>) -> Self {
        let mut path = path.as_ref().to_vec();
        if !path.ends_with(b"/") {
            path.push(b'/');
        }
        Self::new(path, EntryKind::Dir, 0o755)
    }

    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(path, EntryKind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hard link to `target`, an earlier entry's path.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Self::new(path, EntryKind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    pub fn char_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Self::new(path, EntryKind::CharDevice { major, minor }, 0o666)
    }

    pub fn block_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Self::new(path, EntryKind::BlockDevice { major, minor }, 0o660)
    }

    pub fn fifo(path: impl AsRef<[u8]>) -> Self {
        Self::new(path, EntryKind::Fifo, 0o644)
    }

    /// The whiteout deleting `path` (`a/b` → `a/.wh.b`) from lower layers.
    pub fn whiteout(path: impl AsRef<[u8]>) -> Self {
        let path = path.as_ref();
        let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        let mut out = dir.to_vec();
        out.extend_from_slice(b".wh.");
        out.extend_from_slice(name);
        Self::file(out, Vec::new())
    }

    /// The marker making directory `dir` opaque (hides lower layers' content).
    pub fn opaque(dir: impl AsRef<[u8]>) -> Self {
        let mut path = dir.as_ref().to_vec();
        if !path.is_empty() && !path.ends_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(b".wh..wh..opq");
        Self::file(path, Vec::new())
    }

    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, seconds: u64) -> Self {
        self.mtime = seconds;
        self
    }

    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.xattrs.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    pub fn pax_record(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.pax.push((key.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Size of the entry's data in the archive.
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File(content) => content.len() as u64,
            EntryKind::RandomFile { size, .. } => *size,
            _ => 0,
        }
    }

    /// The file content, materialized (for assertions).
    pub fn content(&self) -> Option<Vec<u8>> {
        match &self.kind {
            EntryKind::File(content) => Some(content.clone()),
            EntryKind::RandomFile { size, seed } => {
                Some(pseudo_random_bytes(*seed, 0, usize::try_from(*size).ok()?))
            }
            _ => None,
        }
    }
}

/// Deterministic bytes at `offset..offset+len` of the pseudo-random stream
/// `seed`: any range can be recomputed without generating what precedes it.
pub fn pseudo_random_bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut position = offset;
    while out.len() < len {
        let word =
            splitmix64(seed ^ (position / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        let start = (position % 8) as usize;
        let take = (8 - start).min(len - out.len());
        out.extend_from_slice(&word[start..start + take]);
        position += take as u64;
    }
    out
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Streams a [`EntryKind::RandomFile`].
struct RandomReader {
    seed: u64,
    position: u64,
    end: u64,
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.end - self.position)
            .unwrap_or(usize::MAX)
            .min(buf.len())
            .min(1 << 20);
        buf[..n].copy_from_slice(&pseudo_random_bytes(self.seed, self.position, n));
        self.position += n as u64;
        Ok(n)
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `len` counts itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

fn header_for(long_names: LongNames) -> Header {
    match long_names {
        LongNames::Gnu => Header::new_gnu(),
        LongNames::Pax => Header::new_ustar(),
    }
}

/// Appends a header-plus-data entry, padded to the block size.
fn write_raw(out: &mut dyn Write, header: &Header, data: &mut dyn Read) -> io::Result<u64> {
    out.write_all(header.as_bytes())?;
    let written = io::copy(data, out)?;
    let pad = (BLOCK - (written as usize % BLOCK)) % BLOCK;
    out.write_all(&[0u8; BLOCK][..pad])?;
    Ok(written)
}

/// A metadata entry (GNU long name/link, PAX header) carrying `data`.
fn write_meta(
    out: &mut dyn Write,
    long_names: LongNames,
    kind: u8,
    name: &[u8],
    data: &[u8],
) -> io::Result<()> {
    let mut header = header_for(long_names);
    header.set_entry_type(EntryType::new(kind));
    set_name_field(&mut header, name);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    write_raw(out, &header, &mut &data[..]).map(|_| ())
}

fn set_name_field(header: &mut Header, name: &[u8]) {
    let field = &mut header.as_old_mut().name;
    field.fill(0);
    let n = name.len().min(NAME_FIELD);
    field[..n].copy_from_slice(&name[..n]);
}

fn set_link_field(header: &mut Header, link: &[u8]) {
    let field = &mut header.as_old_mut().linkname;
    field.fill(0);
    let n = link.len().min(NAME_FIELD);
    field[..n].copy_from_slice(&link[..n]);
}

/// Writes `entry` (and the GNU/PAX entries it needs) to `out`.
pub(crate) fn write_entry(
    out: &mut dyn Write,
    entry: &TarEntry,
    long_names: LongNames,
) -> io::Result<()> {
    let link = match &entry.kind {
        EntryKind::Symlink(target) | EntryKind::Hardlink(target) => Some(target.as_slice()),
        _ => None,
    };
    let mut pax = Vec::new();
    for (name, value) in &entry.xattrs {
        pax.extend(pax_record(&format!("SCHILY.xattr.{name}"), value));
    }
    for (key, value) in &entry.pax {
        pax.extend(pax_record(key, value));
    }
    let long_path = entry.path.len() > NAME_FIELD;
    let long_link = link.is_some_and(|l| l.len() > NAME_FIELD);
    match long_names {
        LongNames::Gnu => {
            let gnu_name = b"././@LongLink";
            if long_path {
                let mut data = entry.path.clone();
                data.push(0);
                write_meta(out, long_names, b'L', gnu_name, &data)?;
            }
            if let (true, Some(link)) = (long_link, link) {
                let mut data = link.to_vec();
                data.push(0);
                write_meta(out, long_names, b'K', gnu_name, &data)?;
            }
        }
        LongNames::Pax => {
            if long_path {
                pax.extend(pax_record("path", &entry.path));
            }
            if let (true, Some(link)) = (long_link, link) {
                pax.extend(pax_record("linkpath", link));
            }
        }
    }
    if !pax.is_empty() {
        let mut name = b"PaxHeaders/".to_vec();
        let tail = entry.path.len().saturating_sub(NAME_FIELD - name.len());
        name.extend_from_slice(&entry.path[tail..]);
        write_meta(out, long_names, b'x', &name, &pax)?;
    }

    let mut header = header_for(long_names);
    let entry_type = match &entry.kind {
        EntryKind::File(_) | EntryKind::RandomFile { .. } => EntryType::Regular,
        EntryKind::Dir => EntryType::Directory,
        EntryKind::Symlink(_) => EntryType::Symlink,
        EntryKind::Hardlink(_) => EntryType::Link,
        EntryKind::CharDevice { .. } => EntryType::Char,
        EntryKind::BlockDevice { .. } => EntryType::Block,
        EntryKind::Fifo => EntryType::Fifo,
    };
    header.set_entry_type(entry_type);
    set_name_field(&mut header, &entry.path);
    if let Some(link) = link {
        set_link_field(&mut header, link);
    }
    header.set_mode(entry.mode);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(entry.mtime);
    header.set_size(entry.size());
    if let EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } =
        entry.kind
    {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    header.set_cksum();
    match &entry.kind {
        EntryKind::File(content) => write_raw(out, &header, &mut &content[..])?,
        EntryKind::RandomFile { size, seed } => write_raw(
            out,
            &header,
            &mut RandomReader {
                seed: *seed,
                position: 0,
                end: *size,
            },
        )?,
        _ => write_raw(out, &header, &mut io::empty())?,
    };
    Ok(())
}

/// Writes all entries and the end-of-archive marker.
pub(crate) fn write_tar(
    out: &mut dyn Write,
    entries: &[TarEntry],
    long_names: LongNames,
) -> io::Result<()> {
    for entry in entries {
        write_entry(out, entry, long_names)?;
    }
    out.write_all(&[0u8; 2 * BLOCK])
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt as _;

    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for (key, value_len) in [
            ("path", 1usize),
            ("path", 5),
            ("path", 94),
            ("SCHILY.xattr.user.x", 990),
        ] {
            let record = pax_record(key, &vec![b'a'; value_len]);
            let text = String::from_utf8(record.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), record.len(), "{text:?}");
        }
    }

    #[test]
    fn random_bytes_are_addressable_by_offset() {
        let whole = pseudo_random_bytes(7, 0, 100);
        assert_eq!(pseudo_random_bytes(7, 13, 50), whole[13..63]);
        assert_ne!(pseudo_random_bytes(8, 0, 100), whole);
        let mut reader = RandomReader {
            seed: 7,
            position: 0,
            end: 100,
        };
        let mut streamed = Vec::new();
        reader.read_to_end(&mut streamed).unwrap();
        assert_eq!(streamed, whole);
    }

    #[test]
    fn whiteout_and_opaque_names() {
        assert_eq!(TarEntry::whiteout("a/b/c").path, b"a/b/.wh.c");
        assert_eq!(TarEntry::whiteout("top").path, b".wh.top");
        assert_eq!(TarEntry::opaque("a/b").path, b"a/b/.wh..wh..opq");
        assert_eq!(TarEntry::dir("d").path, b"d/");
    }

    fn roundtrip(long_names: LongNames) {
        let long = format!("{}/file", "d".repeat(150));
        let long_target = "t".repeat(200);
        let non_utf8 = b"bad-\xff\xfe-name".to_vec();
        let entries = vec![
            TarEntry::dir("d").mode(0o700).owner(1000, 1001),
            TarEntry::file(&long, "long content").mtime(12345),
            TarEntry::file(&non_utf8, "x"),
            TarEntry::symlink("link", &long_target),
            TarEntry::hardlink("hard", "link-target-file"),
            TarEntry::char_device("dev/null", 1, 3),
            TarEntry::block_device("dev/sda", 8, 0),
            TarEntry::fifo("pipe"),
            TarEntry::file("x", "attrs")
                .xattr("user.k", b"v\0bin")
                .xattr("security.capability", [1, 2, 3]),
            TarEntry::random_file("big", 3000, 5),
        ];
        let mut tar = Vec::new();
        write_tar(&mut tar, &entries, long_names).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let mut read: Vec<(Vec<u8>, EntryType, Vec<u8>)> = Vec::new();
        for (i, entry) in archive.entries().unwrap().enumerate() {
            let mut entry = entry.unwrap();
            let path = entry.path_bytes().into_owned();
            let kind = entry.header().entry_type();
            let expected = &entries[i];
            assert_eq!(path, expected.path, "entry {i}");
            assert_eq!(entry.header().mode().unwrap(), expected.mode, "entry {i}");
            assert_eq!(entry.header().uid().unwrap(), expected.uid, "entry {i}");
            assert_eq!(entry.header().mtime().unwrap(), expected.mtime, "entry {i}");
            if let EntryKind::Symlink(target) | EntryKind::Hardlink(target) = &expected.kind {
                assert_eq!(
                    entry.link_name_bytes().unwrap().as_ref(),
                    &target[..],
                    "entry {i}"
                );
            }
            if let EntryKind::CharDevice { major, minor }
            | EntryKind::BlockDevice { major, minor } = expected.kind
            {
                assert_eq!(entry.header().device_major().unwrap(), Some(major));
                assert_eq!(entry.header().device_minor().unwrap(), Some(minor));
            }
            let xattrs: Vec<(String, Vec<u8>)> = entry
                .pax_extensions()
                .unwrap()
                .map(|exts| {
                    exts.filter_map(Result::ok)
                        .filter_map(|e| {
                            let key = e.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_owned();
                            Some((key, e.value_bytes().to_vec()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(xattrs, expected.xattrs, "entry {i}");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            read.push((path, kind, data));
        }
        assert_eq!(read.len(), entries.len());
        assert_eq!(read[1].2, b"long content");
        assert_eq!(read[9].2, pseudo_random_bytes(5, 0, 3000));
        assert!(std::ffi::OsStr::from_bytes(&read[2].0).to_str().is_none());
        assert_eq!(read[5].1, EntryType::Char);
        assert_eq!(read[7].1, EntryType::Fifo);
    }

    #[test]
    fn gnu_archives_read_back_exactly() {
        roundtrip(LongNames::Gnu);
    }

    #[test]
    fn pax_archives_read_back_exactly() {
        roundtrip(LongNames::Pax);
    }

    /// GNU tar is an independent reader: it must list every entry with its
    /// full name and type.
    #[test]
    fn gnu_tar_reads_both_flavours() {
        if !crate::skip_unless(
            std::path::Path::new("/bin/tar").exists(),
            "GNU tar not installed",
        ) {
            return;
        }
        let long = format!("{}/file", "d".repeat(150));
        let entries = vec![
            TarEntry::file(&long, "long content"),
            TarEntry::symlink("link", "t".repeat(120)),
            TarEntry::char_device("null", 1, 3),
            TarEntry::file("x", "attrs").xattr("user.k", "v"),
        ];
        for long_names in [LongNames::Gnu, LongNames::Pax] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("layer.tar");
            let mut tar = Vec::new();
            write_tar(&mut tar, &entries, long_names).unwrap();
            std::fs::write(&path, &tar).unwrap();
            let output = std::process::Command::new("/bin/tar")
                .arg("-tvf")
                .arg(&path)
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{long_names:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                output.stderr.is_empty(),
                "{long_names:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let lines: Vec<&str> = listing.lines().collect();
            assert_eq!(lines.len(), 4, "{listing}");
            assert!(lines[0].ends_with(&long), "{listing}");
            assert!(
                lines[1].starts_with('l') && lines[1].ends_with(&"t".repeat(120)),
                "{listing}"
            );
            assert!(lines[2].starts_with('c'), "{listing}");
        }
    }

    #[test]
    fn hostile_names_are_written_verbatim() {
        let mut tar = Vec::new();
        write_tar(
            &mut tar,
            &[
                TarEntry::file("../../etc/passwd", "x"),
                TarEntry::file("/abs", "y"),
            ],
            LongNames::Gnu,
        )
        .unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<Vec<u8>> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(names, vec![b"../../etc/passwd".to_vec(), b"/abs".to_vec()]);
    }
}
