//! The text form of a prefetch list, as `lodectl daemon record` writes it
//! and `lodectl convert --prefetch-paths` reads it: one entry per line, in
//! the order to prefetch. An entry is a path inside the image (a whole
//! file, as in stargz's lists), or a path, a tab and a byte range
//! `START-END` (END excluded) of that file. A path may appear on several
//! lines. Empty lines and lines starting with `#` are ignored.
//!
//! A path that itself contains a tab keeps it: only a last field that reads
//! as a byte range is taken as one.

use std::io::Write;
use std::ops::Range;

/// One entry of a prefetch list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The file's path inside the image (raw bytes).
    pub path: Vec<u8>,
    /// The bytes of it to prefetch; the whole file if `None`.
    pub bytes: Option<Range<u64>>,
}

/// The entries of a list's text, in order.
pub fn parse(text: &[u8]) -> Vec<Listed> {
    text.split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
        .map(parse_line)
        .collect()
}

fn parse_line(line: &[u8]) -> Listed {
    let ranged = line
        .iter()
        .rposition(|&b| b == b'\t')
        .and_then(|tab| Some((&line[..tab], byte_range(&line[tab + 1..])?)))
        .filter(|(path, _)| !path.is_empty());
    match ranged {
        Some((path, bytes)) => Listed {
            path: path.to_vec(),
            bytes: Some(bytes),
        },
        None => Listed {
            path: line.to_vec(),
            bytes: None,
        },
    }
}

/// `START-END` with START < END.
fn byte_range(field: &[u8]) -> Option<Range<u64>> {
    let (start, end) = std::str::from_utf8(field).ok()?.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(start) || !digits(end) {
        return None;
    }
    let range = start.parse().ok()?..end.parse().ok()?;
    (!range.is_empty()).then_some(range)
}

/// Writes one entry as a line.
pub fn write_entry(
    out: &mut dyn Write,
    path: &str,
    bytes: Option<&Range<u64>>,
) -> std::io::Result<()> {
    match bytes {
        Some(r) => writeln!(out, "{path}\t{}-{}", r.start, r.end),
        None => writeln!(out, "{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(path: &[u8]) -> Listed {
        Listed {
            path: path.to_vec(),
            bytes: None,
        }
    }

    #[test]
    fn paths_and_ranges_parse_in_order() {
        let text = b"# comment\n/bin/sh\r\n\n/usr/lib/\xff\nlib/node\t0-1048576\nlib/node\t8388608-9437184\n";
        assert_eq!(
            parse(text),
            vec![
                whole(b"/bin/sh"),
                whole(b"/usr/lib/\xff"),
                Listed {
                    path: b"lib/node".to_vec(),
                    bytes: Some(0..1048576)
                },
                Listed {
                    path: b"lib/node".to_vec(),
                    bytes: Some(8388608..9437184)
                },
            ]
        );
    }

    #[test]
    fn a_tab_without_a_range_belongs_to_the_path() {
        for line in [
            &b"a\tb"[..],
            b"a\t5-5",
            b"a\t9-3",
            b"a\t-3",
            b"a\t1-",
            b"a\t+1-2",
            b"\t0-1",
            b"a\t1-99999999999999999999999",
        ] {
            assert_eq!(parse(line), vec![whole(line)], "{}", line.escape_ascii());
        }
        assert_eq!(
            parse(b"a\tb\t0-1"),
            vec![Listed {
                path: b"a\tb".to_vec(),
                bytes: Some(0..1)
            }]
        );
    }

    #[test]
    fn written_entries_read_back() {
        let mut text = Vec::new();
        write_entry(&mut text, "usr/bin/node", Some(&(4096..8192))).unwrap();
        write_entry(&mut text, "etc/hosts", None).unwrap();
        assert_eq!(
            parse(&text),
            vec![
                Listed {
                    path: b"usr/bin/node".to_vec(),
                    bytes: Some(4096..8192)
                },
                whole(b"etc/hosts"),
            ]
        );
    }
}
