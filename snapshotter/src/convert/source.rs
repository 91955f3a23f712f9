//! Reading the source image: resolving a tag (and a platform in an index) to
//! an image manifest, fetching its config, and making layer blobs available
//! as local files.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use lode_common::oci;
use lode_common::registry::{Reference, RegistryClient};
use lode_common::Digest;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use tracing::debug;

use super::decompress::is_layer_media_type;
use super::error::ConvertError;
use super::location::PlatformSpec;

/// Largest manifest, index or config accepted (they are JSON documents of a
/// few KiB; the bound keeps a hostile source from exhausting memory).
const MAX_JSON_SIZE: u64 = 16 << 20;
/// Indexes may point at indexes; this many levels are followed.
const MAX_INDEX_DEPTH: usize = 4;
/// Annotation naming a manifest's tag in a layout's `index.json`.
pub(crate) const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const DOCKER_CONFIG_MEDIA_TYPE: &str = "application/vnd.docker.container.image.v1+json";

/// One layer of the source image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceLayer {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// The resolved source image.
#[derive(Clone, Debug)]
pub struct SourceImage {
    pub manifest_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<SourceLayer>,
}

/// A layer blob on local disk.
#[derive(Debug)]
pub struct LocalLayer {
    pub path: PathBuf,
    /// The registry client already checked the digest while downloading.
    pub verified: bool,
    /// A download that is deleted once converted (layout blobs are not).
    pub temporary: bool,
}

/// Where the source image is read from.
#[derive(Clone, Debug)]
pub enum Source {
    Registry {
        client: RegistryClient,
        reference: Reference,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

/// A manifest or index document.
struct Document {
    digest: Digest,
    media_type: Option<String>,
    bytes: Vec<u8>,
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Registry { reference, .. } => reference.to_string(),
            Source::Layout { dir, tag } => match tag {
                Some(tag) => format!("oci:{}:{tag}", dir.display()),
                None => format!("oci:{}", dir.display()),
            },
        }
    }

    fn bad(&self, message: impl Into<String>) -> ConvertError {
        ConvertError::BadImage {
            image: self.name(),
            message: message.into(),
        }
    }

    /// Resolves the image manifest for `platform` and fetches its config.
    pub async fn resolve(&self, platform: &PlatformSpec) -> Result<SourceImage, ConvertError> {
        let mut doc = self.top_document(platform).await?;
        for _ in 0..MAX_INDEX_DEPTH {
            if !is_index(doc.media_type.as_deref(), &doc.bytes) {
                return self.image(doc).await;
            }
            let index: ImageIndex = serde_json::from_slice(&doc.bytes)
                .map_err(|e| self.bad(format!("index {}: {e}", doc.digest)))?;
            let chosen = self.pick_platform(index.manifests(), platform)?;
            doc = self.document(&chosen).await?;
        }
        Err(self.bad(format!(
            "indexes nested deeper than {MAX_INDEX_DEPTH} levels"
        )))
    }

    /// Makes a layer blob available as a local file (downloading into
    /// `scratch` for registry sources).
    pub async fn fetch_layer(
        &self,
        layer: &SourceLayer,
        scratch: &Path,
    ) -> Result<LocalLayer, ConvertError> {
        match self {
            Source::Registry { client, reference } => {
                let path = scratch.join(format!("layer-{}", layer.digest.hex()));
                client
                    .pull_blob_to_file(reference, &layer.digest, &path)
                    .await?;
                Ok(LocalLayer {
                    path,
                    verified: true,
                    temporary: true,
                })
            }
            Source::Layout { dir, .. } => Ok(LocalLayer {
                path: blob_path(dir, &layer.digest),
                verified: false,
                temporary: false,
            }),
        }
    }

    /// The manifest or index the location names.
    async fn top_document(&self, platform: &PlatformSpec) -> Result<Document, ConvertError> {
        match self {
            Source::Registry { client, reference } => {
                let raw = client.pull_manifest(reference).await?;
                Ok(Document {
                    digest: raw.digest,
                    media_type: Some(raw.media_type),
                    bytes: raw.bytes,
                })
            }
            Source::Layout { dir, tag } => {
                let path = dir.join("index.json");
                let bytes = read_limited(&path)?;
                let index: ImageIndex = serde_json::from_slice(&bytes)
                    .map_err(|e| self.bad(format!("{}: {e}", path.display())))?;
                let tagged: Vec<Descriptor> = index
                    .manifests()
                    .iter()
                    .filter(|d| tag.is_none() || ref_name(d) == tag.as_deref())
                    .cloned()
                    .collect();
                let chosen = match (tagged.as_slice(), tag) {
                    ([], Some(tag)) => {
                        return Err(self.bad(format!(
                            "no manifest tagged {tag:?} in index.json (tags: {})",
                            tags(index.manifests())
                        )))
                    }
                    ([], None) => return Err(self.bad("index.json lists no manifest")),
                    ([only], _) => only.clone(),
                    (several, _) if several.iter().all(|d| d.platform().is_some()) => {
                        self.pick_platform(several, platform)?
                    }
                    (several, _) => {
                        return Err(self.bad(format!(
                            "index.json lists {} manifests; name one as oci:DIR:TAG (tags: {})",
                            several.len(),
                            tags(several)
                        )))
                    }
                };
                self.document(&chosen).await
            }
        }
    }

    /// Fetches the manifest or index `descriptor` points at.
    async fn document(&self, descriptor: &Descriptor) -> Result<Document, ConvertError> {
        let digest = self.digest_of(descriptor)?;
        if descriptor.size() > MAX_JSON_SIZE {
            return Err(self.bad(format!(
                "manifest {digest} is {} bytes, more than {MAX_JSON_SIZE}",
                descriptor.size()
            )));
        }
        let media_type = Some(descriptor.media_type().to_string());
        match self {
            Source::Registry { client, reference } => {
                let raw = client.pull_manifest(&reference.with_digest(digest)).await?;
                Ok(Document {
                    digest: raw.digest,
                    media_type: Some(raw.media_type),
                    bytes: raw.bytes,
                })
            }
            Source::Layout { dir, .. } => Ok(Document {
                digest,
                media_type,
                bytes: read_layout_blob(dir, &digest)?,
            }),
        }
    }

    async fn image(&self, doc: Document) -> Result<SourceImage, ConvertError> {
        if doc.media_type.as_deref()
            == Some("application/vnd.docker.distribution.manifest.v1+prettyjws")
            || doc.media_type.as_deref()
                == Some("application/vnd.docker.distribution.manifest.v1+json")
        {
            return Err(self.bad("docker schema 1 manifests are not supported"));
        }
        let manifest: ImageManifest = serde_json::from_slice(&doc.bytes)
            .map_err(|e| self.bad(format!("manifest {}: {e}", doc.digest)))?;
        let is_lode = manifest
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(oci::ANNOTATION_FORMAT_VERSION))
            || manifest.layers().iter().any(|l| {
                lode_common::image::is_bootstrap(l) || lode_common::image::is_data_blob(l)
            });
        if is_lode {
            return Err(ConvertError::AlreadyLode { image: self.name() });
        }
        let config_desc = manifest.config();
        let config_type = config_desc.media_type().to_string();
        if config_type != oci::MEDIA_TYPE_OCI_CONFIG && config_type != DOCKER_CONFIG_MEDIA_TYPE {
            return Err(self.bad(format!(
                "config media type {config_type} is not an image config"
            )));
        }
        let config_digest = self.digest_of(config_desc)?;
        if config_desc.size() > MAX_JSON_SIZE {
            return Err(self.bad(format!(
                "config {config_digest} is {} bytes, more than {MAX_JSON_SIZE}",
                config_desc.size()
            )));
        }
        let config = match self {
            Source::Registry { client, reference } => {
                client.pull_blob(reference, &config_digest).await?.to_vec()
            }
            Source::Layout { dir, .. } => read_layout_blob(dir, &config_digest)?,
        };
        let mut layers = Vec::with_capacity(manifest.layers().len());
        for (i, layer) in manifest.layers().iter().enumerate() {
            let media_type = layer.media_type().to_string();
            let digest = self.digest_of(layer)?;
            if !is_layer_media_type(&media_type) {
                return Err(ConvertError::UnsupportedLayer {
                    layer: format!("#{} {digest}", i + 1),
                    media_type,
                });
            }
            layers.push(SourceLayer {
                digest,
                size: layer.size(),
                media_type,
            });
        }
        debug!(image = %self.name(), manifest = %doc.digest, layers = layers.len(), "resolved source image");
        Ok(SourceImage {
            manifest_digest: doc.digest,
            config,
            layers,
        })
    }

    fn pick_platform(
        &self,
        manifests: &[Descriptor],
        platform: &PlatformSpec,
    ) -> Result<Descriptor, ConvertError> {
        manifests
            .iter()
            .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)))
            .cloned()
            .ok_or_else(|| ConvertError::NoPlatform {
                image: self.name(),
                platform: platform.to_string(),
                available: manifests
                    .iter()
                    .filter_map(|d| d.platform().as_ref().map(PlatformSpec::describe))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn digest_of(&self, descriptor: &Descriptor) -> Result<Digest, ConvertError> {
        descriptor
            .digest()
            .to_string()
            .parse()
            .map_err(|e| self.bad(format!("{e}")))
    }
}

/// Whether a document is an index (by media type, else by its shape).
fn is_index(media_type: Option<&str>, bytes: &[u8]) -> bool {
    match media_type {
        Some(oci::MEDIA_TYPE_OCI_INDEX | oci::MEDIA_TYPE_DOCKER_LIST) => true,
        Some(oci::MEDIA_TYPE_OCI_MANIFEST | oci::MEDIA_TYPE_DOCKER_MANIFEST) => false,
        _ => serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some_and(|m| m.is_array())),
    }
}

fn ref_name(descriptor: &Descriptor) -> Option<&str> {
    descriptor
        .annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME_ANNOTATION))
        .map(String::as_str)
}

fn tags(manifests: &[Descriptor]) -> String {
    let tags: Vec<&str> = manifests.iter().filter_map(ref_name).collect();
    if tags.is_empty() {
        "none".to_owned()
    } else {
        tags.join(", ")
    }
}

pub(crate) fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Reads a small blob from a layout and checks its digest.
fn read_layout_blob(dir: &Path, digest: &Digest) -> Result<Vec<u8>, ConvertError> {
    let path = blob_path(dir, digest);
    let bytes = read_limited(&path)?;
    let actual = Digest::of(&bytes);
    if actual != *digest {
        return Err(ConvertError::BadImage {
            image: format!("oci:{}", dir.display()),
            message: format!("blob {digest} has digest {actual}"),
        });
    }
    Ok(bytes)
}

fn read_limited(path: &Path) -> Result<Vec<u8>, ConvertError> {
    let what = || format!("read {}", path.display());
    let file = File::open(path).map_err(ConvertError::io(what()))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(ConvertError::io(what()))?;
    if bytes.len() as u64 > MAX_JSON_SIZE {
        return Err(ConvertError::Io {
            what: what(),
            source: std::io::Error::other(format!("larger than {MAX_JSON_SIZE} bytes")),
        });
    }
    Ok(bytes)
}
