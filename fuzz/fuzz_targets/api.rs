//! The daemon API's request parsing (lode-fsd `api/parse.rs`): the query
//! string (`lode_common::api::query::parse`) and the JSON body of `POST`
//! and `PUT /mount` (and of a predecessor's saved instance),
//! [`MountRequest`]. Nothing may panic; a query that parses has only
//! well-formed escapes and re-encodes to the same pairs, and a request
//! that parses serialises to JSON that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_common::api::{query, MountRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(pairs) = query::parse(text) {
            // Only `%` and two hex digits is an escape.
            let bytes = text.as_bytes();
            for (i, _) in text.match_indices('%') {
                let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
                assert!(
                    hex.len() == 2 && hex.iter().all(u8::is_ascii_hexdigit),
                    "bad escape at byte {i} of {text:?} accepted"
                );
            }
            let again: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", query::encode(k), query::encode(v)))
                .collect();
            assert_eq!(query::parse(&again.join("&")).as_ref(), Ok(&pairs));
        }
    }
    if let Ok(request) = serde_json::from_slice::<MountRequest>(data) {
        let json = serde_json::to_vec(&request).expect("a parsed request serialises");
        let back: MountRequest = serde_json::from_slice(&json).expect("and parses again");
        assert_eq!(back, request);
    }
});
