//! Publishing the converted image to a registry or into an OCI image layout.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lode_common::oci;
use lode_common::registry::{Reference, RegistryClient};
use lode_common::Digest;
use serde_json::{json, Value};
use tracing::info;

use super::chunks::LayerBlob;
use super::error::ConvertError;
use super::package::BootstrapLayer;
use super::source::{blob_path, REF_NAME_ANNOTATION};

/// Tag of a layout target given without one.
pub const DEFAULT_LAYOUT_TAG: &str = "latest";

/// Everything that makes up the converted image.
pub struct Artifacts<'a> {
    pub blobs: &'a [LayerBlob],
    pub bootstrap: &'a BootstrapLayer,
    pub config: &'a [u8],
    pub manifest: &'a [u8],
}

/// Where the converted image goes.
#[derive(Clone, Debug)]
pub enum Target {
    Registry {
        client: RegistryClient,
        reference: Reference,
    },
    Layout {
        dir: PathBuf,
        tag: String,
    },
}

impl Target {
    /// Uploads or writes blobs, config and manifest (manifest last, so that a
    /// reader never sees a manifest whose blobs are missing). Returns the
    /// manifest digest.
    pub async fn publish(&self, image: &Artifacts<'_>) -> Result<Digest, ConvertError> {
        let manifest_digest = Digest::of(image.manifest);
        match self {
            Target::Registry { client, reference } => {
                for blob in image.blobs {
                    info!(blob = %blob.digest, size = blob.size, "pushing data blob");
                    client
                        .push_blob_file(reference, &blob.digest, &blob.path)
                        .await?;
                }
                let boot = image.bootstrap;
                info!(blob = %boot.digest, size = boot.size, "pushing bootstrap layer");
                client
                    .push_blob_file(reference, &boot.digest, &boot.path)
                    .await?;
                client
                    .push_blob(
                        reference,
                        &Digest::of(image.config),
                        Bytes::copy_from_slice(image.config),
                    )
                    .await?;
                let pushed = client
                    .push_manifest(
                        reference,
                        image.manifest.to_vec(),
                        oci::MEDIA_TYPE_OCI_MANIFEST,
                    )
                    .await?;
                if pushed != manifest_digest {
                    return Err(ConvertError::BadImage {
                        image: reference.to_string(),
                        message: format!(
                            "registry stored the manifest as {pushed}, expected {manifest_digest}"
                        ),
                    });
                }
            }
            Target::Layout { dir, tag } => {
                let dir = dir.clone();
                let tag = tag.clone();
                let blobs: Vec<(PathBuf, Digest)> = image
                    .blobs
                    .iter()
                    .map(|b| (b.path.clone(), b.digest))
                    .chain([(image.bootstrap.path.clone(), image.bootstrap.digest)])
                    .collect();
                let config = image.config.to_vec();
                let manifest = image.manifest.to_vec();
                tokio::task::spawn_blocking(move || {
                    write_layout(&dir, &tag, &blobs, &config, &manifest)
                })
                .await
                .map_err(|e| ConvertError::Task(e.to_string()))??;
            }
        }
        Ok(manifest_digest)
    }
}

/// Adds the image to the layout at `dir` (created if needed) and tags it,
/// replacing an earlier manifest with the same tag in `index.json`.
fn write_layout(
    dir: &Path,
    tag: &str,
    blobs: &[(PathBuf, Digest)],
    config: &[u8],
    manifest: &[u8],
) -> Result<(), ConvertError> {
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir)
        .map_err(ConvertError::io(format!("create {}", blob_dir.display())))?;
    let layout_file = dir.join("oci-layout");
    if !layout_file.exists() {
        write_atomic(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    for (path, digest) in blobs {
        move_blob(path, &blob_path(dir, digest))?;
    }
    write_atomic(&blob_path(dir, &Digest::of(config)), config)?;
    let manifest_digest = Digest::of(manifest);
    write_atomic(&blob_path(dir, &manifest_digest), manifest)?;

    let index_path = dir.join("index.json");
    let mut index: Value = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ConvertError::BadImage {
            image: format!("oci:{}", dir.display()),
            message: format!("index.json: {e}"),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_TYPE_OCI_INDEX,
            "manifests": [],
        }),
        Err(e) => {
            return Err(ConvertError::Io {
                what: format!("read {}", index_path.display()),
                source: e,
            })
        }
    };
    let Some(manifests) = index.get_mut("manifests").and_then(Value::as_array_mut) else {
        return Err(ConvertError::BadImage {
            image: format!("oci:{}", dir.display()),
            message: "index.json has no manifests array".to_owned(),
        });
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != tag);
    manifests.push(json!({
        "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
        "digest": manifest_digest.to_string(),
        "size": manifest.len(),
        "annotations": { REF_NAME_ANNOTATION: tag },
    }));
    let bytes = serde_json::to_vec_pretty(&index).map_err(|e| ConvertError::Task(e.to_string()))?;
    write_atomic(&index_path, &bytes)
}

/// Moves a finished blob into the layout, copying when it lives on another
/// file system. A blob already there (same digest) is kept.
fn move_blob(from: &Path, to: &Path) -> Result<(), ConvertError> {
    if to.exists() {
        return Ok(());
    }
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let tmp = temp_name(to);
    fs::copy(from, &tmp)
        .and_then(|_| fs::rename(&tmp, to))
        .map_err(ConvertError::io(format!(
            "copy {} to {}",
            from.display(),
            to.display()
        )))?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    let tmp = temp_name(path);
    let result = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(ConvertError::io(format!("write {}", path.display())))
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
