//! Entry names as raw bytes: splitting into components, refusing names that
//! could climb out of the image, and recognising whiteout markers.

use lode_common::format::rules::name_problem;

use super::error::EntryProblem;

/// Prefix of a whiteout entry (`dir/.wh.NAME` deletes `dir/NAME`).
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS bookkeeping entries (`.wh..wh.plnk` and friends) that carry
/// no filesystem content; the opaque marker is the one that means something.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// Marker making its directory opaque (lower layers' children are hidden).
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Splits an entry name into components. A leading `/`, `.` components and
/// empty components (`a//b`, a trailing `/`) are dropped, so `./a/b/` and
/// `/a/b` both give `[a, b]` and `./` gives the root (no components). A `..`
/// component is refused outright rather than resolved: resolving it is how a
/// layer would reach outside the image.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&[u8]>, EntryProblem> {
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(EntryProblem::DotDot),
            name => {
                if let Some(reason) = name_problem(name) {
                    return Err(EntryProblem::BadName {
                        component: escape(name),
                        reason,
                    });
                }
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// What the last component of an entry name says about the entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Marker<'a> {
    /// An ordinary name.
    None,
    /// `.wh.NAME`: delete `NAME` from the merged tree.
    Whiteout(&'a [u8]),
    /// `.wh..wh..opq`: hide lower layers' children of the parent directory.
    Opaque,
    /// Another `.wh..wh.*` name: AUFS bookkeeping, skipped.
    AufsMeta,
}

pub(crate) fn marker(name: &[u8]) -> Marker<'_> {
    if name == OPAQUE_MARKER {
        Marker::Opaque
    } else if name.starts_with(WHITEOUT_META_PREFIX) {
        Marker::AufsMeta
    } else if let Some(rest) = name.strip_prefix(WHITEOUT_PREFIX) {
        Marker::Whiteout(rest)
    } else {
        Marker::None
    }
}

/// Printable form of raw name bytes for messages and logs (non-UTF-8 and
/// control bytes escaped; never used for anything stored).
pub(crate) fn escape(raw: &[u8]) -> String {
    raw.escape_ascii().to_string()
}

/// `a/b/c` from components, for messages.
pub(crate) fn join(parts: &[&[u8]]) -> String {
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    escape(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_leading_slash_dot_and_empty_parts() {
        let expect: Vec<&[u8]> = vec![b"a", b"b"];
        for raw in [&b"a/b"[..], b"/a/b", b"./a/b/", b"a//./b", b"//a/b"] {
            assert_eq!(components(raw).unwrap(), expect, "{}", escape(raw));
        }
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"/").unwrap().is_empty());
    }

    #[test]
    fn refuses_dot_dot_anywhere() {
        for raw in [&b".."[..], b"../x", b"a/../b", b"/../etc/passwd", b"a/.."] {
            assert!(
                matches!(components(raw), Err(EntryProblem::DotDot)),
                "{}",
                escape(raw)
            );
        }
    }

    #[test]
    fn refuses_components_the_format_cannot_hold() {
        let long = vec![b'x'; 256];
        assert!(matches!(
            components(&long),
            Err(EntryProblem::BadName { .. })
        ));
        assert!(components(&[b'x'; 255]).is_ok());
        assert!(components(b"a\0b").is_err());
    }

    #[test]
    fn keeps_non_utf8_bytes() {
        assert_eq!(
            components(b"d/\xff\xfe").unwrap(),
            vec![&b"d"[..], b"\xff\xfe"]
        );
        assert_eq!(escape(b"\xff/a"), "\\xff/a");
    }

    #[test]
    fn recognises_markers() {
        assert_eq!(marker(b".wh.foo"), Marker::Whiteout(b"foo"));
        assert_eq!(marker(b".wh..wh..opq"), Marker::Opaque);
        assert_eq!(marker(b".wh..wh.plnk"), Marker::AufsMeta);
        assert_eq!(marker(b"foo.wh."), Marker::None);
        assert_eq!(marker(b".wh."), Marker::Whiteout(b""));
    }
}
