//! containerd's content store: requests that carry a namespace (and a
//! lease), and reading blobs a pull already stored there.
//!
//! A pull stores an image's manifest before it prepares the layers
//! (`lodectl pull` and containerd's own pulls alike). Reading it here
//! instead of from the registry saves the snapshotter a request of every
//! pull (and on registries with token auth, the token exchange before it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{content_client::ContentClient, ReadContentRequest};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Code};
use lode_common::Digest;
use tokio::sync::OnceCell;

/// How long a read of the content store may take before the caller goes
/// to the registry instead.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel with the namespace and lease every request carries.
pub struct Grpc {
    channel: Channel,
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Grpc {
    pub fn new(channel: Channel, namespace: &str, lease: Option<String>) -> Self {
        let ascii = |value: &str| {
            MetadataValue::try_from(value).unwrap_or_else(|_| MetadataValue::from_static("invalid"))
        };
        Self {
            channel,
            namespace: ascii(namespace),
            lease: lease.as_deref().map(ascii),
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert("containerd-lease", lease.clone());
        }
        request
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("containerd at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("read content {digest}: {status}")]
    Read {
        digest: Digest,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("read content {digest}: no answer within {READ_TIMEOUT:?}")]
    Timeout { digest: Digest },
    #[error("content {digest} is larger than {limit} bytes")]
    TooLarge { digest: Digest, limit: u64 },
    #[error("content {digest} does not match its digest")]
    Mismatch { digest: Digest },
}

/// Reads blobs from containerd's content store at `address`, connecting
/// at the first read.
pub struct ContentStore {
    address: PathBuf,
    channel: OnceCell<Channel>,
}

impl ContentStore {
    pub fn new(address: &Path) -> Self {
        Self {
            address: address.to_owned(),
            channel: OnceCell::new(),
        }
    }

    /// Blob `digest` as stored in `namespace`, checked against its digest;
    /// `None` when that namespace has no such blob.
    pub async fn read(
        &self,
        namespace: &str,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, ContentError> {
        tokio::time::timeout(READ_TIMEOUT, self.read_now(namespace, digest, limit))
            .await
            .unwrap_or(Err(ContentError::Timeout { digest: *digest }))
    }

    async fn read_now(
        &self,
        namespace: &str,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, ContentError> {
        let channel = self
            .channel
            .get_or_try_init(|| containerd_client::connect(&self.address))
            .await
            .map_err(|source| ContentError::Connect {
                address: self.address.display().to_string(),
                source,
            })?;
        let grpc = Grpc::new(channel.clone(), namespace, None);
        let failed = |status: tonic::Status| ContentError::Read {
            digest: *digest,
            status: Box::new(status),
        };
        let mut stream = match ContentClient::new(grpc.channel())
            .read(grpc.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(failed(status)),
        };
        let mut bytes = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    bytes.extend_from_slice(&message.data);
                    if bytes.len() as u64 > limit {
                        return Err(ContentError::TooLarge {
                            digest: *digest,
                            limit,
                        });
                    }
                }
                Ok(None) => break,
                // containerd answers a missing blob in the stream's status.
                Err(status) if status.code() == Code::NotFound => return Ok(None),
                Err(status) => return Err(failed(status)),
            }
        }
        if Digest::of(&bytes) != *digest {
            return Err(ContentError::Mismatch { digest: *digest });
        }
        Ok(Some(bytes))
    }
}

/// The namespace of a snapshot key as containerd passes it to a proxy
/// snapshotter (`<namespace>/<id>/<key>`).
pub fn key_namespace(key: &str) -> Option<&str> {
    let mut parts = key.splitn(3, '/');
    let (namespace, id, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = !namespace.is_empty() && !rest.is_empty() && id.parse::<u64>().is_ok();
    valid.then_some(namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_comes_from_containerds_key() {
        assert_eq!(
            key_namespace("k8s.io/42/extract-1 sha256:ab"),
            Some("k8s.io")
        );
        assert_eq!(key_namespace("default/7/a/b"), Some("default"));
        for other in ["plain-key", "ns/notanumber/key", "/1/key", "ns/1/", "ns/1"] {
            assert_eq!(key_namespace(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn no_containerd_is_an_error_naming_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let store = ContentStore::new(&socket);
        let err = store
            .read("default", &Digest::of(b"x"), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, ContentError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("containerd.sock"), "{err}");
    }
}
