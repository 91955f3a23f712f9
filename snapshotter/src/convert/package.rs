//! Packages a converted image as OCI: the bootstrap layer (a gzip tar
//! holding `lode/bootstrap`), the config with the new `diff_ids`, and the
//! manifest (see docs/format.md, "OCI packaging").

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use lode_common::digest::Hasher;
use lode_common::oci;
use lode_common::Digest;
use oci_spec::image::{Descriptor, ImageManifestBuilder, MediaType};
use serde_json::{json, Value};
use tracing::warn;

use super::chunks::LayerBlob;
use super::error::ConvertError;

/// The bootstrap layer blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapLayer {
    pub path: PathBuf,
    /// Digest of the gzip blob (the layer digest).
    pub digest: Digest,
    pub size: u64,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
}

/// Writes `bootstrap` as a gzip tar holding [`oci::BOOTSTRAP_TAR_PATH`] to
/// `path`. Timestamps and owners are fixed so the same bootstrap always gives
/// the same layer digest.
pub fn write_bootstrap_layer(
    bootstrap: &[u8],
    path: &Path,
) -> Result<BootstrapLayer, ConvertError> {
    let io_err = || ConvertError::io(format!("write bootstrap layer {}", path.display()));
    let file = File::create(path).map_err(io_err())?;
    let blob_side = Tee {
        inner: BufWriter::new(file),
        hasher: Hasher::new(),
        bytes: 0,
    };
    let gzip = flate2::GzBuilder::new()
        .mtime(0)
        .write(blob_side, flate2::Compression::default());
    let mut tar_side = Tee {
        inner: gzip,
        hasher: Hasher::new(),
        bytes: 0,
    };
    {
        let mut builder = tar::Builder::new(&mut tar_side);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(bootstrap.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder
            .append_data(&mut header, oci::BOOTSTRAP_TAR_PATH, bootstrap)
            .map_err(io_err())?;
        builder.finish().map_err(io_err())?;
    }
    let diff_id = tar_side.hasher.finish();
    let mut blob_side = tar_side.inner.finish().map_err(io_err())?;
    blob_side.inner.flush().map_err(io_err())?;
    Ok(BootstrapLayer {
        path: path.to_path_buf(),
        digest: blob_side.hasher.finish(),
        size: blob_side.bytes,
        diff_id,
    })
}

/// Hashes and counts what is written through it.
struct Tee<W> {
    inner: W,
    hasher: Hasher,
    bytes: u64,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The Lode image's config: the source config with `rootfs.diff_ids`
/// replaced by the data blob digests and the bootstrap tar's digest.
///
/// `blob_of_layer[i]` is the data blob source layer `i` produced (layers
/// whose content was all deduplicated produce none). History entries are kept
/// consistent with the new layers: a source layer without a blob becomes an
/// `empty_layer` entry, and one entry is appended for the bootstrap. History
/// that did not match the source layers in the first place is dropped.
pub fn lode_config(
    image: &str,
    source_config: &[u8],
    blob_of_layer: &[Option<Digest>],
    bootstrap_diff_id: Digest,
) -> Result<Vec<u8>, ConvertError> {
    let bad = |message: String| ConvertError::BadImage {
        image: image.to_owned(),
        message,
    };
    let mut config: Value =
        serde_json::from_slice(source_config).map_err(|e| bad(format!("config: {e}")))?;
    let Some(object) = config.as_object_mut() else {
        return Err(bad("config is not a JSON object".to_owned()));
    };
    let source_diff_ids = object
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if source_diff_ids != blob_of_layer.len() {
        return Err(bad(format!(
            "config lists {source_diff_ids} diff_ids for {} layers",
            blob_of_layer.len()
        )));
    }
    let mut diff_ids: Vec<Value> = blob_of_layer
        .iter()
        .flatten()
        .map(|d| Value::String(d.to_string()))
        .collect();
    diff_ids.push(Value::String(bootstrap_diff_id.to_string()));
    object.insert(
        "rootfs".to_owned(),
        json!({ "type": "layers", "diff_ids": diff_ids }),
    );

    if let Some(history) = object.get_mut("history") {
        let entries = history.as_array_mut().filter(|entries| {
            entries.iter().filter(|e| !is_empty_layer(e)).count() == blob_of_layer.len()
        });
        match entries {
            Some(entries) => {
                let layer_entries = entries.iter_mut().filter(|e| !is_empty_layer(e));
                for (entry, blob) in layer_entries.zip(blob_of_layer) {
                    if blob.is_none() {
                        if let Some(fields) = entry.as_object_mut() {
                            fields.insert("empty_layer".to_owned(), Value::Bool(true));
                        }
                    }
                }
                entries.push(json!({
                    "created_by": "lodectl convert",
                    "comment": "Lode bootstrap",
                }));
            }
            None => {
                warn!(
                    image,
                    "source history does not match its layers; dropping it"
                );
                object.remove("history");
            }
        }
    }
    serde_json::to_vec(&canonical(config)).map_err(|e| bad(format!("config: {e}")))
}

fn is_empty_layer(entry: &Value) -> bool {
    entry.get("empty_layer").and_then(Value::as_bool) == Some(true)
}

/// The Lode image manifest.
pub fn lode_manifest(
    config: &[u8],
    blobs: &[LayerBlob],
    bootstrap: &BootstrapLayer,
    source_manifest: Digest,
) -> Result<Vec<u8>, ConvertError> {
    let invalid =
        |e: &dyn std::fmt::Display| ConvertError::Task(format!("building the manifest: {e}"));
    let descriptor = |media_type: &str, size: u64, digest: Digest| {
        let digest: oci_spec::image::Digest =
            digest.to_string().parse().map_err(|e| invalid(&e))?;
        Ok::<_, ConvertError>(Descriptor::new(MediaType::from(media_type), size, digest))
    };
    // Each layer says what it is and its diff_id.
    let layer = |media_type: &str, size: u64, digest: Digest, kind: &str, diff_id: Digest| {
        let mut d = descriptor(media_type, size, digest)?;
        d.set_annotations(Some(HashMap::from([
            (kind.to_owned(), "true".to_owned()),
            (oci::ANNOTATION_UNCOMPRESSED.to_owned(), diff_id.to_string()),
        ])));
        Ok::<_, ConvertError>(d)
    };
    let mut layers = Vec::with_capacity(blobs.len() + 1);
    for blob in blobs {
        // A data blob is its own uncompressed content (see `lode_config`).
        let mut d = layer(
            oci::MEDIA_TYPE_DATA_BLOB,
            blob.size,
            blob.digest,
            oci::ANNOTATION_DATA_BLOB,
            blob.digest,
        )?;
        if blob.prefetch_front > 0 {
            let mut annotations = d.annotations().clone().unwrap_or_default();
            annotations.insert(
                oci::ANNOTATION_PREFETCH_FRONT.to_owned(),
                blob.prefetch_front.to_string(),
            );
            d.set_annotations(Some(annotations));
        }
        layers.push(d);
    }
    layers.push(layer(
        oci::MEDIA_TYPE_BOOTSTRAP,
        bootstrap.size,
        bootstrap.digest,
        oci::ANNOTATION_BOOTSTRAP,
        bootstrap.diff_id,
    )?);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(
            oci::MEDIA_TYPE_OCI_CONFIG,
            config.len() as u64,
            Digest::of(config),
        )?)
        .layers(layers)
        .annotations(HashMap::from([
            (
                oci::ANNOTATION_FORMAT_VERSION.to_owned(),
                lode_common::format::layout::VERSION.to_string(),
            ),
            (
                oci::ANNOTATION_SOURCE_DIGEST.to_owned(),
                source_manifest.to_string(),
            ),
        ]))
        .build()
        .map_err(|e| invalid(&e))?;
    let value = serde_json::to_value(&manifest).map_err(|e| invalid(&e))?;
    serde_json::to_vec(&canonical(value)).map_err(|e| invalid(&e))
}

/// `value` with object keys sorted, so that documents built from hash maps
/// serialise to the same bytes (and digest) every time.
fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn source_config(history: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb", "sha256:cc"]},
            "history": history,
            "x-unknown": {"kept": true},
        }))
        .unwrap()
    }

    #[test]
    fn config_gets_new_diff_ids_and_consistent_history() {
        let (a, c, boot) = (Digest::of(b"a"), Digest::of(b"c"), Digest::of(b"boot"));
        let history = json!([
            {"created_by": "FROM scratch", "empty_layer": true},
            {"created_by": "ADD a"},
            {"created_by": "ADD b"},
            {"created_by": "ENV A=1", "empty_layer": true},
            {"created_by": "ADD c"},
        ]);
        let out = lode_config(
            "img",
            &source_config(history),
            &[Some(a), None, Some(c)],
            boot,
        )
        .unwrap();
        let config: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([a.to_string(), c.to_string(), boot.to_string()])
        );
        assert_eq!(config["config"]["Env"], json!(["A=1"]));
        assert_eq!(config["x-unknown"], json!({"kept": true}));
        let history = config["history"].as_array().unwrap();
        assert_eq!(history.len(), 6);
        assert_eq!(
            history[2]["empty_layer"],
            json!(true),
            "ADD b stored nothing"
        );
        let non_empty = history.iter().filter(|e| !is_empty_layer(e)).count();
        assert_eq!(non_empty, 3, "one history entry per layer");
    }

    #[test]
    fn mismatched_history_is_dropped_and_mismatched_rootfs_refused() {
        let d = Digest::of(b"d");
        let out = lode_config(
            "img",
            &source_config(json!([{"created_by": "only one"}])),
            &[Some(d), Some(d), Some(d)],
            d,
        )
        .unwrap();
        let config: Value = serde_json::from_slice(&out).unwrap();
        assert!(config.get("history").is_none());

        let err = lode_config("img", &source_config(json!([])), &[Some(d)], d).unwrap_err();
        assert!(err.to_string().contains("3 diff_ids for 1 layers"), "{err}");
        assert!(lode_config("img", b"[1]", &[], d).is_err());
    }

    #[test]
    fn bootstrap_layer_holds_the_bootstrap_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"LODEBST\0 pretend bootstrap".repeat(100);
        let one = write_bootstrap_layer(&data, &dir.path().join("one")).unwrap();
        let two = write_bootstrap_layer(&data, &dir.path().join("two")).unwrap();
        assert_eq!(one.digest, two.digest);
        let bytes = std::fs::read(&one.path).unwrap();
        assert_eq!(Digest::of(&bytes), one.digest);
        assert_eq!(bytes.len() as u64, one.size);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(Digest::of(&tar), one.diff_id);
        let out = tempfile::tempfile().unwrap();
        lode_common::image::extract_bootstrap(&bytes, one.digest, &out).unwrap();
        let mut extracted = Vec::new();
        let mut reader = &out;
        std::io::Seek::rewind(&mut reader).unwrap();
        reader.read_to_end(&mut extracted).unwrap();
        assert_eq!(extracted, data);
    }

    #[test]
    fn manifest_is_a_lode_manifest_with_stable_bytes() {
        let blob = LayerBlob {
            path: "/x".into(),
            digest: Digest::of(b"blob"),
            size: 10,
            prefetch_front: 0,
        };
        let boot = BootstrapLayer {
            path: "/y".into(),
            digest: Digest::of(b"boot"),
            size: 20,
            diff_id: Digest::of(b"tar"),
        };
        let source = Digest::of(b"source");
        let bytes = lode_manifest(b"{}", std::slice::from_ref(&blob), &boot, source).unwrap();
        for _ in 0..5 {
            assert_eq!(
                lode_manifest(b"{}", std::slice::from_ref(&blob), &boot, source).unwrap(),
                bytes
            );
        }
        let reference = "127.0.0.1:5000/x:y".parse().unwrap();
        let parsed =
            lode_common::image::parse_lode_manifest(&reference, Digest::of(&bytes), &bytes)
                .unwrap();
        assert_eq!(parsed.data_blobs, vec![blob.digest]);
        assert_eq!(parsed.bootstrap, boot.digest);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["annotations"][oci::ANNOTATION_FORMAT_VERSION], "2");
        assert_eq!(
            value["annotations"][oci::ANNOTATION_SOURCE_DIGEST],
            source.to_string()
        );
        assert_eq!(value["layers"][0]["mediaType"], oci::MEDIA_TYPE_DATA_BLOB);
        assert_eq!(value["layers"][1]["mediaType"], oci::MEDIA_TYPE_BOOTSTRAP);
        let uncompressed =
            |i: usize| &value["layers"][i]["annotations"][oci::ANNOTATION_UNCOMPRESSED];
        assert_eq!(uncompressed(0), &blob.digest.to_string());
        assert_eq!(uncompressed(1), &boot.diff_id.to_string());
        assert_eq!(value["config"]["digest"], Digest::of(b"{}").to_string());
        assert_eq!(value["mediaType"], oci::MEDIA_TYPE_OCI_MANIFEST);
    }
}
