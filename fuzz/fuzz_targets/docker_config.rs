//! A docker `config.json` (`CredentialStore::parse`): `auths` entries with
//! base64 `auth` or user name and password, `credsStore`, `credHelpers`.
//! Nothing may panic, parsing or showing the store (`Debug`, what logs
//! show).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lode_common::registry::CredentialStore;

fuzz_target!(|data: &[u8]| {
    let Ok(store) = CredentialStore::parse(data, Path::new("/fuzz/config.json")) else {
        return;
    };
    // Lookups are not made: they run the configured credential helpers.
    let _ = format!("{store:?}");
});
