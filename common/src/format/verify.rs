//! Whole-bootstrap consistency check ([`Bootstrap::verify_all`]).
//!
//! The accessors check only what they touch; this walks everything once and
//! also checks the global invariants no single access can see: every inode is
//! reachable exactly as numbered, link counts, dense per-inode ranges, and the
//! chunk table's layout within each blob.

use std::collections::VecDeque;

use super::layout::{DirentRecord, RawBlob, Section, NSEC_PER_SEC};
use super::reader::{corrupt, kind_of};
use super::rules::{chunk_len_at, xattr_problem};
use super::{BlobIndex, Bootstrap, ChunkIndex, FormatError, Ino, InodeKind};

impl Bootstrap {
    /// Walks and checks every record (all inodes, entries, names, chunks,
    /// xattrs and cross references). Used by `lodectl` after writing and by the
    /// fuzz target; fsd relies on per-access checks instead.
    pub fn verify_all(&self) -> Result<(), FormatError> {
        self.verify_inodes()?;
        self.verify_tree()?;
        self.verify_chunks()?;
        self.verify_prefetch()
    }

    /// Per-inode checks, and that the dirent, file-chunk and xattr ranges of
    /// the inodes tile their tables in inode order.
    fn verify_inodes(&self) -> Result<(), FormatError> {
        let mut next_dirent = 0u64;
        let mut next_file_chunk = 0u64;
        let mut next_xattr = 0u64;
        for i in 0..self.inode_count() {
            let ino = Ino(i + 1);
            let rec = self.inode_record(ino)?;
            let kind = kind_of(ino, rec.mode)?;
            let bad = |msg: String| corrupt(format!("inode {}: {msg}", ino.0));
            if rec.mtime_nsec >= NSEC_PER_SEC {
                return Err(bad(format!("mtime nanoseconds {}", rec.mtime_nsec)));
            }

            expect_start(ino, "xattrs", rec.xattr_start, next_xattr)?;
            let xattrs = self.range_in(Section::Xattrs, rec.xattr_start, rec.xattr_count, ino)?;
            next_xattr = xattrs.end;
            let mut prev: Option<&[u8]> = None;
            for x in xattrs {
                let (name, value) = self.xattr_at(ino, x)?;
                if let Some(problem) = xattr_problem(name, value.len()) {
                    return Err(bad(problem.to_string()));
                }
                if prev.is_some_and(|p| p >= name) {
                    return Err(bad("xattrs are not sorted by name".into()));
                }
                prev = Some(name);
            }

            let has_rdev = rec.rdev_major != 0 || rec.rdev_minor != 0;
            let has_data = rec.data_start != 0 || rec.data_count != 0;
            match kind {
                InodeKind::Dir => {
                    if rec.size != 0 || has_rdev {
                        return Err(bad("directory with a size or device number".into()));
                    }
                    expect_start(ino, "dirents", rec.data_start, next_dirent)?;
                    next_dirent = self
                        .range_in(Section::Dirents, rec.data_start, rec.data_count, ino)?
                        .end;
                }
                InodeKind::File => {
                    if has_rdev {
                        return Err(bad("regular file with a device number".into()));
                    }
                    expect_start(ino, "file chunks", rec.data_start, next_file_chunk)?;
                    next_file_chunk = self
                        .range_in(Section::FileChunks, rec.data_start, rec.data_count, ino)?
                        .end;
                    for index in 0..self.file_chunk_count(ino)? {
                        let chunk = self.chunk(self.file_chunk(ino, index)?)?;
                        let want = chunk_len_at(rec.size, self.chunk_size(), u64::from(index));
                        if want != Some(u64::from(chunk.uncompressed_size)) {
                            return Err(bad(format!(
                                "chunk {index} holds {} bytes, the file needs {want:?}",
                                chunk.uncompressed_size
                            )));
                        }
                    }
                }
                InodeKind::Symlink => {
                    if has_rdev {
                        return Err(bad("symlink with a device number".into()));
                    }
                    self.symlink_target(ino)?;
                }
                InodeKind::CharDevice | InodeKind::BlockDevice => {
                    if rec.size != 0 || has_data {
                        return Err(bad("device with a size or data".into()));
                    }
                }
                InodeKind::Fifo | InodeKind::Socket => {
                    if rec.size != 0 || has_data || has_rdev {
                        return Err(bad("fifo/socket with a size, data or device number".into()));
                    }
                }
            }
        }
        expect_end("dirents", next_dirent, self.records(Section::Dirents))?;
        expect_end(
            "file chunks",
            next_file_chunk,
            self.records(Section::FileChunks),
        )?;
        expect_end("xattrs", next_xattr, self.records(Section::Xattrs))
    }

    /// Breadth-first walk from the root: entries sorted with valid names,
    /// inodes numbered in the order the walk first meets them (which also
    /// makes every inode reachable and every directory's parent precede it),
    /// each directory reached once with a matching parent, and link counts.
    fn verify_tree(&self) -> Result<(), FormatError> {
        let n = usize::try_from(self.inode_count())
            .map_err(|_| corrupt("inode table too large for this machine".into()))?;
        let mut entries_to = vec![0u32; n];
        let mut subdirs = vec![0u32; n];
        let mut next_new = 1u64;
        if self.inode_record(Ino::ROOT)?.parent != 0 {
            return Err(corrupt("root directory's parent is not itself".into()));
        }
        let mut queue = VecDeque::from([Ino::ROOT]);
        while let Some(dir) = queue.pop_front() {
            let rec = self.inode_record(dir)?;
            let range = self.range_in(Section::Dirents, rec.data_start, rec.data_count, dir)?;
            let mut prev: Option<&[u8]> = None;
            for d in range {
                let entry = self.dirent_at(dir, d)?;
                let raw = DirentRecord::decode(self.record(Section::Dirents, d)?);
                let bad = |msg: &str| {
                    corrupt(format!(
                        "directory {}: entry {:?}: {msg}",
                        dir.0,
                        String::from_utf8_lossy(entry.name)
                    ))
                };
                if raw.reserved != 0 {
                    return Err(bad("reserved field is not zero"));
                }
                if prev.is_some_and(|p| p >= entry.name) {
                    return Err(bad("entries are not sorted by name"));
                }
                prev = Some(entry.name);
                let child = entry.ino.0 - 1;
                if let Some(count) = usize::try_from(child)
                    .ok()
                    .and_then(|c| entries_to.get_mut(c))
                {
                    *count = count.saturating_add(1);
                }
                let child_rec = self.inode_record(entry.ino)?;
                let child_is_dir = kind_of(entry.ino, child_rec.mode)? == InodeKind::Dir;
                if child < next_new {
                    if child_is_dir {
                        return Err(bad("directory is reached twice"));
                    }
                    continue;
                }
                if child != next_new {
                    return Err(bad(&format!(
                        "inode {} is not numbered breadth-first (expected inode {})",
                        entry.ino.0,
                        next_new + 1
                    )));
                }
                next_new += 1;
                if child_is_dir {
                    if u64::from(child_rec.parent) != dir.0 - 1 {
                        return Err(bad("directory's parent field does not name its directory"));
                    }
                    if let Some(count) = usize::try_from(dir.0 - 1)
                        .ok()
                        .and_then(|d| subdirs.get_mut(d))
                    {
                        *count = count.saturating_add(1);
                    }
                    queue.push_back(entry.ino);
                }
            }
        }
        if next_new != self.inode_count() {
            return Err(corrupt(format!(
                "inode {} is not reachable from the root",
                next_new + 1
            )));
        }
        for (i, (&entries, &dirs)) in entries_to.iter().zip(&subdirs).enumerate() {
            let ino = Ino(i as u64 + 1);
            let rec = self.inode_record(ino)?;
            let want = if kind_of(ino, rec.mode)? == InodeKind::Dir {
                dirs.saturating_add(2)
            } else {
                entries
            };
            if rec.nlink != want {
                return Err(corrupt(format!(
                    "inode {}: nlink {} but expected {want}",
                    ino.0, rec.nlink
                )));
            }
        }
        Ok(())
    }

    /// Blobs tile the chunk table in order; within a blob chunks are sorted,
    /// disjoint and inside the blob, and uncompressed offsets add up.
    fn verify_chunks(&self) -> Result<(), FormatError> {
        let blobs = u32::try_from(self.records(Section::Blobs))
            .map_err(|_| corrupt("more blobs than 32-bit indices can name".into()))?;
        let chunks = u32::try_from(self.records(Section::Chunks))
            .map_err(|_| corrupt("more chunks than 32-bit indices can name".into()))?;
        let chunk_size = self.chunk_size();
        let mut next_chunk = 0u32;
        for b in 0..blobs {
            let blob = self.blob(BlobIndex(b))?;
            let bad = |msg: String| corrupt(format!("blob {b} ({}): {msg}", blob.digest));
            if RawBlob::decode(self.record(Section::Blobs, u64::from(b))?).reserved != 0 {
                return Err(bad("reserved field is not zero".into()));
            }
            if blob.first_chunk.0 != next_chunk {
                return Err(bad(format!(
                    "first chunk {} but the previous blob ends at {next_chunk}",
                    blob.first_chunk.0
                )));
            }
            // blob() checked first_chunk + chunk_count <= the chunk count.
            next_chunk = blob.first_chunk.0 + blob.chunk_count;
            let mut prev_end = 0u64;
            let mut sum = 0u64;
            for c in blob.first_chunk.0..next_chunk {
                let chunk = self.chunk(ChunkIndex(c))?;
                let bad = |msg: String| bad(format!("chunk {c}: {msg}"));
                if chunk.blob.0 != b {
                    return Err(bad(format!("belongs to blob {}", chunk.blob.0)));
                }
                if chunk.uncompressed_size == 0 || chunk.uncompressed_size > chunk_size {
                    return Err(bad(format!(
                        "uncompressed size {}",
                        chunk.uncompressed_size
                    )));
                }
                if chunk.compressed_size == 0
                    || (!chunk.compressed && chunk.compressed_size != chunk.uncompressed_size)
                {
                    return Err(bad(format!("stored size {}", chunk.compressed_size)));
                }
                let end = chunk
                    .compressed_offset
                    .checked_add(u64::from(chunk.compressed_size))
                    .filter(|&end| {
                        chunk.compressed_offset >= prev_end && end <= blob.compressed_size
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "stored range {}+{} overlaps its predecessor or leaves the blob",
                            chunk.compressed_offset, chunk.compressed_size
                        ))
                    })?;
                prev_end = end;
                if chunk.uncompressed_offset != sum {
                    return Err(bad(format!(
                        "uncompressed offset {}, expected {sum}",
                        chunk.uncompressed_offset
                    )));
                }
                sum += u64::from(chunk.uncompressed_size);
            }
            if sum != blob.uncompressed_size {
                return Err(bad(format!(
                    "uncompressed size {} but its chunks add up to {sum}",
                    blob.uncompressed_size
                )));
            }
        }
        if next_chunk != chunks {
            return Err(corrupt(format!(
                "chunks {next_chunk}.. belong to no blob ({chunks} chunks)"
            )));
        }
        Ok(())
    }

    /// Prefetch entries name chunks inside regular files
    /// ([`Bootstrap::prefetch_list`] checks each).
    fn verify_prefetch(&self) -> Result<(), FormatError> {
        self.prefetch_list().map(drop)
    }
}

fn expect_start(ino: Ino, what: &str, start: u32, expected: u64) -> Result<(), FormatError> {
    if u64::from(start) != expected {
        return Err(corrupt(format!(
            "inode {}: {what} start at {start}, expected {expected} (ranges must tile the table in inode order)",
            ino.0
        )));
    }
    Ok(())
}

fn expect_end(what: &str, end: u64, records: u64) -> Result<(), FormatError> {
    if end != records {
        return Err(corrupt(format!(
            "{what}: inodes use {end} records but the table has {records}"
        )));
    }
    Ok(())
}
