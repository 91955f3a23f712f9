//! Open-time checks of the header and section table. After these pass,
//! every section is known to lie inside the file, so accessors only need to
//! check indices against section lengths.

use std::ops::Range;

use super::layout::{
    self, Header, Section, FLAG_BLAKE3_CHUNKS, HEADER_SIZE, MAGIC, OLDEST_READ_VERSION,
    SECTION_ALIGN, SECTION_COUNT, VERSION,
};
use super::reader::corrupt;
use super::rules::check_chunk_size;
use super::{ChunkHash, FormatError};

/// What the reader keeps from a header that passed its checks.
pub(super) struct CheckedHeader {
    pub version: u32,
    pub chunk_size: u32,
    pub checksum: u32,
    pub chunk_hash: ChunkHash,
    /// Byte range of each section, inside the file.
    pub sections: [Range<usize>; SECTION_COUNT],
}

/// Checks, in order: length, magic, version, recorded length, checksum (if
/// `check_crc`), flags, chunk size, reserved bytes, section table.
pub(super) fn check_header(bytes: &[u8], check_crc: bool) -> Result<CheckedHeader, FormatError> {
    let header_bytes: &[u8; HEADER_SIZE] = bytes
        .first_chunk()
        .ok_or_else(|| FormatError::Truncated(format!("{} bytes, no header", bytes.len())))?;
    let header = Header::decode(header_bytes);
    if header.magic != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if !(OLDEST_READ_VERSION..=VERSION).contains(&header.version) {
        return Err(FormatError::UnsupportedVersion(header.version));
    }
    let actual_len = bytes.len() as u64;
    if actual_len < header.file_len {
        return Err(FormatError::Truncated(format!(
            "{actual_len} bytes, header says {}",
            header.file_len
        )));
    }
    if actual_len > header.file_len {
        return Err(FormatError::Corrupt(format!(
            "{actual_len} bytes, header says {}: trailing garbage",
            header.file_len
        )));
    }
    if check_crc {
        let actual = layout::compute_checksum(bytes);
        if actual != header.checksum {
            return Err(FormatError::ChecksumMismatch {
                expected: header.checksum,
                actual,
            });
        }
    }
    if header.flags & !FLAG_BLAKE3_CHUNKS != 0 {
        return Err(corrupt(format!("unknown header flags {:#x}", header.flags)));
    }
    check_chunk_size(header.chunk_size)?;
    if !header.reserved_zero {
        return Err(corrupt("reserved header bytes are not zero".into()));
    }
    Ok(CheckedHeader {
        version: header.version,
        chunk_size: header.chunk_size,
        checksum: header.checksum,
        chunk_hash: ChunkHash::from_header_flags(header.flags),
        sections: check_sections(&header, bytes.len())?,
    })
}

/// Checks the section table against the file and returns each section's byte range.
fn check_sections(
    header: &Header,
    file_len: usize,
) -> Result<[Range<usize>; SECTION_COUNT], FormatError> {
    let mut ranges: [Range<usize>; SECTION_COUNT] = Default::default();
    for (s, (entry, range)) in Section::ALL
        .iter()
        .zip(header.sections.iter().zip(ranges.iter_mut()))
    {
        let bad = |msg: &str| {
            corrupt(format!(
                "section {} (offset {}, length {}): {msg}",
                s.name(),
                entry.offset,
                entry.length
            ))
        };
        if entry.offset < HEADER_SIZE as u64 {
            return Err(bad("overlaps the header"));
        }
        if entry.offset % SECTION_ALIGN as u64 != 0 {
            return Err(bad("not 8-byte aligned"));
        }
        if entry.length % s.record_size(header.version) as u64 != 0 {
            return Err(bad("length is not a multiple of the record size"));
        }
        let end = entry
            .offset
            .checked_add(entry.length)
            .filter(|&end| end <= file_len as u64)
            .ok_or_else(|| bad("extends past the end of the file"))?;
        // Both ends are <= file_len, which is a usize.
        *range = entry.offset as usize..end as usize;
    }
    // Empty sections occupy no bytes, so only non-empty ones can overlap.
    let mut sorted: Vec<(Section, &Range<usize>)> = Section::ALL
        .iter()
        .copied()
        .zip(ranges.iter())
        .filter(|(_, r)| !r.is_empty())
        .collect();
    sorted.sort_by_key(|(_, r)| r.start);
    for pair in sorted.windows(2) {
        if let [(a, ra), (b, rb)] = pair {
            if ra.end > rb.start {
                return Err(corrupt(format!(
                    "sections {} and {} overlap",
                    a.name(),
                    b.name()
                )));
            }
        }
    }
    Ok(ranges)
}
