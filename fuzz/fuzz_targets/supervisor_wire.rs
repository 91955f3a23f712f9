//! Supervisor frames (`lode_common::supervisor::wire::decode`): magic,
//! length, JSON message. Nothing may panic; a frame that decodes encodes
//! back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_common::supervisor::wire::{decode, encode, MAX_BODY};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = decode(data) else {
        return;
    };
    // Re-encoding may write fields the frame left out (`null` options), so
    // only a frame well under the limit must re-encode.
    match encode(&message) {
        Ok(frame) => assert_eq!(decode(&frame).ok().as_ref(), Some(&message)),
        Err(e) => assert!(
            data.len() > MAX_BODY / 2,
            "{message:?} does not re-encode: {e}"
        ),
    }
});
