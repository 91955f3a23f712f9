//! Reading `/proc/self/mountinfo`: which paths are mount points, and of what.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo (the fields Lode needs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// e.g. `fuse.lode`, `overlay`.
    pub fs_type: String,
    /// e.g. `lode`, `overlay`.
    pub source: String,
}

/// Parses mountinfo text. Lines that do not have the expected shape are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional...] - fstype source super_options
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let mount_point = unescape(fields.get(4)?);
    let separator = fields.iter().position(|f| *f == b"-")?;
    let fs_type = String::from_utf8_lossy(&unescape(fields.get(separator + 1)?)).into_owned();
    let source = String::from_utf8_lossy(&unescape(fields.get(separator + 2)?)).into_owned();
    Some(MountEntry {
        mount_point: PathBuf::from(std::ffi::OsStr::from_bytes(&mount_point)),
        fs_type,
        source,
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && field.len() - i >= 4 {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The current mounts of this process's mount namespace.
pub fn current() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read("/proc/self/mountinfo")?))
}

/// The topmost mount at exactly `path` (which should be absolute and
/// canonical), if any.
pub fn mount_at(path: &Path) -> std::io::Result<Option<MountEntry>> {
    Ok(current()?.into_iter().rev().find(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
36 22 0:45 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:20 - fuse.lode lode rw,user_id=0,group_id=0\n\
garbage line\n\
40 22 0:50 / /run/c rw - overlay overlay rw,lowerdir=/x\n";

    #[test]
    fn parses_fields_and_escapes() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(mounts[1].fs_type, "fuse.lode");
        assert_eq!(mounts[1].source, "lode");
        assert_eq!(mounts[2].fs_type, "overlay");
    }

    #[test]
    fn unescape_leaves_incomplete_escapes_alone() {
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"\\134x"), b"\\x");
        assert_eq!(unescape(b"\\999"), b"\\999");
    }

    #[test]
    fn finds_the_root_mount() {
        let root = mount_at(Path::new("/")).unwrap();
        assert!(root.is_some(), "/ is always a mount point");
    }
}
