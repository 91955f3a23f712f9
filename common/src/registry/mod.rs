//! Registry access (OCI distribution API) for `lodectl` and `lode-fsd`.
//!
//! Wraps `oci-client` with what a lazily-loading filesystem needs on top:
//! ranged blob reads, retries with backoff on transient failures, a deadline on
//! every request, token refresh on 401, credentials from `~/.docker/config.json`,
//! and plain HTTP only for loopback hosts or when asked.

mod auth;
mod credential_helper;
mod credentials;
#[cfg(test)]
mod fake_server;
mod hosts;
mod pull;
mod push;
mod reference;
#[cfg(test)]
mod tests;
mod tls;
mod transport;

pub use auth::Challenge;
pub use credentials::{CredentialStore, Credentials};
pub use hosts::{
    hosts_for, parse_hosts, Attempt, Capability, HostClients, HostHeaders, HostsError, RegistryHost,
};
pub use pull::{media_type_from_body, MAX_MANIFEST_SIZE};
pub use reference::{Reference, ReferenceError};
pub use tls::TlsOptions;
pub use transport::error_body_message;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::Digest;

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry (loopback hosts always use plain HTTP).
    pub plain_http: bool,
    /// Deadline of one HTTP request, including reading its body.
    pub request_timeout: Duration,
    /// Attempts after the first on 5xx, timeouts and connection errors.
    pub max_retries: u32,
    /// Docker config with `auths`; `None` means `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` if present.
    pub docker_config: Option<PathBuf>,
    /// Credentials by registry (`host[:port]`), given in memory (a CRI
    /// pull's); used for those registries instead of the docker config's.
    pub credentials: HashMap<String, Credentials>,
    /// Headers sent with every request (a `hosts.toml` host's `header`).
    pub headers: HostHeaders,
    /// How certificates are checked.
    pub tls: TlsOptions,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            request_timeout: Duration::from_secs(30),
            max_retries: 3,
            docker_config: None,
            credentials: HashMap::new(),
            headers: HostHeaders::default(),
            tls: TlsOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{reference}: not found: {what}")]
    NotFound { reference: String, what: String },
    #[error("{reference}: access denied: {message}")]
    Unauthorized { reference: String, message: String },
    #[error("{reference}: request timed out after {timeout:?}: {what}")]
    Timeout {
        reference: String,
        what: String,
        timeout: Duration,
    },
    #[error("{reference}: {what}: {message}")]
    Request {
        reference: String,
        what: String,
        message: String,
    },
    #[error("{reference}: blob {digest}: content digest mismatch (got {actual})")]
    DigestMismatch {
        reference: String,
        digest: Digest,
        actual: Digest,
    },
    #[error(
        "{reference}: blob {digest}: asked for {expected} bytes at offset {offset}, got {actual}"
    )]
    ShortRange {
        reference: String,
        digest: Digest,
        offset: u64,
        expected: u64,
        actual: u64,
    },
    #[error("docker config {path}: {message}")]
    Credentials { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A manifest (or index) as served by the registry.
#[derive(Clone, Debug)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// A client for one or more registries. Cheap to clone; safe to share between threads.
///
/// All clones share one HTTP connection pool and one cache of authorization
/// tokens. Requests to loopback registries (and every registry when
/// [`RegistryOptions::plain_http`] is set) use plain HTTP, others HTTPS.
///
/// Whole-blob transfers ([`Self::pull_blob`], [`Self::pull_blob_to_file`])
/// can legitimately take longer than one request deadline; for them the
/// deadline applies to the response headers and to every read of the body
/// (a stalled transfer fails, a slow but progressing one does not).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<transport::Transport>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("options", &self.inner.options)
            .field("credentials", self.inner.auth.credentials())
            .finish()
    }
}

impl RegistryClient {
    /// Builds a client and loads registry credentials (see
    /// [`RegistryOptions::docker_config`]).
    pub fn new(options: RegistryOptions) -> Result<Self, RegistryError> {
        let credentials = credentials::CredentialStore::load(options.docker_config.as_deref())?
            .with_given(options.credentials.clone());
        let setup_error = |message: String| RegistryError::Request {
            reference: "(none)".to_owned(),
            what: "client setup".to_owned(),
            message,
        };
        let auth =
            auth::Authenticator::new(credentials, options.tls.clone(), options.request_timeout);
        let inner = transport::Transport::new(options, auth).map_err(setup_error)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Whether the credentials this client loaded are still those of its
    /// docker config file; a long-lived holder rebuilds it when not.
    pub fn credentials_current(&self) -> bool {
        self.inner.auth.credentials().is_current()
    }

    /// The options this client was built with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    /// Fetches the manifest or index `reference` names (by digest if it has
    /// one, else by tag, else `latest`), accepting OCI and docker v2 media
    /// types. Verifies the digest when the reference has one, and against
    /// the registry's `Docker-Content-Digest` header.
    pub async fn pull_manifest(&self, reference: &Reference) -> Result<RawManifest, RegistryError> {
        self.inner.pull_manifest(reference).await
    }

    /// Fetches a whole blob into memory and verifies its digest.
    pub async fn pull_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        self.inner.pull_blob(reference, digest).await
    }

    /// Streams a whole blob into `path` (created or truncated), verifies its
    /// digest, and returns its size. A transfer interrupted by a transient
    /// failure resumes where it stopped.
    pub async fn pull_blob_to_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<u64, RegistryError> {
        self.inner.pull_blob_to_file(reference, digest, path).await
    }

    /// Fetches exactly `len` bytes at `offset` of a blob with one HTTP Range
    /// request (retried on transient errors). Fewer bytes (a range past the
    /// end of the blob) is [`RegistryError::ShortRange`]. The content is not
    /// verified: callers check chunk digests.
    pub async fn pull_blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        self.inner
            .pull_blob_range(reference, digest, offset, len)
            .await
    }

    /// Like [`Self::pull_blob_range`], but hands the bytes to `sink` in
    /// order as they arrive instead of collecting them. A transient failure
    /// resumes the request where `sink` stopped; after an error `sink` may
    /// have had a prefix of the range.
    pub async fn pull_blob_range_with(
        &self,
        reference: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), RegistryError> {
        self.inner
            .pull_blob_range_with(reference, digest, offset, len, sink)
            .await
    }

    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        self.inner
            .blob_exists(reference, digest, transport::Access::Pull)
            .await
    }

    /// Uploads a blob held in memory unless the registry already has it.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        self.inner.push_blob(reference, digest, data).await
    }

    /// Uploads the blob stored in `path` (streamed in bounded chunks, not
    /// read into memory) unless the registry already has it.
    pub async fn push_blob_file(
        &self,
        reference: &Reference,
        digest: &Digest,
        path: &Path,
    ) -> Result<(), RegistryError> {
        self.inner.push_blob_file(reference, digest, path).await
    }

    /// Uploads a manifest under the reference's tag (or, without a tag, by
    /// its digest); returns its digest. A digest in the reference must match
    /// the bytes.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.inner.push_manifest(reference, bytes, media_type).await
    }
}
