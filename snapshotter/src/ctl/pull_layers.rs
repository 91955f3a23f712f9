//! The layers of `lodectl pull`: each is prepared through the snapshotter
//! with the labels that identify it; a Lode layer is then already there,
//! and a plain one is downloaded and applied with containerd's diff service.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::tonic::Code;
use lode_common::contract::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
    LABEL_TARGET_REF,
};
use lode_common::registry::{RawManifest, Reference, RegistryClient};
use lode_common::Digest;
use oci_spec::image::{Descriptor, ImageManifest};

use super::pull::{now_nanos, PullArgs, PullError, PullReport};
use super::pull_content;
use crate::content::Grpc;

/// Prepares the manifest's layers bottom up, as the snapshots `chain`
/// names (one chain id per layer); returns what was lazy and unpacked.
pub(super) async fn prepare_layers(
    args: &PullArgs,
    grpc: &Grpc,
    client: &RegistryClient,
    manifest: &ImageManifest,
    raw: &RawManifest,
    chain: &[String],
) -> Result<PullReport, PullError> {
    let all_layers = manifest
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut report = PullReport::default();
    let mut parent = String::new();
    for (layer, chain_id) in manifest.layers().iter().zip(chain) {
        let labels: HashMap<String, String> = [
            (LABEL_TARGET_REF, chain_id.clone()),
            (LABEL_IMAGE_REF, args.image.to_string()),
            (LABEL_MANIFEST_DIGEST, raw.digest.to_string()),
            (LABEL_LAYER_DIGEST, layer.digest().to_string()),
            (LABEL_IMAGE_LAYERS, all_layers.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let step = Step {
            args,
            grpc,
            layer,
            chain_id,
            parent: &parent,
        };
        match step.prepare(client, labels).await? {
            Prepared::Lazy => report.lazy_layers += 1,
            Prepared::Unpacked(bytes) => {
                report.unpacked_layers += 1;
                report.layer_bytes += bytes;
            }
        }
        parent = chain_id.clone();
    }
    Ok(report)
}

/// What preparing a layer came to.
enum Prepared {
    /// The snapshotter has it without a download (a Lode layer).
    Lazy,
    /// Downloaded (this many bytes; 0 if in the content store already) and
    /// applied.
    Unpacked(u64),
}

/// One layer to prepare on top of `parent`.
struct Step<'a> {
    args: &'a PullArgs,
    grpc: &'a Grpc,
    layer: &'a Descriptor,
    chain_id: &'a str,
    parent: &'a str,
}

impl Step<'_> {
    async fn prepare(
        &self,
        client: &RegistryClient,
        labels: HashMap<String, String>,
    ) -> Result<Prepared, PullError> {
        let (args, grpc, layer) = (self.args, self.grpc, self.layer);
        let mut snapshots = SnapshotsClient::new(grpc.channel());
        let stat = snapshots
            .stat(grpc.request(StatSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: self.chain_id.to_owned(),
            }))
            .await;
        if stat.is_ok() {
            return Ok(if is_lode_layer(layer) {
                Prepared::Lazy
            } else {
                Prepared::Unpacked(0)
            });
        }
        let key = format!("extract-{}-{}", now_nanos(), self.chain_id);
        let prepared = snapshots
            .prepare(grpc.request(PrepareSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: key.clone(),
                parent: self.parent.to_owned(),
                labels,
            }))
            .await;
        let mounts = match prepared {
            Err(status) if status.code() == Code::AlreadyExists => {
                tracing::info!(layer = %layer.digest(), chain_id = %self.chain_id, "layer available without download");
                return Ok(Prepared::Lazy);
            }
            Err(status)
                if status.code() == Code::NotFound && status.message().contains("snapshotter") =>
            {
                return Err(PullError::containerd(format!(
                    "snapshotter {:?} (is it configured as a proxy plugin?)",
                    args.snapshotter
                ))(status));
            }
            Err(status) => {
                return Err(PullError::containerd(format!(
                    "prepare layer {}",
                    layer.digest()
                ))(status))
            }
            Ok(response) => response.into_inner().mounts,
        };
        let applied = apply_layer(grpc, client, &args.image, layer, mounts).await;
        let committed = match applied {
            Ok(bytes) => snapshots
                .commit(grpc.request(CommitSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    name: self.chain_id.to_owned(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map(|_| bytes)
                .map_err(PullError::containerd(format!(
                    "commit layer {}",
                    layer.digest()
                ))),
            Err(error) => Err(error),
        };
        if committed.is_err() {
            let _ = snapshots
                .remove(grpc.request(RemoveSnapshotRequest {
                    snapshotter: args.snapshotter.clone(),
                    key,
                }))
                .await;
        }
        committed.map(Prepared::Unpacked)
    }
}

fn is_lode_layer(layer: &Descriptor) -> bool {
    lode_common::image::is_data_blob(layer) || lode_common::image::is_bootstrap(layer)
}

/// Downloads a plain layer into containerd's content store and applies it
/// to the prepared snapshot with containerd's diff service.
async fn apply_layer(
    grpc: &Grpc,
    client: &RegistryClient,
    reference: &Reference,
    layer: &Descriptor,
    mounts: Vec<containerd_client::types::Mount>,
) -> Result<u64, PullError> {
    let digest: Digest = layer
        .digest()
        .to_string()
        .parse()
        .map_err(|e| PullError::Image {
            image: reference.to_string(),
            message: format!("layer digest: {e}"),
        })?;
    let downloaded = if pull_content::exists(grpc, &digest.to_string()).await {
        0
    } else {
        let blob = client.pull_blob(reference, &digest).await?;
        pull_content::store(grpc, &digest.to_string(), &blob, HashMap::new()).await?;
        blob.len() as u64
    };
    pull_content::apply(grpc, layer, mounts).await?;
    Ok(downloaded)
}
