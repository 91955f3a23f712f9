//! Metadata of one tar entry: permission bits, owner, mtime (with the PAX
//! record's nanoseconds), extended attributes from `SCHILY.xattr.*` records,
//! and device numbers.

use std::collections::BTreeMap;
use std::io::Read;

use lode_common::format::rules::xattr_problem;
use lode_common::format::Meta;

use super::error::EntryProblem;
use super::path::escape;

/// Largest major number Linux device numbers encode (12 bits).
const MAX_MAJOR: u32 = (1 << 12) - 1;
/// Largest minor number Linux device numbers encode (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
const PAX_MTIME: &[u8] = b"mtime";
const NSEC_DIGITS: usize = 9;

/// The metadata the image keeps of an entry.
pub(crate) fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryProblem> {
    let header = entry.header();
    let bad = |field| {
        move |e: std::io::Error| EntryProblem::BadHeader {
            field,
            message: e.to_string(),
        }
    };
    let perm = header.mode().map_err(bad("mode"))? & 0o7777;
    let uid = header.uid().map_err(bad("uid"))?;
    let gid = header.gid().map_err(bad("gid"))?;
    let mtime = header.mtime().map_err(bad("mtime"))?;
    let mut meta = Meta {
        perm,
        uid: u32::try_from(uid).map_err(|_| EntryProblem::IdOutOfRange {
            what: "uid",
            value: uid,
        })?,
        gid: u32::try_from(gid).map_err(|_| EntryProblem::IdOutOfRange {
            what: "gid",
            value: gid,
        })?,
        mtime_sec: i64::try_from(mtime).map_err(|_| EntryProblem::BadHeader {
            field: "mtime",
            message: format!("{mtime} is out of range"),
        })?,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    let Some(extensions) = entry.pax_extensions().map_err(bad("pax"))? else {
        return Ok(meta);
    };
    for extension in extensions {
        let extension = extension.map_err(bad("pax"))?;
        let key = extension.key_bytes();
        let value = extension.value_bytes();
        if key == PAX_MTIME {
            (meta.mtime_sec, meta.mtime_nsec) =
                parse_pax_time(value).ok_or_else(|| EntryProblem::BadHeader {
                    field: "pax mtime",
                    message: format!("\"{}\" is not a time", escape(value)),
                })?;
        } else if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
            if let Some(reason) = xattr_problem(name, value.len()) {
                return Err(EntryProblem::BadXattr {
                    name: escape(name),
                    reason,
                });
            }
            meta.xattrs.insert(name.to_vec(), value.to_vec());
        }
    }
    Ok(meta)
}

/// The device numbers of a character or block device entry.
pub(crate) fn device_numbers(header: &tar::Header) -> Result<(u32, u32), EntryProblem> {
    let field = |field, value: std::io::Result<Option<u32>>| {
        value
            .map_err(|e| EntryProblem::BadHeader {
                field,
                message: e.to_string(),
            })?
            .ok_or(EntryProblem::BadHeader {
                field,
                message: "missing (pre-POSIX header)".to_owned(),
            })
    };
    let major = field("devmajor", header.device_major())?;
    let minor = field("devminor", header.device_minor())?;
    if major > MAX_MAJOR || minor > MAX_MINOR {
        return Err(EntryProblem::DeviceNumber { major, minor });
    }
    Ok((major, minor))
}

/// Parses a PAX time (`[-]seconds[.fraction]`) into seconds and nanoseconds
/// (fraction digits past nanoseconds are dropped). Negative times are
/// normalised so that nanoseconds count forward from the seconds value.
pub(crate) fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let seconds: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = 0u32;
    for i in 0..NSEC_DIGITS {
        let digit = fraction
            .as_bytes()
            .get(i)
            .map_or(0, |b| u32::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    if !negative {
        return Some((seconds, nanos));
    }
    if nanos == 0 {
        Some((seconds.checked_neg()?, 0))
    } else {
        Some((
            seconds.checked_neg()?.checked_sub(1)?,
            1_000_000_000 - nanos,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.1234567891234"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time(b".5"), Some((0, 500_000_000)));
        for bad in [
            &b""[..],
            b".",
            b"-",
            b"1e9",
            b"1.2.3",
            b"\xff",
            b"+1",
            b" 1",
        ] {
            assert_eq!(parse_pax_time(bad), None, "{}", escape(bad));
        }
        assert_eq!(parse_pax_time(b"99999999999999999999"), None);
    }
}
