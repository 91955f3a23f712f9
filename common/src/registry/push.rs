//! Writing to a registry: blob uploads and manifests.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderValue, CONTENT_RANGE, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use tokio::io::AsyncReadExt;

use super::transport::{
    expect_status, location, retrying, Access, AttemptError, Endpoint, Target, Transport,
};
use super::{Reference, RegistryError};
use crate::Digest;

/// Size of one PATCH of a file upload: bounded so that every request has a
/// meaningful deadline and memory use stays flat for multi-GiB blobs.
pub(crate) const UPLOAD_CHUNK_SIZE: usize = 8 << 20;
const OCTET_STREAM: &str = "application/octet-stream";

impl Transport {
    /// `POST /blobs/uploads/`: opens an upload session.
    async fn start_upload(
        &self,
        endpoint: &Endpoint<'_>,
        auth: Option<&HeaderValue>,
    ) -> Result<Url, AttemptError> {
        let response = self
            .request(Method::POST, &endpoint.upload_url(), auth)
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await?;
        let response = expect_status(response, &[StatusCode::ACCEPTED]).await?;
        location(&response)
    }

    /// `PUT <location>?digest=`: closes the session, optionally with the
    /// (last part of the) content.
    async fn finish_upload(
        &self,
        endpoint: &Endpoint<'_>,
        auth: Option<&HeaderValue>,
        mut location: Url,
        digest: &Digest,
        body: Bytes,
    ) -> Result<(), AttemptError> {
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let response = self
            .request_to_location(Method::PUT, &location, endpoint, auth)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .body(body)
            .send()
            .await?;
        expect_status(response, &[StatusCode::CREATED]).await?;
        Ok(())
    }

    pub(crate) async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        if self.blob_exists(reference, digest, Access::Push).await? {
            tracing::debug!(reference = %reference, digest = %digest, "blob already in registry");
            return Ok(());
        }
        let endpoint = self.endpoint(reference, Access::Push);
        retrying!(self, &endpoint, Target::BlobUpload(digest), |auth| {
            let location = self.start_upload(&endpoint, auth.as_ref()).await?;
            self.finish_upload(&endpoint, auth.as_ref(), location, digest, data.clone())
                .await
        });
        tracing::debug!(reference = %reference, digest = %digest, size = data.len(), "pushed blob");
        Ok(())
    }

    pub(crate) async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let io = |source| {
            AttemptError::Fatal(RegistryError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        if self.blob_exists(reference, digest, Access::Push).await? {
            tracing::debug!(reference = %reference, digest = %digest, "blob already in registry");
            return Ok(());
        }
        let endpoint = self.endpoint(reference, Access::Push);
        let size = retrying!(self, &endpoint, Target::BlobUpload(digest), |auth| {
            // A failed chunk leaves the session in an unknown state, so
            // every attempt starts a new session from the file's start.
            let mut file = tokio::fs::File::open(path).await.map_err(io)?;
            let size = file.metadata().await.map_err(io)?.len();
            let mut location = self.start_upload(&endpoint, auth.as_ref()).await?;
            let mut sent = 0u64;
            while sent < size {
                let chunk_len = usize::try_from(size - sent)
                    .unwrap_or(usize::MAX)
                    .min(UPLOAD_CHUNK_SIZE);
                let chunk = read_chunk(&mut file, chunk_len).await.map_err(io)?;
                let last = sent + chunk.len() as u64 - 1;
                let response = self
                    .request_to_location(Method::PATCH, &location, &endpoint, auth.as_ref())
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_RANGE, format!("{sent}-{last}"))
                    .body(chunk)
                    .send()
                    .await?;
                let response = expect_status(response, &[StatusCode::ACCEPTED]).await?;
                location = super::transport::location(&response)?;
                sent = last + 1;
            }
            self.finish_upload(&endpoint, auth.as_ref(), location, digest, Bytes::new())
                .await?;
            Ok(size)
        });
        tracing::debug!(reference = %reference, digest = %digest, size, path = %path.display(), "pushed blob from file");
        Ok(())
    }

    pub(crate) async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest.filter(|expected| *expected != digest) {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                digest: expected,
                actual: digest,
            });
        }
        let content_type =
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::Request {
                reference: reference.to_string(),
                what: format!("manifest {digest}"),
                message: format!("media type {media_type:?} is not a valid header value"),
            })?;
        let endpoint = self.endpoint(reference, Access::Push);
        let selector = reference.tag.clone().unwrap_or_else(|| digest.to_string());
        let url = endpoint.manifest_url(&selector);
        let body = Bytes::from(bytes);
        let target_reference = reference.with_digest(digest);
        let stored = retrying!(
            self,
            &endpoint,
            Target::Manifest(&target_reference),
            |auth| {
                let response = self
                    .request(Method::PUT, &url, auth.as_ref())
                    .header(CONTENT_TYPE, content_type.clone())
                    .body(body.clone())
                    .send()
                    .await?;
                let response = expect_status(response, &[StatusCode::CREATED]).await?;
                Ok(response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<Digest>().ok()))
            }
        );
        if let Some(stored) = stored.filter(|stored| *stored != digest) {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                digest,
                actual: stored,
            });
        }
        tracing::debug!(reference = %reference, digest = %digest, media_type, "pushed manifest");
        Ok(digest)
    }
}

/// Reads exactly `len` bytes (the file is expected to hold them).
async fn read_chunk(file: &mut tokio::fs::File, len: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let mut limited = (&mut *file).take((len - buf.len()) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file became shorter while it was being uploaded",
            ));
        }
    }
    Ok(buf.freeze())
}
