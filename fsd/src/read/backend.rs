//! Where data blobs come from: the [`BlobBackend`] trait and its two
//! implementations, a registry (HTTP range requests) and a local directory.
//!
//! Backends are called from the fetch worker threads and block them; the
//! registry backend drives its requests with the daemon's tokio runtime handle
//! from the calling thread, so no tokio thread ever blocks on disk or on a reader.

use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use lode_common::format::BlobRecord;
use lode_common::registry::{
    Capability, Credentials, HostClients, Reference, RegistryError, RegistryHost, RegistryOptions,
};
use lode_config::RegistryConfig;

/// Where [`BlobBackend::read_range`] puts the bytes.
pub type Sink<'a> = dyn FnMut(&[u8]) + Send + 'a;

/// Reads stored (maybe compressed) bytes of data blobs.
pub trait BlobBackend: Send + Sync {
    /// Hands exactly `len` bytes at `offset` of `blob` to `sink`, in order,
    /// in pieces of any size, as they arrive. After an error `sink` may have
    /// had a prefix of the range. Blocks the calling thread; must not be
    /// called from an async context.
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError>;

    /// Names the source in log lines (`registry://host/repo`, `dir:///path`).
    fn describe(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("blob {digest}: {path}: {source}")]
    Io {
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {digest}: range {offset}+{len} is outside the blob's {size} bytes")]
    OutOfRange {
        digest: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("blob {digest}: asked for {expected} bytes at {offset}, got {actual}")]
    Short {
        digest: String,
        offset: u64,
        expected: u64,
        actual: u64,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Checks a range against the blob's recorded size before any I/O, so a
/// corrupt bootstrap cannot make a backend read (or allocate) past the blob.
fn check_range(blob: &BlobRecord, offset: u64, len: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= blob.compressed_size => Ok(()),
        _ => Err(BackendError::OutOfRange {
            digest: blob.digest.to_string(),
            offset,
            len,
            size: blob.compressed_size,
        }),
    }
}

/// `--blob-source`: where the image's data blobs are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobSource {
    /// `registry://HOST[:PORT]/REPO`: range requests against a registry repository.
    Registry(Reference),
    /// `dir:///PATH`: files named by blob digest hex in a local directory.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid blob source {input:?}: {reason} (expected registry://HOST[:PORT]/REPO or dir:///PATH)"
)]
pub struct BlobSourceError {
    input: String,
    reason: &'static str,
}

impl FromStr for BlobSource {
    type Err = BlobSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| BlobSourceError {
            input: s.chars().take(200).collect(),
            reason,
        };
        if let Some(path) = s.strip_prefix("dir://") {
            if !path.starts_with('/') {
                return Err(err("the directory must be an absolute path"));
            }
            return Ok(BlobSource::Dir(PathBuf::from(path)));
        }
        let rest = s
            .strip_prefix("registry://")
            .ok_or_else(|| err("unknown scheme"))?;
        let (host, repository) = rest.split_once('/').ok_or_else(|| err("no repository"))?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !host_ok {
            return Err(err("invalid registry host"));
        }
        let repo_ok = !repository.is_empty()
            && !repository.starts_with('/')
            && !repository.ends_with('/')
            && !repository.contains("//")
            && repository
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
        if !repo_ok {
            return Err(err("invalid repository name"));
        }
        Ok(BlobSource::Registry(Reference {
            registry: host.to_string(),
            repository: repository.to_string(),
            tag: None,
            digest: None,
        }))
    }
}

impl fmt::Display for BlobSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobSource::Registry(r) => write!(f, "registry://{}/{}", r.registry, r.repository),
            BlobSource::Dir(p) => write!(f, "dir://{}", p.display()),
        }
    }
}

impl BlobSource {
    /// The backend reading from this source; registry requests run on `runtime`.
    /// `credentials`, if given, are the registry's; `hosts`, if any, are
    /// where to fetch from in order (else the registry itself).
    pub fn open(
        &self,
        registry: &RegistryConfig,
        credentials: Option<&Credentials>,
        hosts: &[RegistryHost],
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<dyn BlobBackend>, RegistryError> {
        Ok(match self {
            BlobSource::Registry(reference) => {
                let hosts = if hosts.is_empty() {
                    vec![RegistryHost::origin(
                        &reference.registry,
                        registry.plain_http,
                    )]
                } else {
                    hosts.to_vec()
                };
                let options = RegistryOptions {
                    plain_http: registry.plain_http,
                    request_timeout: registry.request_timeout(),
                    max_retries: registry.max_retries,
                    docker_config: registry.docker_config.clone(),
                    credentials: credentials
                        .map(|c| (reference.registry.clone(), c.clone()))
                        .into_iter()
                        .collect(),
                    ..RegistryOptions::default()
                };
                Arc::new(RegistryBackend::new(
                    HostClients::new(hosts, &options)?,
                    reference.clone(),
                    runtime.clone(),
                ))
            }
            BlobSource::Dir(dir) => Arc::new(DirBackend::new(dir)),
        })
    }
}

/// A backend that can be replaced while reads go on (a remount with new
/// credentials or a new registry address); requests already running finish
/// on the old one.
pub struct Swappable(RwLock<Arc<dyn BlobBackend>>);

impl Swappable {
    pub fn new(backend: Arc<dyn BlobBackend>) -> Self {
        Self(RwLock::new(backend))
    }

    fn current(&self) -> Arc<dyn BlobBackend> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, backend: Arc<dyn BlobBackend>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = backend;
    }
}

impl BlobBackend for Swappable {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        self.current().read_range(blob, offset, len, sink)
    }

    fn describe(&self) -> String {
        self.current().describe()
    }
}

/// Blobs stored as files named by their digest's hex in one directory.
pub struct DirBackend {
    dir: PathBuf,
}

impl DirBackend {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

/// Pieces a local blob is read in: large enough to keep syscalls few, small
/// enough that a chunk's first piece is handed on early.
const DIR_PIECE: usize = 1 << 20;

impl BlobBackend for DirBackend {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        check_range(blob, offset, len)?;
        let path = self.dir.join(blob.digest.hex());
        let io_err = |source| BackendError::Io {
            digest: blob.digest.to_string(),
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io_err)?;
        let mut buf = vec![0u8; DIR_PIECE.min(usize::try_from(len).unwrap_or(DIR_PIECE))];
        let mut done = 0u64;
        while done < len {
            let want = buf
                .len()
                .min(usize::try_from(len - done).unwrap_or(usize::MAX));
            match file.read_at(&mut buf[..want], offset + done) {
                Ok(0) => {
                    return Err(BackendError::Short {
                        digest: blob.digest.to_string(),
                        offset,
                        expected: len,
                        actual: done,
                    })
                }
                Ok(n) => {
                    sink(&buf[..n]);
                    done += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("dir://{}", self.dir.display())
    }
}

/// Range requests against one registry repository, run on the daemon's
/// runtime, host after host (mirrors, then the registry) request by request.
pub struct RegistryBackend {
    hosts: HostClients,
    reference: Reference,
    runtime: tokio::runtime::Handle,
}

impl RegistryBackend {
    pub fn new(hosts: HostClients, reference: Reference, runtime: tokio::runtime::Handle) -> Self {
        Self {
            hosts,
            reference,
            runtime,
        }
    }
}

impl BlobBackend for RegistryBackend {
    fn read_range(
        &self,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), BackendError> {
        check_range(blob, offset, len)?;
        // The request runs on this (non-runtime) thread inside the runtime's
        // context, so its I/O is driven by the runtime and no tokio worker
        // ever waits for us (nor for `sink`).
        // A host failing mid-range hands the rest of the range to the next.
        let mut done = 0u64;
        let mut last = None;
        for attempt in self.hosts.attempts(&self.reference, Capability::Pull) {
            let (start, rest) = (offset + done, len - done);
            let mut counted = |piece: &[u8]| {
                done += piece.len() as u64;
                sink(piece);
            };
            let result = self.runtime.block_on(attempt.client.pull_blob_range_with(
                &attempt.reference,
                &blob.digest,
                start,
                rest,
                &mut counted,
            ));
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.hosts.failed(&attempt, &e);
                    last = Some(e);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| RegistryError::Request {
                reference: self.reference.to_string(),
                what: format!("blob {}", blob.digest),
                message: "no host can serve content (capability \"pull\")".to_owned(),
            })
            .into())
    }

    fn describe(&self) -> String {
        format!(
            "registry://{}/{} via {}",
            self.reference.registry,
            self.reference.repository,
            self.hosts.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_common::format::ChunkIndex;
    use lode_common::Digest;

    /// Collects a range, checking that pieces arrive in order.
    pub(crate) fn read_all(
        backend: &dyn BlobBackend,
        blob: &BlobRecord,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let mut out = Vec::new();
        backend.read_range(blob, offset, len, &mut |piece| out.extend_from_slice(piece))?;
        Ok(out)
    }

    fn blob_of(data: &[u8]) -> BlobRecord {
        BlobRecord {
            digest: Digest::of(data),
            compressed_size: data.len() as u64,
            uncompressed_size: data.len() as u64,
            first_chunk: ChunkIndex(0),
            chunk_count: 1,
        }
    }

    #[test]
    fn parses_blob_sources() {
        let s: BlobSource = "registry://127.0.0.1:5000/library/app".parse().unwrap();
        match &s {
            BlobSource::Registry(r) => {
                assert_eq!(r.registry, "127.0.0.1:5000");
                assert_eq!(r.repository, "library/app");
                assert_eq!(r.tag, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.to_string(), "registry://127.0.0.1:5000/library/app");
        assert_eq!(
            "dir:///var/blobs".parse::<BlobSource>().unwrap(),
            BlobSource::Dir(PathBuf::from("/var/blobs"))
        );
        for bad in [
            "",
            "http://host/repo",
            "registry://host",
            "registry:///repo",
            "registry://host/Repo",
            "registry://host/repo/",
            "dir://relative",
        ] {
            assert!(bad.parse::<BlobSource>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dir_backend_reads_exact_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let blob = blob_of(&data);
        std::fs::write(dir.path().join(blob.digest.hex()), &data).unwrap();
        let backend = DirBackend::new(dir.path());
        assert_eq!(
            &read_all(&backend, &blob, 10, 20).unwrap()[..],
            &data[10..30]
        );
        assert_eq!(read_all(&backend, &blob, 0, 1000).unwrap().len(), 1000);
        assert!(matches!(
            read_all(&backend, &blob, 990, 20),
            Err(BackendError::OutOfRange { .. })
        ));
    }

    #[test]
    fn dir_backend_reports_missing_and_short_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 100];
        let blob = blob_of(&data);
        let backend = DirBackend::new(dir.path());
        let err = read_all(&backend, &blob, 0, 10).unwrap_err();
        assert!(err.to_string().contains(&blob.digest.hex()), "{err}");
        std::fs::write(dir.path().join(blob.digest.hex()), &data[..50]).unwrap();
        assert!(matches!(
            read_all(&backend, &blob, 40, 20),
            Err(BackendError::Short { actual: 10, .. })
        ));
    }
}
