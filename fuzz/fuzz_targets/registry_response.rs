//! What a registry answers, parsed as Lode parses it: a manifest's media
//! type from its body (`registry::media_type_from_body`), a Lode image
//! manifest (`image::parse_lode_manifest`), an index as the converter and
//! `lodectl pull` read it (oci-spec's `ImageIndex`, platform matching,
//! descriptor digests), a 401's `WWW-Authenticate` challenge
//! (`registry::Challenge`), a bearer token answer (oci-client's
//! `RegistryToken`, what `RegistryClient` authenticates with) and an error
//! body (`registry::error_body_message`). Every parser sees every input.
//! Nothing may panic; an accepted Lode manifest lists only its own layers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lode_common::image::parse_lode_manifest;
use lode_common::registry::{error_body_message, media_type_from_body, Challenge, Reference};
use lode_common::Digest;
use lode_snapshotter::convert::PlatformSpec;
use oci_client::token_cache::RegistryToken;
use oci_spec::image::{ImageIndex, ImageManifest};

fuzz_target!(|data: &[u8]| {
    let _ = media_type_from_body(data);
    let _ = error_body_message(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Challenge::parse(text);
    }

    let reference: Reference = "reg.io/app:v1".parse().expect("a valid reference");
    let digest = Digest::of(data);
    if let Ok(lode) = parse_lode_manifest(&reference, digest, data) {
        let manifest: ImageManifest = serde_json::from_slice(data).expect("parsed once already");
        assert_eq!(lode.data_blobs.len() + 1, manifest.layers().len());
        assert_eq!(lode.manifest_digest, digest);
    }

    if let Ok(index) = serde_json::from_slice::<ImageIndex>(data) {
        let wanted = [
            PlatformSpec::default(),
            "linux/arm64".parse().expect("a valid platform"),
            "linux/arm/v7".parse().expect("a valid platform"),
        ];
        for descriptor in index.manifests() {
            let _ = descriptor.digest().to_string().parse::<Digest>();
            if let Some(platform) = descriptor.platform() {
                let _ = PlatformSpec::describe(platform);
                for spec in &wanted {
                    let _ = spec.matches(platform);
                }
            }
        }
    }

    if let Ok(token) = serde_json::from_slice::<RegistryToken>(data) {
        let _ = token.bearer_token();
    }
});
