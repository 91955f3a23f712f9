//! Validity rules shared by the writer (which refuses bad input with
//! `Invalid`) and the reader (which reports bad content as `Corrupt`): chunk
//! size, names, symlink targets, xattrs, and how file sizes map to chunks.

use super::layout::{MAX_NAME_LEN, MAX_SYMLINK_LEN, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN};
use super::{FormatError, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Whether `size` is an acceptable chunk size.
pub fn check_chunk_size(size: u32) -> Result<(), FormatError> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(FormatError::InvalidChunkSize(size))
    }
}

/// Why `name` cannot be a directory entry name, if it cannot.
pub fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name.len() > MAX_NAME_LEN {
        Some("name longer than 255 bytes")
    } else if name == b"." || name == b".." {
        Some("name is . or ..")
    } else if name.contains(&b'/') {
        Some("name contains '/'")
    } else if name.contains(&0) {
        Some("name contains NUL")
    } else {
        None
    }
}

/// Why `target` cannot be a symlink target, if it cannot.
pub fn symlink_problem(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("empty symlink target")
    } else if target.len() > MAX_SYMLINK_LEN {
        Some("symlink target longer than 4095 bytes")
    } else if target.contains(&0) {
        Some("symlink target contains NUL")
    } else {
        None
    }
}

/// Why `name`/`value` cannot be an extended attribute, if they cannot.
pub fn xattr_problem(name: &[u8], value_len: usize) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty xattr name")
    } else if name.len() > MAX_XATTR_NAME_LEN {
        Some("xattr name longer than 255 bytes")
    } else if name.contains(&0) {
        Some("xattr name contains NUL")
    } else if value_len > MAX_XATTR_VALUE_LEN {
        Some("xattr value longer than 64 KiB")
    } else {
        None
    }
}

/// Number of chunks a file of `size` bytes has.
pub fn chunks_for_size(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// Bytes of a file of `size` bytes covered by its chunk `index`, or `None`
/// past the end.
pub fn chunk_len_at(size: u64, chunk_size: u32, index: u64) -> Option<u64> {
    let cs = u64::from(chunk_size);
    let start = index.checked_mul(cs)?;
    if start >= size {
        return None;
    }
    Some((size - start).min(cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(name_problem(b"ok\xff"), None);
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0", &[b'x'; 256]] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(name_problem(&[b'x'; 255]), None);
        assert!(symlink_problem(b"").is_some());
        assert!(symlink_problem(&[b'a'; 4096]).is_some());
        assert_eq!(symlink_problem(b"../x"), None);
        assert!(xattr_problem(b"", 0).is_some());
        assert!(xattr_problem(b"user.a", MAX_XATTR_VALUE_LEN + 1).is_some());
        assert_eq!(xattr_problem(b"user.a", 3), None);
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunks_for_size(0, 65536), 0);
        assert_eq!(chunks_for_size(1, 65536), 1);
        assert_eq!(chunks_for_size(65536, 65536), 1);
        assert_eq!(chunks_for_size(65537, 65536), 2);
        assert_eq!(chunk_len_at(65537, 65536, 1), Some(1));
        assert_eq!(chunk_len_at(65537, 65536, 2), None);
        assert_eq!(chunk_len_at(u64::MAX, 65536, u64::MAX), None);
        assert!(check_chunk_size(65536).is_ok());
        assert!(check_chunk_size(65535).is_err());
        assert!(check_chunk_size(32 << 20).is_err());
    }
}
