//! Recognising Lode layers when containerd prepares them, from the labels a
//! remote-snapshotter-aware pull puts on Prepare, and fetching the image's
//! bootstrap so that a daemon can serve it. The manifest is read from
//! containerd's content store when the pull stored it there, else fetched
//! from the registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::content::ContentStore;
use crate::cri::Keychain;
use lode_common::contract::{
    LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST, LABEL_TARGET_REF,
};
use lode_common::image::{self, ImageError, LodeManifest};
use lode_common::registry::{
    Capability, Credentials, HostClients, HostsError, Reference, RegistryError, RegistryHost,
    RegistryOptions, MAX_MANIFEST_SIZE,
};
use lode_common::Digest;
use lode_config::SnapshotterRegistryConfig;

use crate::instances::{LodeImage, PulledImage};

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
    #[error("registry hosts: {0}")]
    Hosts(#[from] HostsError),
}

/// The bootstrap, from the first host that serves it, in a file of this
/// pull's own: it goes when the image's instance is released, and is never
/// one that the release of an earlier pull of the same image is about to
/// remove.
async fn fetch_bootstrap(
    clients: &HostClients,
    reference: &Reference,
    digest: Digest,
    dir: &std::path::Path,
) -> Result<PathBuf, ImageError> {
    let mut last = None;
    for attempt in clients.attempts(reference, Capability::Pull) {
        let fetched =
            image::fetch_bootstrap_anew(attempt.client, &attempt.reference, digest, dir).await;
        match fetched {
            Ok(path) => return Ok(path),
            Err(ImageError::Registry(e)) => {
                clients.failed(&attempt, &e);
                last = Some(ImageError::Registry(e));
            }
            Err(other) => return Err(other),
        }
    }
    Err(last.unwrap_or_else(|| no_host(reference, "pull")))
}

fn lock_early(
    early: &Mutex<HashMap<Digest, EarlyBootstrap>>,
) -> std::sync::MutexGuard<'_, HashMap<Digest, EarlyBootstrap>> {
    early.lock().unwrap_or_else(|e| e.into_inner())
}

fn no_host(reference: &Reference, capability: &str) -> ImageError {
    ImageError::Registry(RegistryError::Request {
        reference: reference.to_string(),
        what: "registry hosts".to_owned(),
        message: format!("no host has the capability {capability:?}"),
    })
}

/// What a prepared layer turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Not a Lode layer (or no labels to tell): unpacked the normal way.
    Plain,
    /// A Lode data blob: served by the image's instance, nothing to unpack.
    /// The image's first one comes with what its daemon may fetch ahead.
    DataBlob(Option<PulledImage>),
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
    /// Clients of each registry's hosts, so that the layers of a pull
    /// share connections and tokens; keyed also by the hosts (a
    /// `hosts.toml` edited since gets new clients, as containerd reads it
    /// at each pull) and the credentials a CRI pull gave for the
    /// repository, and rebuilt when the docker config file changes (a
    /// `docker login` after they were built).
    clients: Mutex<HashMap<ClientKey, Arc<HostClients>>>,
    keychain: Arc<Keychain>,
    content: ContentStore,
    /// Bootstrap fetches started at the first data blob layer a pull
    /// prepares, by bootstrap digest, for the pull's bootstrap layer to take.
    early: Arc<Mutex<HashMap<Digest, EarlyBootstrap>>>,
}

type EarlyBootstrap = tokio::sync::oneshot::Receiver<Result<PathBuf, ImageError>>;

/// How long a bootstrap fetched early waits for its pull's bootstrap layer
/// (a pull that failed in between never asks); then its file goes.
const EARLY_UNCLAIMED: std::time::Duration = std::time::Duration::from_secs(120);

/// Registry, its hosts, and the credentials given for the repository.
type ClientKey = (String, Vec<RegistryHost>, Option<Credentials>);

impl LazyLayers {
    pub fn new(
        registry: SnapshotterRegistryConfig,
        bootstraps_dir: PathBuf,
        keychain: Arc<Keychain>,
        content: ContentStore,
    ) -> Self {
        Self {
            registry,
            bootstraps_dir,
            manifests: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            keychain,
            content,
            early: Arc::default(),
        }
    }

    fn clients(&self, reference: &Reference) -> Result<Arc<HostClients>, LazyError> {
        let given = self.keychain.get(reference);
        let hosts = crate::hosts::resolve(&self.registry, &reference.registry)?;
        let key = (reference.registry.clone(), hosts.clone(), given.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = clients.get(&key).filter(|c| c.credentials_current()) {
            return Ok(Arc::clone(found));
        }
        let options = RegistryOptions {
            docker_config: self.registry.docker_config.clone(),
            credentials: given
                .map(|c| (reference.registry.clone(), c))
                .into_iter()
                .collect(),
            ..RegistryOptions::default()
        };
        let built = Arc::new(HostClients::new(hosts, &options)?);
        clients.insert(key, Arc::clone(&built));
        Ok(built)
    }

    /// Classifies the layer a Prepare with these labels, in containerd
    /// namespace `namespace`, is about. A layer whose image cannot be read
    /// is treated as plain: containerd then unpacks it itself, or reports
    /// why it cannot.
    pub async fn classify(
        &self,
        labels: &HashMap<String, String>,
        namespace: Option<&str>,
    ) -> Result<LayerKind, LazyError> {
        if !labels.contains_key(LABEL_TARGET_REF) {
            return Ok(LayerKind::Plain);
        }
        let Some(layer) = layer_labels(labels)? else {
            return Ok(LayerKind::Plain);
        };
        let clients = self.clients(&layer.reference)?;
        let Some(manifest) = self.manifest(&clients, &layer.reference, namespace).await else {
            return Ok(LayerKind::Plain);
        };
        if manifest.data_blobs.contains(&layer.layer) {
            // The first data blob the pull prepares (those other images
            // share and that are already there are not): the bootstrap's
            // fetch and the daemon's of the prefetch list can start while
            // the rest of the pull goes on.
            let first = self.fetch_bootstrap_early(&clients, &layer.reference, &manifest);
            if first && !manifest.fronts.is_empty() {
                let image = self.image(labels, &layer.reference, &manifest, PathBuf::new())?;
                let fronts = manifest.fronts.clone();
                return Ok(LayerKind::DataBlob(Some(PulledImage { image, fronts })));
            }
            return Ok(LayerKind::DataBlob(None));
        }
        if manifest.bootstrap != layer.layer {
            return Ok(LayerKind::Plain);
        }
        // The fetch started at the first layer, if any; else one now.
        let early = lock_early(&self.early).remove(&manifest.bootstrap);
        let fetched = match early {
            Some(early) => early.await.ok(),
            None => None,
        };
        let fetched = match fetched {
            Some(fetched) => fetched,
            None => {
                let digest = manifest.bootstrap;
                fetch_bootstrap(&clients, &layer.reference, digest, &self.bootstraps_dir).await
            }
        };
        let path = fetched.map_err(|source| LazyError::Image {
            image_ref: layer.reference.to_string(),
            source,
        })?;
        Ok(LayerKind::Bootstrap(self.image(
            labels,
            &layer.reference,
            &manifest,
            path,
        )?))
    }

    /// The image `reference` names, served from `bootstrap_path`.
    fn image(
        &self,
        labels: &HashMap<String, String>,
        reference: &Reference,
        manifest: &LodeManifest,
        bootstrap_path: PathBuf,
    ) -> Result<LodeImage, LazyError> {
        Ok(LodeImage {
            bootstrap_digest: manifest.bootstrap.to_string(),
            bootstrap_path,
            image_ref: labels
                .get(LABEL_IMAGE_REF)
                .cloned()
                .unwrap_or_else(|| reference.to_string()),
            blob_source: format!("registry://{}/{}", reference.registry, reference.repository),
            plain_http: self.registry.is_plain_http(reference.host()),
        })
    }

    /// Starts fetching the image's bootstrap in the background, unless a
    /// fetch of it already waits to be taken; whether it started one. One
    /// that nobody takes within [`EARLY_UNCLAIMED`] is removed.
    fn fetch_bootstrap_early(
        &self,
        clients: &Arc<HostClients>,
        reference: &Reference,
        manifest: &LodeManifest,
    ) -> bool {
        let digest = manifest.bootstrap;
        let (tx, rx) = tokio::sync::oneshot::channel();
        match lock_early(&self.early).entry(digest) {
            std::collections::hash_map::Entry::Occupied(_) => return false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(rx);
            }
        }
        let (clients, reference, dir) = (
            Arc::clone(clients),
            reference.clone(),
            self.bootstraps_dir.clone(),
        );
        tokio::spawn(async move {
            let fetched = fetch_bootstrap(&clients, &reference, digest, &dir).await;
            if let Err(Ok(path)) = tx.send(fetched) {
                let _ = std::fs::remove_file(path);
            }
        });
        let early = Arc::clone(&self.early);
        tokio::spawn(async move {
            tokio::time::sleep(EARLY_UNCLAIMED).await;
            let unclaimed = lock_early(&early).remove(&digest);
            if let Some(mut rx) = unclaimed {
                rx.close();
                if let Ok(Ok(path)) = rx.try_recv() {
                    let _ = std::fs::remove_file(path);
                }
            }
        });
        true
    }

    /// Where pulls fetch bootstraps to.
    pub fn bootstraps_dir(&self) -> &Path {
        &self.bootstraps_dir
    }

    /// Blob `digest` from containerd's content store, if the pull stored
    /// it in `namespace`.
    async fn stored(
        &self,
        namespace: Option<&str>,
        digest: &Digest,
        limit: u64,
    ) -> Option<Vec<u8>> {
        match self.content.read(namespace?, digest, limit).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "cannot read containerd's content store (containerd_address); fetching from the registry");
                None
            }
        }
    }

    /// The image's manifest: the one the pull stored in containerd, else
    /// from the first host that resolves it; `None` for an image that is
    /// not Lode's (remembered) or that no host could give (tried again
    /// next time).
    async fn manifest(
        &self,
        clients: &HostClients,
        reference: &Reference,
        namespace: Option<&str>,
    ) -> Option<LodeManifest> {
        let key = reference.to_string();
        if let Some(known) = self.lock().get(&key) {
            return known.clone();
        }
        if let Some(digest) = reference.digest {
            let limit = MAX_MANIFEST_SIZE as u64;
            if let Some(bytes) = self.stored(namespace, &digest, limit).await {
                let parsed = image::parse_lode_manifest(reference, digest, &bytes);
                return self.settle(&key, "containerd", parsed).flatten();
            }
        }
        let capability = match reference.digest {
            Some(_) => Capability::Pull,
            None => Capability::Resolve,
        };
        for attempt in clients.attempts(reference, capability) {
            match image::resolve(attempt.client, &attempt.reference).await {
                Err(ImageError::Registry(e)) => clients.failed(&attempt, &e),
                read => {
                    if let Some(answer) = self.settle(&key, &attempt.reference.registry, read) {
                        return answer;
                    }
                }
            }
        }
        tracing::warn!(image_ref = %key, hosts = %clients.describe(), "no host gave the image manifest; unpacking the layer normally");
        None
    }

    /// What a read of `key`'s manifest from `source` settled, remembered:
    /// a Lode manifest, or `None` for an image that is not Lode's; `None`
    /// (logged) for a manifest that could not be read.
    fn settle(
        &self,
        key: &str,
        source: &str,
        read: Result<LodeManifest, ImageError>,
    ) -> Option<Option<LodeManifest>> {
        let answer = match read {
            Ok(manifest) => Some(manifest),
            Err(ImageError::NotLode { .. }) => None,
            Err(error) => {
                tracing::warn!(image_ref = %key, source, %error, "cannot read the image manifest");
                return None;
            }
        };
        self.lock().insert(key.to_owned(), answer.clone());
        Some(answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<LodeManifest>>> {
        self.manifests.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy(registry: SnapshotterRegistryConfig) -> LazyLayers {
        LazyLayers::new(
            registry,
            PathBuf::from("/nonexistent"),
            Arc::default(),
            ContentStore::new(std::path::Path::new("/nonexistent/containerd.sock")),
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_edited_hosts_file_gets_new_clients() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("reg.io/hosts.toml");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "[host.\"http://a.local:1\"]\n").unwrap();
        let registry = SnapshotterRegistryConfig {
            config_path: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let lazy = lazy(registry);
        let reference: Reference = "reg.io/app:v1".parse().unwrap();
        let first = lazy.clients(&reference).unwrap();
        assert!(Arc::ptr_eq(&first, &lazy.clients(&reference).unwrap()));
        std::fs::write(&file, "[host.\"http://b.local:1\"]\n").unwrap();
        let second = lazy.clients(&reference).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(
            second.describe().starts_with("b.local:1"),
            "{}",
            second.describe()
        );
    }

    #[tokio::test]
    async fn without_labels_a_layer_is_plain() {
        let lazy = lazy(Default::default());
        assert_eq!(
            lazy.classify(&HashMap::new(), None).await.unwrap(),
            LayerKind::Plain
        );
        let only_ref = labels(&[(LABEL_TARGET_REF, "sha256:abc")]);
        assert_eq!(
            lazy.classify(&only_ref, None).await.unwrap(),
            LayerKind::Plain
        );
    }

    #[tokio::test]
    async fn malformed_labels_are_named_in_the_error() {
        let lazy = lazy(Default::default());
        let bad = labels(&[
            (LABEL_TARGET_REF, "x"),
            (LABEL_IMAGE_REF, "127.0.0.1:5000/app:v1"),
            (LABEL_LAYER_DIGEST, "not-a-digest"),
        ]);
        let err = lazy
            .classify(&bad, Some("default"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(LABEL_LAYER_DIGEST), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_registry_leaves_the_layer_to_containerd() {
        // Port 1 on loopback refuses connections at once.
        let lazy = lazy(Default::default());
        let layer = labels(&[
            (LABEL_TARGET_REF, "x"),
            (LABEL_IMAGE_REF, "127.0.0.1:1/app:v1"),
            (
                LABEL_LAYER_DIGEST,
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ]);
        assert_eq!(
            lazy.classify(&layer, Some("default")).await.unwrap(),
            LayerKind::Plain
        );
    }
}
