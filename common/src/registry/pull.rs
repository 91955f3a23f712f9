//! Reading from a registry: manifests, blob existence, ranges and whole blobs.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use reqwest::header::{ACCEPT, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode};
use tokio::io::AsyncWriteExt;

use super::transport::{
    expect_status, read_limited, retrying, status_error, Access, AttemptError, Target, Transport,
};
use super::{RawManifest, Reference, RegistryError};
use crate::digest::Hasher;
use crate::oci::{
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use crate::Digest;

/// Manifests are small; anything bigger is not a manifest we can use.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

impl Transport {
    pub(crate) async fn pull_manifest(
        &self,
        reference: &Reference,
    ) -> Result<RawManifest, RegistryError> {
        let endpoint = self.endpoint(reference, Access::Pull);
        let url = endpoint.manifest_url(&reference.manifest_selector());
        let target = Target::Manifest(reference);
        let (bytes, content_type, header_digest) = retrying!(self, &endpoint, target, |auth| {
            let response = self
                .request(Method::GET, &url, auth.as_ref())
                .header(ACCEPT, MANIFEST_ACCEPT)
                .send()
                .await?;
            let response = expect_status(response, &[StatusCode::OK]).await?;
            let headers = response.headers();
            let content_type = headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
            let header_digest = headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Digest>().ok());
            let bytes = read_limited(response, MAX_MANIFEST_SIZE).await?;
            Ok((bytes, content_type, header_digest))
        });
        let digest = Digest::of(&bytes);
        for expected in [reference.digest, header_digest].into_iter().flatten() {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    reference: reference.to_string(),
                    digest: expected,
                    actual: digest,
                });
            }
        }
        let media_type = match content_type.filter(|t| is_manifest_media_type(t)) {
            Some(media_type) => media_type,
            None => media_type_from_body(&bytes).ok_or_else(|| RegistryError::Request {
                reference: reference.to_string(),
                what: target.to_string(),
                message: "response is neither an OCI nor a docker v2 manifest or index".to_owned(),
            })?,
        };
        tracing::debug!(reference = %reference, digest = %digest, media_type = %media_type, "pulled manifest");
        Ok(RawManifest {
            bytes: bytes.to_vec(),
            media_type,
            digest,
        })
    }

    pub(crate) async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
        access: Access,
    ) -> Result<bool, RegistryError> {
        let endpoint = self.endpoint(reference, access);
        let url = endpoint.blob_url(digest);
        let exists = retrying!(self, &endpoint, Target::Blob(digest), |auth| {
            let response = self
                .request(Method::HEAD, &url, auth.as_ref())
                .send()
                .await?;
            match response.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(status_error(response).await),
            }
        });
        Ok(exists)
    }

    /// Streams exactly `len` bytes at `offset` of a blob to `sink`, in order,
    /// in pieces as they arrive. A transient failure resumes the request at
    /// the first byte `sink` has not had, so no byte reaches it twice; after
    /// an error `sink` may have had a prefix of the range.
    ///
    /// A host that answers with the whole blob (200, the Range header
    /// ignored) has the range read out of it: the bytes before it are
    /// passed over and the connection is dropped after it. A pull-through
    /// cache (`docker-registry` with `proxy.remoteurl`) answers so for a
    /// blob it has not cached yet, while it fetches it, and with ranges
    /// once it has: refusing would fail the first reads of every blob
    /// behind such a mirror, or send them past it.
    pub(crate) async fn pull_blob_range_with(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), RegistryError> {
        let target = Target::BlobRange {
            digest,
            offset,
            len,
        };
        let short = |actual: u64| RegistryError::ShortRange {
            reference: reference.to_string(),
            digest: *digest,
            offset,
            expected: len,
            actual,
        };
        let refused = |message: String| {
            AttemptError::Fatal(RegistryError::Request {
                reference: reference.to_string(),
                what: target.to_string(),
                message,
            })
        };
        if len == 0 {
            return Ok(());
        }
        let last = offset.checked_add(len - 1).ok_or_else(|| short(0))?;
        let endpoint = self.endpoint(reference, Access::Pull);
        let url = endpoint.blob_url(digest);
        let timeout = self.options.request_timeout;
        let mut received = 0u64;
        retrying!(self, &endpoint, target, progress = received, |auth| {
            let start = offset + received;
            let response = self
                .unbounded_request(Method::GET, &url, auth.as_ref())
                .header(RANGE, format!("bytes={start}-{last}"))
                .send();
            let response = tokio::time::timeout(timeout, response)
                .await
                .map_err(|_| AttemptError::Timeout)??;
            let mut response =
                expect_status(response, &[StatusCode::PARTIAL_CONTENT, StatusCode::OK]).await?;
            let remaining = len - received;
            // Body bytes before the range: all of them in a whole blob.
            let mut before = 0;
            let whole = response.status() == StatusCode::OK;
            if whole {
                if let Some(size) = response.content_length().filter(|n| *n <= last) {
                    return Err(AttemptError::Fatal(short(
                        received.saturating_add(size.saturating_sub(start)),
                    )));
                }
                before = start;
                if start > 0 {
                    tracing::warn!(
                        host = %reference.registry,
                        blob = %digest,
                        passed_over = start,
                        "host answered a range request with the whole blob (a pull-through \
                         cache that has not cached it yet?): reading the range out of it"
                    );
                }
            } else if !resumes_at(&response, start) {
                return Err(refused(format!(
                    "registry answered a request for bytes {start}-{last} with another range"
                )));
            } else if let Some(announced) = response.content_length().filter(|n| *n != remaining) {
                return Err(AttemptError::Fatal(short(
                    received.saturating_add(announced),
                )));
            }
            while let Some(piece) = tokio::time::timeout(timeout, response.chunk())
                .await
                .map_err(|_| AttemptError::Timeout)??
            {
                let skip = before.min(piece.len() as u64);
                before -= skip;
                let mut piece = &piece[skip as usize..];
                if whole {
                    // The rest of the blob is not wanted.
                    let wanted = usize::try_from(len - received).unwrap_or(usize::MAX);
                    piece = &piece[..piece.len().min(wanted)];
                }
                if piece.is_empty() {
                    continue;
                }
                let total = received.saturating_add(piece.len() as u64);
                if total > len {
                    return Err(AttemptError::Fatal(short(total)));
                }
                sink(piece);
                received = total;
                if whole && received == len {
                    break;
                }
            }
            if received != len {
                return Err(AttemptError::Fatal(short(received)));
            }
            Ok(())
        });
        Ok(())
    }

    pub(crate) async fn pull_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        // Capacity grows with what arrives, not with what the caller claims.
        let mut buf = BytesMut::with_capacity(usize::try_from(len.min(1 << 20)).unwrap_or(0));
        self.pull_blob_range_with(reference, digest, offset, len, &mut |piece| {
            buf.extend_from_slice(piece)
        })
        .await?;
        Ok(buf.freeze())
    }

    /// Downloads a whole blob into `sink`, resuming with a Range request
    /// after a transient failure, and verifies its digest.
    async fn pull_blob_into(
        &self,
        reference: &Reference,
        digest: &Digest,
        sink: &mut Sink<'_>,
    ) -> Result<u64, RegistryError> {
        let endpoint = self.endpoint(reference, Access::Pull);
        let url = endpoint.blob_url(digest);
        let target = Target::Blob(digest);
        let timeout = self.options.request_timeout;
        let mut hasher = Hasher::new();
        let mut received = 0u64;
        retrying!(self, &endpoint, target, progress = received, |auth| {
            let mut request = self.unbounded_request(Method::GET, &url, auth.as_ref());
            if received > 0 {
                request = request.header(RANGE, format!("bytes={received}-"));
            }
            let response = tokio::time::timeout(timeout, request.send())
                .await
                .map_err(|_| AttemptError::Timeout)??;
            let mut response =
                expect_status(response, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT]).await?;
            if response.status() == StatusCode::PARTIAL_CONTENT && !resumes_at(&response, received)
            {
                return Err(AttemptError::Fatal(RegistryError::Request {
                    reference: reference.to_string(),
                    what: target.to_string(),
                    message: format!("registry answered a request to resume at byte {received} with another range"),
                }));
            }
            if response.status() == StatusCode::OK && received > 0 {
                tracing::debug!(reference = %reference, digest = %digest, "registry restarted the blob from the beginning");
                received = 0;
                hasher = Hasher::new();
                sink.reset().await?;
            }
            if let Some(total) = response.content_length() {
                sink.reserve(received.saturating_add(total));
            }
            while let Some(chunk) = tokio::time::timeout(timeout, response.chunk())
                .await
                .map_err(|_| AttemptError::Timeout)??
            {
                hasher.update(&chunk);
                sink.write(&chunk).await?;
                received += chunk.len() as u64;
            }
            sink.finish().await?;
            Ok(())
        });
        let actual = hasher.finish();
        if actual != *digest {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                digest: *digest,
                actual,
            });
        }
        Ok(received)
    }

    pub(crate) async fn pull_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let mut buf = BytesMut::new();
        self.pull_blob_into(reference, digest, &mut Sink::Memory(&mut buf))
            .await?;
        Ok(buf.freeze())
    }

    pub(crate) async fn pull_blob_to_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<u64, RegistryError> {
        let io = |source| RegistryError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut sink = Sink::File {
            file: tokio::io::BufWriter::with_capacity(1 << 20, file),
            path,
        };
        let result = self.pull_blob_into(reference, digest, &mut sink).await;
        if result.is_err() {
            // A partial or corrupt file must not pass for the blob later.
            drop(sink);
            if let Err(e) = tokio::fs::remove_file(path).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove incomplete blob file");
            }
        }
        result
    }
}

/// Whether a 206 answer starts at byte `offset`.
fn resumes_at(response: &Response, offset: u64) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split_once('-'))
        .is_some_and(|(start, _)| start.trim().parse::<u64>() == Ok(offset))
}

/// Where a whole-blob download goes.
enum Sink<'a> {
    Memory(&'a mut BytesMut),
    File {
        file: tokio::io::BufWriter<tokio::fs::File>,
        path: &'a Path,
    },
}

impl Sink<'_> {
    fn io_error(path: &Path, source: std::io::Error) -> AttemptError {
        AttemptError::Fatal(RegistryError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    fn reserve(&mut self, total: u64) {
        if let Sink::Memory(buf) = self {
            // Content-Length is advisory; cap the reservation so a bogus
            // header cannot make us allocate gigabytes up front.
            let wanted = usize::try_from(total).unwrap_or(usize::MAX).min(256 << 20);
            buf.reserve(wanted.saturating_sub(buf.len()));
        }
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), AttemptError> {
        match self {
            Sink::Memory(buf) => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
            Sink::File { file, path } => file
                .write_all(chunk)
                .await
                .map_err(|e| Self::io_error(path, e)),
        }
    }

    async fn reset(&mut self) -> Result<(), AttemptError> {
        match self {
            Sink::Memory(buf) => {
                buf.clear();
                Ok(())
            }
            Sink::File { file, path } => {
                file.flush().await.map_err(|e| Self::io_error(path, e))?;
                let inner = file.get_mut();
                inner
                    .set_len(0)
                    .await
                    .map_err(|e| Self::io_error(path, e))?;
                tokio::io::AsyncSeekExt::seek(inner, std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|e| Self::io_error(path, e))?;
                Ok(())
            }
        }
    }

    async fn finish(&mut self) -> Result<(), AttemptError> {
        match self {
            Sink::Memory(_) => Ok(()),
            Sink::File { file, path } => file.flush().await.map_err(|e| Self::io_error(path, e)),
        }
    }
}

fn is_manifest_media_type(media_type: &str) -> bool {
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_LIST,
    ]
    .contains(&media_type)
}

/// The media type of a manifest or index response body (used when the
/// response's `Content-Type` is not one): its `mediaType` if that names a
/// manifest or index, else its shape, as OCI manifests may omit `mediaType`.
/// `None` for anything else, JSON or not.
pub fn media_type_from_body(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let shape: Shape = serde_json::from_slice(bytes).ok()?;
    match (shape.media_type, shape.manifests, shape.layers) {
        (Some(media_type), _, _) if is_manifest_media_type(&media_type) => Some(media_type),
        (None, Some(_), None) => Some(MEDIA_TYPE_OCI_INDEX.to_owned()),
        (None, None, Some(_)) => Some(MEDIA_TYPE_OCI_MANIFEST.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_lists_every_manifest_media_type() {
        let accepted: Vec<&str> = MANIFEST_ACCEPT.split(',').map(str::trim).collect();
        for media_type in [
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_DOCKER_MANIFEST,
            MEDIA_TYPE_DOCKER_LIST,
        ] {
            assert!(accepted.contains(&media_type), "{media_type}");
        }
    }

    #[test]
    fn media_type_is_inferred_from_the_body() {
        assert_eq!(
            media_type_from_body(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MEDIA_TYPE_OCI_INDEX)
        );
        assert_eq!(
            media_type_from_body(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(MEDIA_TYPE_OCI_MANIFEST)
        );
        assert_eq!(
            media_type_from_body(
                format!(r#"{{"mediaType":"{MEDIA_TYPE_DOCKER_MANIFEST}","layers":[]}}"#).as_bytes()
            )
            .as_deref(),
            Some(MEDIA_TYPE_DOCKER_MANIFEST)
        );
        assert_eq!(media_type_from_body(br#"{"mediaType":"text/plain"}"#), None);
        assert_eq!(media_type_from_body(b"not json"), None);
    }
}
