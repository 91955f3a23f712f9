//! Percent-encoding of query parameters, shared by the client (encoding) and
//! the server (decoding) so that paths with any byte survive the round trip.

use std::fmt::Write;

/// Encodes `value` for a query string: unreserved bytes and `/` as they are,
/// everything else as `%XX`.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("bad percent-escape in query parameter {0:?}")]
    Escape(String),
    #[error("query parameter {0:?} is not UTF-8 once decoded")]
    Utf8(String),
    #[error("query parameter {0:?} given twice")]
    Duplicate(String),
}

fn decode(raw: &str) -> Result<String, QueryError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                // Two hex digits exactly: `u8::from_str_radix` alone would
                // also take a sign (`%+1`).
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| QueryError::Escape(raw.chars().take(100).collect()))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::Utf8(raw.chars().take(100).collect()))
}

/// Decodes `a=1&b=2` into pairs; a key without `=` has an empty value.
pub fn parse(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let key = decode(k)?;
        if pairs.iter().any(|(seen, _)| *seen == key) {
            return Err(QueryError::Duplicate(key));
        }
        pairs.push((key, decode(v)?));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_escapes_and_rejects_bad_ones() {
        let pairs = parse("mountpoint=%2Fmnt%2Fa%20b&id=x").unwrap();
        assert_eq!(pairs[0], ("mountpoint".into(), "/mnt/a b".into()));
        assert_eq!(pairs[1], ("id".into(), "x".into()));
        assert!(matches!(parse("a=%zz"), Err(QueryError::Escape(_))));
        assert!(matches!(parse("a=%4"), Err(QueryError::Escape(_))));
        assert!(matches!(parse("a=%+1"), Err(QueryError::Escape(_))));
        assert!(matches!(parse("%+f=1"), Err(QueryError::Escape(_))));
        assert!(matches!(parse("a=%ff"), Err(QueryError::Utf8(_))));
        assert!(matches!(parse("a=1&a=2"), Err(QueryError::Duplicate(_))));
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(value in any::<String>()) {
            let query = format!("k={}", encode(&value));
            let pairs = parse(&query).unwrap();
            prop_assert_eq!(&pairs[0].1, &value);
        }

        #[test]
        fn parse_never_panics(query in any::<String>()) {
            let _ = parse(&query);
        }
    }
}
