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
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    Image, UpdateImageRequest,
};
use containerd_client::tonic::{self, Code};
use lode_common::contract::{self, LABEL_GC_REF_CONTENT_CONFIG};
use lode_common::oci;
use lode_common::registry::{RawManifest, Reference, RegistryClient, RegistryOptions};
use lode_common::Digest;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::pull_content;
use super::pull_layers::prepare_layers;
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

pub async fn pull(args: &PullArgs) -> Result<PullReport, PullError> {
    let client = RegistryClient::new(RegistryOptions {
        plain_http: args.plain_http,
        docker_config: args.docker_config.clone(),
        ..RegistryOptions::default()
    })?;
    // containerd is made ready while the registry answers.
    let (manifest, session) = tokio::join!(fetch_manifest(args, &client), open_session(args));
    let (grpc, lease_id) = session?;
    let result = match manifest {
        Ok(manifest) => unpack(args, &grpc, &client, &manifest).await,
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

/// The image's manifest, through an index if needed.
struct Manifest {
    raw: RawManifest,
    manifest: ImageManifest,
    /// Bytes of index and manifest.
    bytes: u64,
}

/// The image's config and the layers' diff_ids it lists.
struct Config {
    bytes: Vec<u8>,
    diff_ids: Vec<String>,
}

fn bad_image(args: &PullArgs, message: String) -> PullError {
    PullError::Image {
        image: args.image.to_string(),
        message,
    }
}

async fn fetch_manifest(args: &PullArgs, client: &RegistryClient) -> Result<Manifest, PullError> {
    let bad = |message| bad_image(args, message);
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
    if manifest.layers().is_empty() {
        return Err(bad("the image has no layers".into()));
    }
    Ok(Manifest {
        raw,
        manifest,
        bytes,
    })
}

async fn fetch_config(
    args: &PullArgs,
    client: &RegistryClient,
    manifest: &ImageManifest,
) -> Result<Config, PullError> {
    let bad = |message| bad_image(args, message);
    let digest: Digest = manifest
        .config()
        .digest()
        .to_string()
        .parse()
        .map_err(|e| bad(format!("config digest: {e}")))?;
    let bytes = client.pull_blob(&args.image, &digest).await?.to_vec();
    let config: ImageConfiguration =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("config: {e}")))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != manifest.layers().len() {
        return Err(bad(format!(
            "the config lists {} diff ids for {} layers",
            diff_ids.len(),
            manifest.layers().len()
        )));
    }
    Ok(Config { bytes, diff_ids })
}

/// The layers' diff_ids as the manifest's `containerd.io/uncompressed`
/// annotations give them (Lode and eStargz images have them), if every
/// layer has a well-formed one.
fn annotated_diff_ids(manifest: &ImageManifest) -> Option<Vec<String>> {
    manifest
        .layers()
        .iter()
        .map(|layer| {
            let value = layer
                .annotations()
                .as_ref()?
                .get(oci::ANNOTATION_UNCOMPRESSED)?;
            value.parse::<Digest>().ok().map(|_| value.clone())
        })
        .collect()
}

/// Stores the manifest, prepares the layers and stores the config, then
/// creates the image record. When the manifest names the layers' diff_ids,
/// the layers are prepared while the config arrives (the snapshotter
/// fetches a Lode image's bootstrap meanwhile), and the config must agree.
async fn unpack(
    args: &PullArgs,
    grpc: &Grpc,
    client: &RegistryClient,
    fetched: &Manifest,
) -> Result<PullReport, PullError> {
    let Manifest { raw, manifest, .. } = fetched;
    store_manifest(grpc, manifest, raw).await?;
    let (config, report, chain) = match annotated_diff_ids(manifest) {
        Some(annotated) => {
            let chain = chain_ids(&annotated);
            let (config, layers) = tokio::join!(
                fetch_config(args, client, manifest),
                prepare_layers(args, grpc, client, manifest, raw, &chain)
            );
            let (config, report) = (config?, layers?);
            if config.diff_ids != annotated {
                return Err(bad_image(
                    args,
                    format!(
                        "the layers' {} annotations disagree with the config's diff_ids",
                        oci::ANNOTATION_UNCOMPRESSED
                    ),
                ));
            }
            (config, report, chain)
        }
        None => {
            let config = fetch_config(args, client, manifest).await?;
            let chain = chain_ids(&config.diff_ids);
            let report = prepare_layers(args, grpc, client, manifest, raw, &chain).await?;
            (config, report, chain)
        }
    };
    let top_chain = chain.last().cloned().unwrap_or_default();
    store_config(grpc, args, manifest, &config.bytes, top_chain).await?;
    create_image(grpc, args, manifest, raw).await?;
    Ok(PullReport {
        metadata_bytes: fetched.bytes + config.bytes.len() as u64,
        ..report
    })
}

/// Stores the manifest in containerd's content store (where the
/// snapshotter reads it when it prepares the layers), with the labels that
/// keep what it references alive through garbage collection.
async fn store_manifest(
    grpc: &Grpc,
    manifest: &ImageManifest,
    raw: &RawManifest,
) -> Result<(), PullError> {
    let mut labels = HashMap::new();
    labels.insert(
        LABEL_GC_REF_CONTENT_CONFIG.to_string(),
        manifest.config().digest().to_string(),
    );
    for (i, layer) in manifest.layers().iter().enumerate() {
        labels.insert(
            contract::gc_ref_content_layer(i),
            layer.digest().to_string(),
        );
    }
    pull_content::store(grpc, &raw.digest.to_string(), &raw.bytes, labels).await
}

/// Stores the config, labelled to keep the image's top snapshot.
async fn store_config(
    grpc: &Grpc,
    args: &PullArgs,
    manifest: &ImageManifest,
    bytes: &[u8],
    top_chain: String,
) -> Result<(), PullError> {
    let labels = HashMap::from([(contract::gc_ref_snapshot(&args.snapshotter), top_chain)]);
    pull_content::store(grpc, manifest.config().digest().as_ref(), bytes, labels).await
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

pub(super) fn now_nanos() -> u128 {
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
