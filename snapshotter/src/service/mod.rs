//! The snapshot service: containerd's snapshot semantics over the metadata
//! store and overlay directories, with Lode images served by daemons.

mod disk;
pub mod error;
pub mod filter;
mod grpc;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind};

pub use error::ServiceError;

use crate::bootstraps;
use crate::content::key_namespace;
use crate::instances::{InstanceProvider, LodeImage, PulledImage};
use crate::lazy::{LayerKind, LazyLayers};
use crate::metrics::Metrics;
use crate::overlay::{self, Layers};
use crate::store::{now_ns, SnapshotKind, SnapshotRecord, Store};
use lode_common::contract::{LABEL_REMOTE, LABEL_TARGET_REF, REMOTE_LODE};

pub struct LodeSnapshotter {
    store: Store,
    snapshots_dir: PathBuf,
    lazy: LazyLayers,
    instances: Arc<dyn InstanceProvider>,
    metrics: Arc<Metrics>,
    /// Held shared from making a snapshot directory until its record is
    /// written, and exclusively by [`LodeSnapshotter::cleanup`], which would
    /// otherwise take a directory made meanwhile for an orphan.
    dirs: tokio::sync::RwLock<()>,
}

/// Forgets Lode image `digest` and releases its instance unless a snapshot
/// still uses the image (a damaged record may be one of its snapshots: then
/// it keeps being served). A failed release is logged (the instance stays
/// mounted).
async fn release_unless_used(
    store: &Store,
    instances: &dyn InstanceProvider,
    digest: &str,
) -> Result<(), crate::store::StoreError> {
    if store.forget_image_unless_used(digest)? {
        if let Err(error) = instances.release(digest).await {
            tracing::warn!(%digest, %error, "cannot release the image's instance");
        }
    }
    Ok(())
}

impl LodeSnapshotter {
    pub fn new(
        store: Store,
        snapshots_dir: PathBuf,
        lazy: LazyLayers,
        instances: Arc<dyn InstanceProvider>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(&snapshots_dir).map_err(ServiceError::io(&snapshots_dir))?;
        Ok(Self {
            store,
            snapshots_dir,
            lazy,
            instances,
            metrics,
            dirs: tokio::sync::RwLock::new(()),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    async fn create(
        &self,
        kind: SnapshotKind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, ServiceError> {
        if kind == SnapshotKind::Active {
            if let Some(target) = labels.get(LABEL_TARGET_REF).cloned() {
                if self.store.get(&target).is_ok() {
                    return Err(ServiceError::LayerAvailable(target));
                }
                match self.lazy.classify(&labels, key_namespace(&key)).await? {
                    LayerKind::Plain => {}
                    LayerKind::DataBlob(pulled) => {
                        if let Some(pulled) = pulled {
                            self.fetch_ahead(pulled);
                        }
                        self.commit_lazy(&target, &parent, labels, None).await?;
                        return Err(ServiceError::LayerAvailable(target));
                    }
                    LayerKind::Bootstrap(image) => {
                        self.commit_lazy(&target, &parent, labels, Some(&image))
                            .await?;
                        tracing::info!(snapshot = %target, image_ref = %image.image_ref, "Lode image ready to be served lazily");
                        self.serve_ahead(image);
                        return Err(ServiceError::LayerAvailable(target));
                    }
                }
            }
        }
        let recording = self.dirs.read().await;
        let id = self.store.next_id()?;
        let dir = self.dir(id);
        disk::create_snapshot_dirs(&dir, kind == SnapshotKind::Active)?;
        let now = now_ns();
        let record = SnapshotRecord {
            id,
            kind,
            parent,
            labels: labels.into_iter().collect(),
            created_ns: now,
            updated_ns: now,
            usage: None,
            lazy: false,
            lode_image: None,
        };
        if let Err(error) = self.store.create(&key, &record) {
            disk::remove_dir(dir).await;
            return Err(error.into());
        }
        drop(recording);
        match self.mounts_of(&record).await {
            Ok(mounts) => Ok(mounts),
            Err(error) => {
                // No half-made snapshot: the caller sees the error and nothing else.
                if self.store.remove(&key).is_ok() {
                    disk::remove_dir(self.dir(id)).await;
                }
                Err(error)
            }
        }
    }

    /// Starts serving a Lode image in the background as soon as its
    /// bootstrap layer is pulled, so that its daemon is up and its prefetch
    /// list under way by the time its first container starts (that
    /// container's Prepare then finds the instance mounted: `acquire` is
    /// idempotent). If the image's snapshots went meanwhile, the instance is
    /// released again. A failure is only logged: the first container's
    /// Prepare acquires again and reports it.
    fn serve_ahead(&self, image: LodeImage) {
        let instances = Arc::clone(&self.instances);
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = instances.acquire(&image).await {
                tracing::warn!(image_ref = %image.image_ref, %error, "cannot start serving the image at pull; its first container will try again");
                return;
            }
            // Unreadable records count as in use: nothing is released.
            let _ = release_unless_used(&store, &*instances, &image.bootstrap_digest).await;
        });
    }

    /// Has the daemon of an image being pulled fetch its prefetch list in
    /// the background while the pull goes on. A failure is only logged:
    /// the image's instance fetches the list itself once mounted.
    fn fetch_ahead(&self, pulled: PulledImage) {
        let instances = Arc::clone(&self.instances);
        tokio::spawn(async move {
            if let Err(error) = instances.fetch_ahead(&pulled).await {
                tracing::warn!(image_ref = %pulled.image.image_ref, %error, "cannot fetch the prefetch list ahead; the image's instance fetches it once mounted");
            }
        });
    }

    /// Records a Lode layer as committed: its content comes from the
    /// image's instance, so its directory stays empty.
    async fn commit_lazy(
        &self,
        name: &str,
        parent: &str,
        labels: HashMap<String, String>,
        lode_image: Option<&LodeImage>,
    ) -> Result<(), ServiceError> {
        let _recording = self.dirs.read().await;
        let id = self.store.next_id()?;
        let dir = self.dir(id);
        disk::create_snapshot_dirs(&dir, false)?;
        let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
        labels.insert(LABEL_REMOTE.to_string(), REMOTE_LODE.to_string());
        let now = now_ns();
        let record = SnapshotRecord {
            id,
            kind: SnapshotKind::Committed,
            parent: parent.to_string(),
            labels,
            created_ns: now,
            updated_ns: now,
            usage: Some((0, 0)),
            lazy: true,
            lode_image: lode_image.map(|image| image.bootstrap_digest.clone()),
        };
        if let Err(error) = self.store.create_with_image(name, &record, lode_image) {
            disk::remove_dir(dir).await;
            return Err(error.into());
        }
        Ok(())
    }

    /// The mounts of a view or active snapshot.
    async fn mounts_of(&self, record: &SnapshotRecord) -> Result<Vec<Mount>, ServiceError> {
        let own = self.dir(record.id);
        let upper =
            (record.kind == SnapshotKind::Active).then(|| (own.join("fs"), own.join("work")));
        let mut lowers = Vec::new();
        let mut parent_key = record.parent.clone();
        while !parent_key.is_empty() {
            let parent = self.store.get(&parent_key)?;
            if let Some(digest) = &parent.lode_image {
                let image = self.store.image(digest)?.ok_or_else(|| {
                    ServiceError::InvalidArgument(format!(
                        "snapshot {parent_key} names Lode image {digest}, which is not recorded"
                    ))
                })?;
                lowers.push(self.instances.acquire(&image).await?);
                break;
            }
            if !parent.lazy {
                lowers.push(self.dir(parent.id).join("fs"));
            }
            parent_key = parent.parent;
        }
        Ok(overlay::mounts(&Layers {
            upper,
            own: own.join("fs"),
            lowers,
        }))
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, ServiceError> {
        let record = self.store.get(key)?;
        if record.kind == SnapshotKind::Committed {
            return Err(crate::store::StoreError::FailedPrecondition(format!(
                "snapshot {key} is committed; only active and view snapshots have mounts"
            ))
            .into());
        }
        self.mounts_of(&record).await
    }

    async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ServiceError> {
        let record = self.store.get(key)?;
        let usage = disk::usage(self.dir(record.id).join("fs")).await?;
        self.store
            .commit(key, name, labels.into_iter().collect(), usage)?;
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), ServiceError> {
        let removed = self.store.remove(key)?;
        disk::remove_dir(self.dir(removed.id)).await;
        if let Some(digest) = removed.lode_image {
            release_unless_used(&self.store, &*self.instances, &digest).await?;
        }
        Ok(())
    }

    async fn usage(&self, key: &str) -> Result<(i64, i64), ServiceError> {
        let record = self.store.get(key)?;
        match record.usage {
            Some(usage) if record.kind == SnapshotKind::Committed => Ok(usage),
            _ => disk::usage(self.dir(record.id).join("fs")).await,
        }
    }

    fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, ServiceError> {
        let record = self.store.get(&info.name)?;
        let fieldpaths = fieldpaths.unwrap_or_default();
        let mut labels = record.labels.clone();
        if fieldpaths.is_empty() {
            labels = info.labels.clone().into_iter().collect();
        }
        for path in &fieldpaths {
            if path == "labels" {
                labels = info.labels.clone().into_iter().collect();
            } else if let Some(key) = path.strip_prefix("labels.") {
                match info.labels.get(key) {
                    Some(value) => labels.insert(key.to_string(), value.clone()),
                    None => labels.remove(key),
                };
            } else {
                return Err(ServiceError::InvalidArgument(format!(
                    "cannot update field {path:?} of snapshot {}: only labels are mutable",
                    info.name
                )));
            }
        }
        let updated = self.store.set_labels(&info.name, labels)?;
        Ok(to_info(info.name, updated))
    }

    /// Removes snapshot directories no record names (left by a crash
    /// between making a directory and recording it, or after forgetting it),
    /// and old bootstrap files no image names ([`bootstraps::sweep`]).
    /// Runs at start and on containerd's Cleanup.
    pub async fn cleanup(&self) -> Result<(), ServiceError> {
        self.sweep_bootstraps();
        let _exclusive = self.dirs.write().await;
        let listing = self.store.all()?;
        if !listing.damaged.is_empty() {
            // Their directories cannot be told from orphans: keep them all.
            tracing::warn!(damaged = ?listing.damaged, "snapshot records do not decode; not removing any snapshot directory");
            return Ok(());
        }
        let ids: std::collections::HashSet<u64> = listing.records.values().map(|r| r.id).collect();
        let entries = std::fs::read_dir(&self.snapshots_dir)
            .map_err(ServiceError::io(&self.snapshots_dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !known {
                tracing::info!(path = %entry.path().display(), "removing orphaned snapshot directory");
                disk::remove_dir(entry.path()).await;
            }
        }
        Ok(())
    }

    /// Removes old bootstrap files that neither a recorded image nor a
    /// mounted instance names; nothing while a record cannot be read.
    fn sweep_bootstraps(&self) {
        let named = match (self.store.images(), self.instances.bootstraps_in_use()) {
            (Ok(images), Ok(mounted)) => images
                .into_iter()
                .map(|i| i.bootstrap_path)
                .chain(mounted)
                .collect(),
            (Err(error), _) => {
                tracing::warn!(%error, "image records unreadable; not removing bootstrap files");
                return;
            }
            (_, Err(error)) => {
                tracing::warn!(%error, "not removing bootstrap files");
                return;
            }
        };
        bootstraps::sweep(self.lazy.bootstraps_dir(), &named);
    }
}

fn to_info(name: String, record: SnapshotRecord) -> Info {
    let time = |ns: u64| UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    Info {
        kind: match record.kind {
            SnapshotKind::View => Kind::View,
            SnapshotKind::Active => Kind::Active,
            SnapshotKind::Committed => Kind::Committed,
        },
        name,
        parent: record.parent,
        labels: record.labels.into_iter().collect(),
        created_at: time(record.created_ns),
        updated_at: time(record.updated_ns),
    }
}
