//! Reading Lode images from a registry: recognising a Lode manifest and
//! fetching its bootstrap (used by `lodectl mount` and the snapshotter).

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageManifest};

use crate::format::{Bootstrap, FormatError};
use crate::oci;
use crate::registry::{Reference, RegistryClient, RegistryError};
use crate::Digest;

/// Largest bootstrap accepted from a registry (decompressed). A bootstrap of a
/// million files stays well below this; the bound keeps a hostile layer from
/// filling the disk.
pub const MAX_BOOTSTRAP_SIZE: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{reference}: manifest is not valid JSON of an OCI image manifest: {message}")]
    BadManifest { reference: String, message: String },
    #[error("{reference}: not a Lode image (no layer annotated {annotation}=true)", annotation = oci::ANNOTATION_BOOTSTRAP)]
    NotLode { reference: String },
    #[error("{reference}: {message}")]
    BadLayer { reference: String, message: String },
    #[error("bootstrap layer {digest}: {message}")]
    BadBootstrapLayer { digest: Digest, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The parts of a Lode image manifest that consumers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LodeManifest {
    pub manifest_digest: Digest,
    /// The data blob layers, in order (their order is the blob table's order).
    pub data_blobs: Vec<Digest>,
    pub bootstrap: Digest,
    /// The fronts of data blobs that hold the prefetch list's chunks
    /// ([`oci::ANNOTATION_PREFETCH_FRONT`]), in layer order.
    pub fronts: Vec<BlobFront>,
}

/// The front of a data blob that holds chunks of the image's prefetch list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobFront {
    pub digest: Digest,
    /// The whole blob's size, from its descriptor.
    pub size: u64,
    /// How many bytes from its start hold listed chunks; at most `size`.
    pub bytes: u64,
}

/// Whether a layer descriptor is a Lode data blob.
pub fn is_data_blob(layer: &Descriptor) -> bool {
    has_true_annotation(layer, oci::ANNOTATION_DATA_BLOB)
}

/// Whether a layer descriptor is a Lode bootstrap.
pub fn is_bootstrap(layer: &Descriptor) -> bool {
    has_true_annotation(layer, oci::ANNOTATION_BOOTSTRAP)
}

fn has_true_annotation(layer: &Descriptor, key: &str) -> bool {
    layer
        .annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .is_some_and(|v| v == "true")
}

/// A data blob's [`oci::ANNOTATION_PREFETCH_FRONT`], if it has a non-empty one.
fn prefetch_front(reference: &Reference, layer: &Descriptor) -> Result<Option<u64>, ImageError> {
    let Some(value) = layer
        .annotations()
        .as_ref()
        .and_then(|a| a.get(oci::ANNOTATION_PREFETCH_FRONT))
    else {
        return Ok(None);
    };
    let bad = |why: &str| ImageError::BadLayer {
        reference: reference.to_string(),
        message: format!(
            "layer {}: annotation {}={:?} {why}",
            layer.digest(),
            oci::ANNOTATION_PREFETCH_FRONT,
            value.chars().take(40).collect::<String>()
        ),
    };
    let bytes: u64 = value.parse().map_err(|_| bad("is not a byte count"))?;
    if bytes > layer.size() {
        return Err(bad("is larger than the layer"));
    }
    Ok((bytes > 0).then_some(bytes))
}

/// Interprets manifest bytes as a Lode image manifest.
pub fn parse_lode_manifest(
    reference: &Reference,
    manifest_digest: Digest,
    bytes: &[u8],
) -> Result<LodeManifest, ImageError> {
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| ImageError::BadManifest {
            reference: reference.to_string(),
            message: e.to_string(),
        })?;
    let layer_digest = |layer: &Descriptor| -> Result<Digest, ImageError> {
        layer
            .digest()
            .to_string()
            .parse()
            .map_err(|e: crate::digest::DigestParseError| ImageError::BadLayer {
                reference: reference.to_string(),
                message: e.to_string(),
            })
    };
    let layers = manifest.layers();
    let Some((last, data)) = layers.split_last() else {
        return Err(ImageError::NotLode {
            reference: reference.to_string(),
        });
    };
    if !is_bootstrap(last) {
        return Err(ImageError::NotLode {
            reference: reference.to_string(),
        });
    }
    let mut data_blobs = Vec::with_capacity(data.len());
    let mut fronts = Vec::new();
    for layer in data {
        if !is_data_blob(layer) {
            return Err(ImageError::BadLayer {
                reference: reference.to_string(),
                message: format!(
                    "layer {} precedes the bootstrap but is not a Lode data blob",
                    layer.digest()
                ),
            });
        }
        let digest = layer_digest(layer)?;
        if let Some(bytes) = prefetch_front(reference, layer)? {
            fronts.push(BlobFront {
                digest,
                size: layer.size(),
                bytes,
            });
        }
        data_blobs.push(digest);
    }
    Ok(LodeManifest {
        manifest_digest,
        data_blobs,
        bootstrap: layer_digest(last)?,
        fronts,
    })
}

/// Resolves `reference` to a Lode manifest.
pub async fn resolve(
    client: &RegistryClient,
    reference: &Reference,
) -> Result<LodeManifest, ImageError> {
    let raw = client.pull_manifest(reference).await?;
    if raw.media_type != oci::MEDIA_TYPE_OCI_MANIFEST {
        return Err(ImageError::NotLode {
            reference: reference.to_string(),
        });
    }
    parse_lode_manifest(reference, raw.digest, &raw.bytes)
}

/// Fetches the bootstrap of `image` into `dir` as `<bootstrap digest hex>`
/// (reusing a copy that is already there and opens cleanly) and returns its path.
/// The file appears atomically: it is extracted to a temporary name, checked,
/// and renamed.
pub async fn fetch_bootstrap(
    client: &RegistryClient,
    reference: &Reference,
    image: &LodeManifest,
    dir: &Path,
) -> Result<PathBuf, ImageError> {
    let dest = dir.join(image.bootstrap.hex());
    if dest.exists() && Bootstrap::open(&dest).is_ok() {
        return Ok(dest);
    }
    let tmp = download_bootstrap(client, reference, image.bootstrap, dir).await?;
    tmp.persist(&dest).map_err(|e| io_error(&dest)(e.error))?;
    Ok(dest)
}

/// Fetches bootstrap `digest` into a file of its own in `dir`, named
/// `<digest hex>.<random>`, and returns its path: a file no other fetch
/// made, so its owner may remove it without disturbing anyone else's.
pub async fn fetch_bootstrap_anew(
    client: &RegistryClient,
    reference: &Reference,
    digest: Digest,
    dir: &Path,
) -> Result<PathBuf, ImageError> {
    let tmp = download_bootstrap(client, reference, digest, dir).await?;
    let (_, path) = tmp.keep().map_err(|e| io_error(dir)(e.error))?;
    Ok(path)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.display().to_string();
    move |source| ImageError::Io { path, source }
}

/// Downloads bootstrap `digest` and extracts it into a new temporary file
/// in `dir` (`<digest hex>.<random>`), checked to open as a bootstrap.
async fn download_bootstrap(
    client: &RegistryClient,
    reference: &Reference,
    digest: Digest,
    dir: &Path,
) -> Result<tempfile::NamedTempFile, ImageError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let layer = client.pull_blob(reference, &digest).await?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{}.", digest.hex()))
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    let tmp_path = tmp.path().to_path_buf();
    let tmp = tokio::task::spawn_blocking(move || {
        extract_bootstrap(&layer, digest, tmp.as_file()).map(|()| tmp)
    })
    .await
    .map_err(|e| ImageError::BadBootstrapLayer {
        digest,
        message: format!("extraction task failed: {e}"),
    })??;
    Bootstrap::open(&tmp_path)?;
    Ok(tmp)
}

/// Copies the bootstrap file out of a bootstrap layer (a gzip tar) into `out`.
pub fn extract_bootstrap(
    layer: &[u8],
    digest: Digest,
    mut out: &std::fs::File,
) -> Result<(), ImageError> {
    let bad = |message: String| ImageError::BadBootstrapLayer { digest, message };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path_bytes();
        if path.as_ref() != oci::BOOTSTRAP_TAR_PATH.as_bytes() {
            continue;
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!(
                "{} is not a regular file",
                oci::BOOTSTRAP_TAR_PATH
            )));
        }
        let copied = std::io::copy(&mut entry.take(MAX_BOOTSTRAP_SIZE + 1), &mut out)
            .map_err(|e| bad(e.to_string()))?;
        if copied > MAX_BOOTSTRAP_SIZE {
            return Err(bad(format!(
                "bootstrap is larger than {MAX_BOOTSTRAP_SIZE} bytes"
            )));
        }
        out.sync_all().map_err(|e| bad(e.to_string()))?;
        return Ok(());
    }
    Err(bad(format!("layer holds no {}", oci::BOOTSTRAP_TAR_PATH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Reference {
        "127.0.0.1:5000/app:v1".parse().unwrap()
    }

    fn layer(media: &str, digest: &Digest, annotation: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": media, "digest": digest.to_string(), "size": 10,
            "annotations": { annotation: "true" }
        })
    }

    fn manifest(layers: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": oci::MEDIA_TYPE_OCI_CONFIG,
                       "digest": Digest::of(b"c").to_string(), "size": 1},
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn recognises_lode_manifest() {
        let (a, b, boot) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"boot"));
        let bytes = manifest(vec![
            layer(oci::MEDIA_TYPE_DATA_BLOB, &a, oci::ANNOTATION_DATA_BLOB),
            layer(oci::MEDIA_TYPE_DATA_BLOB, &b, oci::ANNOTATION_DATA_BLOB),
            layer(oci::MEDIA_TYPE_BOOTSTRAP, &boot, oci::ANNOTATION_BOOTSTRAP),
        ]);
        let parsed = parse_lode_manifest(&reference(), Digest::of(&bytes), &bytes).unwrap();
        assert_eq!(parsed.data_blobs, vec![a, b]);
        assert_eq!(parsed.bootstrap, boot);
    }

    #[test]
    fn reads_the_prefetch_fronts_of_data_blobs() {
        let (a, b, boot) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"boot"));
        let with_front = |digest: &Digest, front: &str| {
            let mut l = layer(oci::MEDIA_TYPE_DATA_BLOB, digest, oci::ANNOTATION_DATA_BLOB);
            l["annotations"][oci::ANNOTATION_PREFETCH_FRONT] = front.into();
            l
        };
        let bytes = manifest(vec![
            with_front(&a, "7"),
            with_front(&b, "0"),
            layer(oci::MEDIA_TYPE_BOOTSTRAP, &boot, oci::ANNOTATION_BOOTSTRAP),
        ]);
        let parsed = parse_lode_manifest(&reference(), Digest::of(&bytes), &bytes).unwrap();
        let front = BlobFront {
            digest: a,
            size: 10,
            bytes: 7,
        };
        assert_eq!(parsed.fronts, vec![front], "an empty front is none");
        for bad in ["11", "-1", "x", ""] {
            let bytes = manifest(vec![
                with_front(&a, bad),
                layer(oci::MEDIA_TYPE_BOOTSTRAP, &boot, oci::ANNOTATION_BOOTSTRAP),
            ]);
            let err = parse_lode_manifest(&reference(), a, &bytes).unwrap_err();
            assert!(
                err.to_string().contains(oci::ANNOTATION_PREFETCH_FRONT),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn refuses_plain_and_malformed_manifests() {
        let a = Digest::of(b"a");
        let plain = manifest(vec![layer(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &a,
            "x",
        )]);
        assert!(matches!(
            parse_lode_manifest(&reference(), a, &plain),
            Err(ImageError::NotLode { .. })
        ));
        let stray = manifest(vec![
            layer("application/vnd.oci.image.layer.v1.tar", &a, "x"),
            layer(oci::MEDIA_TYPE_BOOTSTRAP, &a, oci::ANNOTATION_BOOTSTRAP),
        ]);
        assert!(matches!(
            parse_lode_manifest(&reference(), a, &stray),
            Err(ImageError::BadLayer { .. })
        ));
        for junk in [&b""[..], b"{", b"[]", b"{\"layers\": 5}"] {
            assert!(matches!(
                parse_lode_manifest(&reference(), a, junk),
                Err(ImageError::BadManifest { .. })
            ));
        }
    }

    fn gzip_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn extracts_the_bootstrap_entry_only() {
        let layer = gzip_tar(&[("other", b"nope"), (oci::BOOTSTRAP_TAR_PATH, b"BOOT")]);
        let out = tempfile::tempfile().unwrap();
        extract_bootstrap(&layer, Digest::of(&layer), &out).unwrap();
        let mut text = String::new();
        let mut reader = &out;
        std::io::Seek::rewind(&mut reader).unwrap();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "BOOT");
    }

    #[test]
    fn reports_missing_or_garbled_bootstrap_layers() {
        let out = tempfile::tempfile().unwrap();
        let without = gzip_tar(&[("other", b"x")]);
        let err = extract_bootstrap(&without, Digest::of(b"x"), &out).unwrap_err();
        assert!(err.to_string().contains("holds no lode/bootstrap"), "{err}");
        assert!(extract_bootstrap(b"not gzip at all", Digest::of(b"y"), &out).is_err());
    }
}
