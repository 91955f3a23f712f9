//! Recognising Lode layers when containerd prepares them, from the labels a
//! remote-snapshotter-aware pull puts on Prepare, and fetching the image's
//! bootstrap so that a daemon can serve it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::cri::Keychain;
use lode_common::contract::{
    LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET_REF,
};
use lode_common::image::{self, ImageError, LodeManifest};
use lode_common::registry::{
    Credentials, Reference, RegistryClient, RegistryError, RegistryOptions,
};
use lode_common::Digest;
use lode_config::SnapshotterRegistryConfig;

use crate::instances::LodeImage;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("label {label}: {message}")]
    BadLabel {
        label: &'static str,
        message: String,
    },
    #[error("Lode image {image_ref}: {source}")]
    Image {
        image_ref: String,
        #[source]
        source: ImageError,
    },
    #[error("registry client: {0}")]
    Client(#[from] RegistryError),
}

/// What a prepared layer turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Not a Lode layer (or no labels to tell): unpacked the normal way.
    Plain,
    /// A Lode data blob: served by the image's instance, nothing to unpack.
    DataBlob,
    /// The Lode bootstrap layer, fetched; completes the image.
    Bootstrap(LodeImage),
}

/// The labels that identify a layer of an image.
struct LayerLabels {
    reference: Reference,
    layer: Digest,
}

fn layer_labels(labels: &HashMap<String, String>) -> Result<Option<LayerLabels>, LazyError> {
    let (Some(image_ref), Some(layer)) =
        (labels.get(LABEL_IMAGE_REF), labels.get(LABEL_LAYER_DIGEST))
    else {
        return Ok(None);
    };
    let mut reference: Reference = image_ref.parse().map_err(|e| LazyError::BadLabel {
        label: LABEL_IMAGE_REF,
        message: format!("{e}"),
    })?;
    if let Some(manifest) = labels.get(LABEL_MANIFEST_DIGEST) {
        let digest: Digest = manifest.parse().map_err(|e| LazyError::BadLabel {
            label: LABEL_MANIFEST_DIGEST,
            message: format!("{e}"),
        })?;
        reference = reference.with_digest(digest);
    }
    let layer: Digest = layer.parse().map_err(|e| LazyError::BadLabel {
        label: LABEL_LAYER_DIGEST,
        message: format!("{e}"),
    })?;
    Ok(Some(LayerLabels { reference, layer }))
}

pub struct LazyLayers {
    registry: SnapshotterRegistryConfig,
    bootstraps_dir: PathBuf,
    /// Manifests by reference, so that the layers of one pull cost one
    /// manifest request. `None` records "not a Lode image".
    manifests: Mutex<HashMap<String, Option<LodeManifest>>>,
    /// One client per registry host and scheme, so that the layers of a
    /// pull share its connections and token; rebuilt when its docker config
    /// file changes (a `docker login` after it was built).
    /// Keyed also by the credentials a CRI pull gave for the repository.
    clients: Mutex<HashMap<ClientKey, RegistryClient>>,
    keychain: Arc<Keychain>,
}

/// Registry host, plain HTTP, and the credentials given for the repository.
type ClientKey = (String, bool, Option<Credentials>);

impl LazyLayers {
    pub fn new(
        registry: SnapshotterRegistryConfig,
        bootstraps_dir: PathBuf,
        keychain: Arc<Keychain>,
    ) -> Self {
        Self {
            registry,
            bootstraps_dir,
            manifests: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            keychain,
        }
    }

    fn client(&self, reference: &Reference) -> Result<RegistryClient, LazyError> {
        let plain_http = self.registry.is_plain_http(reference.host());
        let given = self.keychain.get(reference);
        let key = (reference.registry.clone(), plain_http, given.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key).filter(|c| c.credentials_current()) {
            return Ok(client.clone());
        }
        let client = RegistryClient::new(RegistryOptions {
            plain_http,
            docker_config: self.registry.docker_config.clone(),
            credentials: given
                .map(|c| (reference.registry.clone(), c))
                .into_iter()
                .collect(),
            ..RegistryOptions::default()
        })?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Classifies the layer a Prepare with these labels is about. A layer
    /// whose image cannot be read is treated as plain: containerd then
    /// unpacks it itself, or reports why it cannot.
    pub async fn classify(&self, labels: &HashMap<String, String>) -> Result<LayerKind, LazyError> {
        if !labels.contains_key(LABEL_TARGET_REF) {
            return Ok(LayerKind::Plain);
        }
        let Some(layer) = layer_labels(labels)? else {
            return Ok(LayerKind::Plain);
        };
        let Some((reference, client, manifest)) = self.resolve(&layer.reference).await? else {
            return Ok(LayerKind::Plain);
        };
        if manifest.data_blobs.contains(&layer.layer) {
            return Ok(LayerKind::DataBlob);
        }
        if manifest.bootstrap != layer.layer {
            return Ok(LayerKind::Plain);
        }
        let image_ref = layer.reference.to_string();
        let path =
            image::fetch_bootstrap(&client, &layer.reference, &manifest, &self.bootstraps_dir)
                .await
                .map_err(|source| LazyError::Image {
                    image_ref: image_ref.clone(),
                    source,
                })?;
        Ok(LayerKind::Bootstrap(LodeImage {
            bootstrap_digest: manifest.bootstrap.to_string(),
            bootstrap_path: path,
            image_ref: labels.get(LABEL_IMAGE_REF).cloned().unwrap_or(image_ref),
            blob_source: format!("registry://{}/{}", reference.registry, reference.repository),
            plain_http: self.registry.is_plain_http(reference.host()),
        }))
    }

    /// The configured mirrors of the reference's registry, then the
    /// registry itself: the first that has the image serves it (manifest,
    /// bootstrap and, through the daemon, the data blobs).
    fn candidates(&self, reference: &Reference) -> Vec<Reference> {
        let mut candidates: Vec<Reference> = self
            .registry
            .mirrors
            .iter()
            .filter(|m| m.host == reference.registry)
            .flat_map(|m| m.endpoints.iter())
            .map(|endpoint| Reference {
                registry: endpoint.clone(),
                ..reference.clone()
            })
            .collect();
        candidates.push(reference.clone());
        candidates
    }

    async fn resolve(
        &self,
        reference: &Reference,
    ) -> Result<Option<(Reference, RegistryClient, LodeManifest)>, LazyError> {
        for candidate in self.candidates(reference) {
            let client = self.client(&candidate)?;
            if let Some(manifest) = self.manifest(&client, &candidate).await {
                return Ok(Some((candidate, client, manifest)));
            }
        }
        Ok(None)
    }

    async fn manifest(
        &self,
        client: &RegistryClient,
        reference: &Reference,
    ) -> Option<LodeManifest> {
        let key = reference.to_string();
        if let Some(known) = self.lock().get(&key) {
            return known.clone();
        }
        let resolved = match image::resolve(client, reference).await {
            Ok(manifest) => Some(manifest),
            Err(ImageError::NotLode { .. }) => None,
            Err(error) => {
                // Not cached: the registry may answer next time.
                tracing::warn!(image_ref = %key, %error, "cannot read the image manifest; unpacking the layer normally");
                return None;
            }
        };
        self.lock().insert(key, resolved.clone());
        resolved
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<LodeManifest>>> {
        self.manifests.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn mirrors_come_before_their_registry() {
        let registry = SnapshotterRegistryConfig {
            mirrors: vec![lode_config::MirrorConfig {
                host: "docker.io".into(),
                endpoints: vec!["mirror.local:5000".into()],
            }],
            ..Default::default()
        };
        let lazy = LazyLayers::new(registry, PathBuf::from("/nonexistent"), Arc::default());
        let hosts: Vec<String> = lazy
            .candidates(&"docker.io/library/app:v1".parse().unwrap())
            .into_iter()
            .map(|r| r.registry)
            .collect();
        assert_eq!(hosts, ["mirror.local:5000", "docker.io"]);
        let other = lazy.candidates(&"quay.io/app:v1".parse().unwrap());
        assert_eq!(other.len(), 1);
    }

    #[tokio::test]
    async fn without_labels_a_layer_is_plain() {
        let lazy = LazyLayers::new(
            Default::default(),
            PathBuf::from("/nonexistent"),
            Arc::default(),
        );
        assert_eq!(
            lazy.classify(&HashMap::new()).await.unwrap(),
            LayerKind::Plain
        );
        let only_ref = labels(&[(LABEL_TARGET_REF, "sha256:abc")]);
        assert_eq!(lazy.classify(&only_ref).await.unwrap(), LayerKind::Plain);
    }

    #[tokio::test]
    async fn malformed_labels_are_named_in_the_error() {
        let lazy = LazyLayers::new(
            Default::default(),
            PathBuf::from("/nonexistent"),
            Arc::default(),
        );
        let bad = labels(&[
            (LABEL_TARGET_REF, "x"),
            (LABEL_IMAGE_REF, "127.0.0.1:5000/app:v1"),
            (LABEL_LAYER_DIGEST, "not-a-digest"),
        ]);
        let err = lazy.classify(&bad).await.unwrap_err().to_string();
        assert!(err.contains(LABEL_LAYER_DIGEST), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_registry_leaves_the_layer_to_containerd() {
        // Port 1 on loopback refuses connections at once.
        let lazy = LazyLayers::new(
            Default::default(),
            PathBuf::from("/nonexistent"),
            Arc::default(),
        );
        let layer = labels(&[
            (LABEL_TARGET_REF, "x"),
            (LABEL_IMAGE_REF, "127.0.0.1:1/app:v1"),
            (
                LABEL_LAYER_DIGEST,
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ]);
        assert_eq!(lazy.classify(&layer).await.unwrap(), LayerKind::Plain);
    }
}
