//! A prefetch list's text (`lodectl convert --prefetch-paths`,
//! `lode_snapshotter::convert::prefetch_list`). Nothing may panic; every
//! entry has a path, and a byte range only when it is not empty; an entry
//! written back reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_snapshotter::convert::prefetch_list::{parse, write_entry};

fuzz_target!(|data: &[u8]| {
    for entry in parse(data) {
        assert!(!entry.path.is_empty(), "{entry:?}");
        assert!(!entry.path.contains(&b'\n'), "{entry:?}");
        if let Some(bytes) = &entry.bytes {
            assert!(bytes.start < bytes.end, "{entry:?}");
        }
        let Ok(path) = std::str::from_utf8(&entry.path) else {
            continue;
        };
        if path.starts_with('#') || path.ends_with('\r') {
            // Such a line reads as a comment, or loses its '\r'.
            continue;
        }
        let mut line = Vec::new();
        write_entry(&mut line, path, entry.bytes.as_ref()).unwrap();
        assert_eq!(parse(&line), vec![entry.clone()], "{line:?}");
    }
});
