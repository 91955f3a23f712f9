//! containerd calls of `lodectl pull`: writes into the content store, and
//! applying a layer.

use std::collections::HashMap;

use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, ApplyRequest, Info, InfoRequest,
    UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::Code;

use super::pull::PullError;
use crate::content::Grpc;

/// Size of one content write message (gRPC's default limit is 4 MiB).
const WRITE_CHUNK: usize = 1 << 20;

/// Whether the content store has `digest`.
pub async fn exists(grpc: &Grpc, digest: &str) -> bool {
    ContentClient::new(grpc.channel())
        .info(grpc.request(InfoRequest {
            digest: digest.to_string(),
        }))
        .await
        .is_ok()
}

/// Writes `bytes` as content `digest` with `labels` (or, when it is there
/// already, sets the labels on it).
pub async fn store(
    grpc: &Grpc,
    digest: &str,
    bytes: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let mut content = ContentClient::new(grpc.channel());
    if exists(grpc, digest).await {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        content
            .update(grpc.request(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_string(),
                    labels,
                    ..Info::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(PullError::containerd(format!("label content {digest}")))?;
        return Ok(());
    }
    let reference = format!("lodectl-{digest}");
    let total = bytes.len() as i64;
    let mut messages = Vec::new();
    for (i, chunk) in bytes.chunks(WRITE_CHUNK).enumerate() {
        messages.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            offset: (i * WRITE_CHUNK) as i64,
            data: chunk.to_vec(),
            labels: HashMap::new(),
        });
    }
    messages.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference,
        total,
        expected: digest.to_string(),
        offset: total,
        data: Vec::new(),
        labels,
    });
    let response = content
        .write(grpc.request(futures_util::stream::iter(messages)))
        .await;
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == Code::AlreadyExists => return Ok(()),
        Err(status) => {
            return Err(PullError::containerd(format!("write content {digest}"))(
                status,
            ))
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(()),
            Err(status) => {
                return Err(PullError::containerd(format!("write content {digest}"))(
                    status,
                ))
            }
        }
    }
}

/// Applies a layer (already in the content store) to a prepared snapshot.
pub async fn apply(
    grpc: &Grpc,
    layer: &oci_spec::image::Descriptor,
    mounts: Vec<containerd_client::types::Mount>,
) -> Result<(), PullError> {
    DiffClient::new(grpc.channel())
        .apply(grpc.request(ApplyRequest {
            diff: Some(containerd_client::types::Descriptor {
                media_type: layer.media_type().to_string(),
                digest: layer.digest().to_string(),
                size: layer.size() as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        }))
        .await
        .map_err(PullError::containerd(format!(
            "apply layer {}",
            layer.digest()
        )))?;
    Ok(())
}
