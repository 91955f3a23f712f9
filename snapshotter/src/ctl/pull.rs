//! `lodectl pull IMAGE`: pulls an image into containerd the way a remote
//! snapshotter needs it. containerd 1.6's own pull downloads every layer
//! before unpacking, so it can never be lazy; this one stores only the
//! manifest and config, asks the snapshotter to prepare each layer with the
//! labels that identify it, and downloads and applies a layer only when the
//! snapshotter cannot provide it (plain OCI layers).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use containerd_client::services::v1::{
    leases_client::LeasesClient, snapshots::snapshots_client::SnapshotsClient,
    snapshots::CommitSnapshotRequest, snapshots::PrepareSnapshotRequest,
    snapshots::RemoveSnapshotRequest, snapshots::StatSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    Image, UpdateImageRequest,
};
use containerd_client::tonic::{self, Code};
use lode_common::contract::{
    self, LABEL_GC_REF_CONTENT_CONFIG, LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST, LABEL_TARGET_REF,
};
use lode_common::oci;
use lode_common::registry::{Reference, RegistryClient, RegistryOptions};
use lode_common::Digest;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::pull_content;
use super::{runtime, CtlError};
use crate::content::Grpc;
use crate::convert::PlatformSpec;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image: HOST[:PORT]/REPO[:TAG|@DIGEST].
    pub image: Reference,
    /// Use plain HTTP for the registry (loopback registries always do).
    #[arg(long)]
    pub plain_http: bool,
    /// containerd namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// containerd's gRPC socket.
    #[arg(long, short = 'a', default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// The snapshotter to unpack into (as named in containerd's config).
    #[arg(long, default_value = contract::DEFAULT_SNAPSHOTTER_NAME)]
    pub snapshotter: String,
    /// Platform to pick from an index.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: PlatformSpec,
    /// Docker config with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("containerd at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("containerd {what}: {status}")]
    Containerd {
        what: String,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("{image}: {message}")]
    Image { image: String, message: String },
    #[error(transparent)]
    Registry(#[from] lode_common::registry::RegistryError),
}

impl PullError {
    pub(super) fn containerd(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let what = what.into();
        move |status| Self::Containerd {
            what,
            status: Box::new(status),
        }
    }
}

/// What a pull did, for the summary line.
#[derive(Debug, Default)]
pub struct PullReport {
    pub lazy_layers: usize,
    pub unpacked_layers: usize,
    pub metadata_bytes: u64,
    pub layer_bytes: u64,
}

pub fn run(args: PullArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let started = std::time::Instant::now();
    let report = runtime()?.block_on(pull(&args))?;
    writeln!(
        out,
        "pulled {} into namespace {} ({}): {} layer(s) lazy, {} unpacked; downloaded {} bytes of manifest and config, {} bytes of layers in {:.2?}",
        args.image,
        args.namespace,
        args.snapshotter,
        report.lazy_layers,
        report.unpacked_layers,
        report.metadata_bytes,
        report.layer_bytes,
        started.elapsed()
    )
    .map_err(|source| CtlError::Io {
        what: "write the summary".into(),
        source,
    })
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}").as_bytes()))
            ),
        };
        chain.push(next);
    }
    chain
}

/// What the registry says about the image: its manifest and config.
struct Metadata {
    raw: lode_common::registry::RawManifest,
    manifest: ImageManifest,
    config_bytes: Vec<u8>,
    /// Chain ids of the layers, bottom first.
    chain: Vec<String>,
    /// Bytes of index, manifest and config.
    bytes: u64,
}

pub async fn pull(args: &PullArgs) -> Result<PullReport, PullError> {
    let client = RegistryClient::new(RegistryOptions {
        plain_http: args.plain_http,
        docker_config: args.docker_config.clone(),
        ..RegistryOptions::default()
    })?;
    // containerd is made ready while the registry answers.
    let (metadata, session) = tokio::join!(fetch_metadata(args, &client), open_session(args));
    let (grpc, lease_id) = session?;
    let result = match metadata {
        Ok(m) => unpack(args, &grpc, &client, &m)
            .await
            .map(|report| PullReport {
                metadata_bytes: m.bytes,
                ..report
            }),
        Err(error) => Err(error),
    };
    let _ = LeasesClient::new(grpc.channel())
        .delete(grpc.request(DeleteLeaseRequest {
            id: lease_id,
            sync: false,
        }))
        .await;
    result
}

/// Connects to containerd and creates the lease the pull's content and
/// snapshots are made under; returns the request helper and the lease.
async fn open_session(args: &PullArgs) -> Result<(Grpc, String), PullError> {
    let channel = containerd_client::connect(&args.address)
        .await
        .map_err(|e| PullError::Connect {
            address: args.address.display().to_string(),
            message: format!("{e}; is containerd running?"),
        })?;
    let lease_id = format!("lodectl-pull-{}", now_nanos());
    let grpc = Grpc::new(channel.clone(), &args.namespace, Some(lease_id.clone()));
    LeasesClient::new(channel)
        .create(grpc.request(CreateLeaseRequest {
            id: lease_id.clone(),
            labels: HashMap::new(),
        }))
        .await
        .map_err(PullError::containerd("create lease"))?;
    Ok((grpc, lease_id))
}

/// The manifest (through an index if needed) and the config.
async fn fetch_metadata(args: &PullArgs, client: &RegistryClient) -> Result<Metadata, PullError> {
    let image_name = args.image.to_string();
    let bad = |message: String| PullError::Image {
        image: image_name.clone(),
        message,
    };
    let mut raw = client.pull_manifest(&args.image).await?;
    let mut bytes = raw.bytes.len() as u64;
    if raw.media_type == oci::MEDIA_TYPE_OCI_INDEX || raw.media_type == oci::MEDIA_TYPE_DOCKER_LIST
    {
        let index: ImageIndex =
            serde_json::from_slice(&raw.bytes).map_err(|e| bad(format!("index: {e}")))?;
        let chosen = index
            .manifests()
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| args.platform.matches(p))
            })
            .ok_or_else(|| bad(format!("the index has no manifest for {}", args.platform)))?;
        let digest: Digest = chosen
            .digest()
            .to_string()
            .parse()
            .map_err(|e| bad(format!("{e}")))?;
        raw = client
            .pull_manifest(&args.image.with_digest(digest))
            .await?;
        bytes += raw.bytes.len() as u64;
    }
    let manifest: ImageManifest =
        serde_json::from_slice(&raw.bytes).map_err(|e| bad(format!("manifest: {e}")))?;
    let config_digest: Digest = manifest
        .config()
        .digest()
        .to_string()
        .parse()
        .map_err(|e| bad(format!("config digest: {e}")))?;
    let config_bytes = client
        .pull_blob(&args.image, &config_digest)
        .await?
        .to_vec();
    bytes += config_bytes.len() as u64;
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config: {e}")))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        return Err(bad(format!(
            "the config lists {} diff ids for {} layers",
            diff_ids.len(),
            manifest.layers().len()
        )));
    }
    if diff_ids.is_empty() {
        return Err(bad("the image has no layers".into()));
    }
    Ok(Metadata {
        raw,
        manifest,
        config_bytes,
        chain: chain_ids(&diff_ids),
        bytes,
    })
}

async fn unpack(
    args: &PullArgs,
    grpc: &Grpc,
    client: &RegistryClient,
    metadata: &Metadata,
) -> Result<PullReport, PullError> {
    let Metadata {
        raw,
        manifest,
        config_bytes,
        chain,
        ..
    } = metadata;
    let top_chain = chain
        .last()
        .expect("an image with layers has a top chain id");
    // Content: config and manifest, with the labels that keep what they
    // reference alive through containerd's garbage collection.
    let config_desc = manifest.config();
    let mut config_labels = HashMap::new();
    config_labels.insert(
        contract::gc_ref_snapshot(&args.snapshotter),
        top_chain.to_string(),
    );
    pull_content::store(
        grpc,
        config_desc.digest().as_ref(),
        config_bytes,
        config_labels,
    )
    .await?;
    let mut manifest_labels = HashMap::new();
    manifest_labels.insert(
        LABEL_GC_REF_CONTENT_CONFIG.to_string(),
        config_desc.digest().to_string(),
    );
    for (i, layer) in manifest.layers().iter().enumerate() {
        manifest_labels.insert(
            contract::gc_ref_content_layer(i),
            layer.digest().to_string(),
        );
    }
    pull_content::store(grpc, &raw.digest.to_string(), &raw.bytes, manifest_labels).await?;

    let all_layers = manifest
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut snapshots = SnapshotsClient::new(grpc.channel());
    let mut report = PullReport::default();
    let mut parent = String::new();
    for (layer, chain_id) in manifest.layers().iter().zip(chain) {
        let stat = snapshots
            .stat(grpc.request(StatSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: chain_id.clone(),
            }))
            .await;
        if stat.is_ok() {
            report.lazy_layers += usize::from(is_lode_layer(layer));
            report.unpacked_layers += usize::from(!is_lode_layer(layer));
            parent = chain_id.clone();
            continue;
        }
        let key = format!("extract-{}-{chain_id}", now_nanos());
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
        let prepared = snapshots
            .prepare(grpc.request(PrepareSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels,
            }))
            .await;
        match prepared {
            Err(status) if status.code() == Code::AlreadyExists => {
                tracing::info!(layer = %layer.digest(), chain_id, "layer available without download");
                report.lazy_layers += 1;
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
            Ok(response) => {
                let mounts = response.into_inner().mounts;
                let applied = apply_layer(grpc, client, &args.image, layer, mounts).await;
                let committed = match applied {
                    Ok(bytes) => {
                        report.layer_bytes += bytes;
                        snapshots
                            .commit(grpc.request(CommitSnapshotRequest {
                                snapshotter: args.snapshotter.clone(),
                                name: chain_id.clone(),
                                key: key.clone(),
                                labels: HashMap::new(),
                            }))
                            .await
                            .map(|_| ())
                            .map_err(PullError::containerd(format!(
                                "commit layer {}",
                                layer.digest()
                            )))
                    }
                    Err(error) => Err(error),
                };
                if let Err(error) = committed {
                    let _ = snapshots
                        .remove(grpc.request(RemoveSnapshotRequest {
                            snapshotter: args.snapshotter.clone(),
                            key,
                        }))
                        .await;
                    return Err(error);
                }
                report.unpacked_layers += 1;
            }
        }
        parent = chain_id.clone();
    }

    create_image(grpc, args, manifest, raw).await?;
    Ok(report)
}

fn is_lode_layer(layer: &oci_spec::image::Descriptor) -> bool {
    lode_common::image::is_data_blob(layer) || lode_common::image::is_bootstrap(layer)
}

/// Downloads a plain layer into containerd's content store and applies it
/// to the prepared snapshot with containerd's diff service.
async fn apply_layer(
    grpc: &Grpc,
    client: &RegistryClient,
    reference: &Reference,
    layer: &oci_spec::image::Descriptor,
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

async fn create_image(
    grpc: &Grpc,
    args: &PullArgs,
    manifest: &ImageManifest,
    raw: &lode_common::registry::RawManifest,
) -> Result<(), PullError> {
    let media_type = manifest
        .media_type()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_else(|| raw.media_type.clone());
    let now = prost_types::Timestamp::from(SystemTime::now());
    let image = Image {
        name: args.image.to_string(),
        labels: HashMap::new(),
        target: Some(containerd_client::types::Descriptor {
            media_type,
            digest: raw.digest.to_string(),
            size: raw.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: Some(now),
        updated_at: Some(now),
    };
    let mut images =
        containerd_client::services::v1::images_client::ImagesClient::new(grpc.channel());
    let created = images
        .create(grpc.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        }))
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::AlreadyExists => images
            .update(grpc.request(UpdateImageRequest {
                image: Some(image),
                update_mask: None,
                source_date_epoch: None,
            }))
            .await
            .map(|_| ())
            .map_err(PullError::containerd("update image record")),
        Err(status) => Err(PullError::containerd("create image record")(status)),
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(chain[1], expected);
        assert!(chain_ids(&[]).is_empty());
    }

    #[tokio::test]
    async fn without_containerd_the_error_names_its_socket() {
        // Port 1 on loopback refuses connections at once.
        let args = PullArgs {
            image: "127.0.0.1:1/app:v1".parse().unwrap(),
            plain_http: true,
            namespace: "default".into(),
            address: PathBuf::from("/nonexistent/containerd.sock"),
            snapshotter: contract::DEFAULT_SNAPSHOTTER_NAME.into(),
            platform: "linux/amd64".parse().unwrap(),
            docker_config: None,
        };
        let err = pull(&args).await.unwrap_err();
        assert!(
            matches!(&err, PullError::Connect { address, .. } if address == "/nonexistent/containerd.sock"),
            "{err}"
        );
        assert!(err.to_string().contains("is containerd running?"), "{err}");
    }
}
