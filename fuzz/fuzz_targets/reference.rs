//! Image references (`lode_common::registry::Reference`'s `FromStr`), as
//! given on command lines, in CRI pulls and in containerd labels. Nothing
//! may panic; a reference that parses displays as text that parses to the
//! same reference, and its accessors hold on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_common::registry::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(reference) = text.parse::<Reference>() else {
        return;
    };
    let shown = reference.to_string();
    let back: Reference = shown
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} parsed, but its display {shown:?} does not: {e}"));
    assert_eq!(back, reference, "{text:?} displays as {shown:?}");
    assert!(!reference.host().is_empty());
    let _ = reference.is_loopback();
    if let Some(digest) = reference.digest {
        let by_digest = reference.with_digest(digest);
        assert_eq!(
            by_digest.to_string().parse::<Reference>().ok(),
            Some(by_digest)
        );
    }
    let tagged = reference.with_tag("latest");
    assert_eq!(tagged.to_string().parse::<Reference>().ok(), Some(tagged));
});
