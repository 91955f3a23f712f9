//! Request and response bodies of the lode-fsd API, shared by the server and
//! its clients so that both sides agree on one definition.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How a daemon serves its instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonMode {
    /// One instance whose root is the FUSE mount's root.
    Dedicated,
    /// One FUSE mount whose root lists the instances as subdirectories.
    Shared,
}

impl FromStr for DaemonMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dedicated" => Ok(Self::Dedicated),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "unknown mode {other:?} (expected dedicated or shared)"
            )),
        }
    }
}

impl fmt::Display for DaemonMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dedicated => "dedicated",
            Self::Shared => "shared",
        })
    }
}

/// The daemon's life cycle; see `docs/api.md` for the transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DaemonState {
    /// Process up, API served, no FUSE connection yet.
    Init,
    /// FUSE connection established (mounted or taken over), not yet serving.
    Ready,
    /// Serving FUSE requests.
    Running,
    /// Exiting; no further transitions.
    Stopped,
}

impl fmt::Display for DaemonState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Init => "INIT",
            Self::Ready => "READY",
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildVersion {
    pub package: String,
    /// `git rev-parse HEAD` at build time, or "unknown".
    pub git_commit: String,
    /// Seconds since the epoch at build time, or "unknown".
    pub build_time: String,
}

/// One mounted image instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// Sequence number the caller gave at mount; fixes the instance's inode range.
    pub seq: u32,
    pub mountpoint: PathBuf,
    pub bootstrap: PathBuf,
    pub image_ref: Option<String>,
    /// Seconds since the epoch.
    pub mounted_at: u64,
}

/// `GET /api/v1/daemon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub id: String,
    pub version: BuildVersion,
    pub pid: u32,
    pub mode: DaemonMode,
    pub state: DaemonState,
    /// The supervisor socket the daemon hands its state to, if any.
    pub supervisor: Option<PathBuf>,
    pub instances: Vec<InstanceInfo>,
}

/// The per-instance part of the daemon configuration a mount can choose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// `registry://HOST[:PORT]/REPO` or `dir:///PATH`.
    pub blob_source: String,
    /// Use plain HTTP for the registry.
    #[serde(default)]
    pub plain_http: bool,
    /// Docker config file with registry credentials (default: the daemon's).
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// The hosts to fetch from, in order, request by request (a
    /// `hosts.toml`'s mirrors, then the registry); empty: the blob
    /// source's registry alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<crate::registry::RegistryHost>,
}

/// Body of `POST` and `PUT /api/v1/mount?mountpoint=P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The image's bootstrap file.
    pub source: PathBuf,
    pub config: InstanceConfig,
    /// Instance sequence number, below 2^23, unique within the daemon.
    pub seq: u32,
    #[serde(default)]
    pub image_ref: Option<String>,
    /// Credentials for the blob source's registry, in place of the docker
    /// config's (a CRI pull's image pull secret). Kept in memory only; a
    /// remount without them keeps the instance's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<crate::registry::Credentials>,
}

/// Body of `PUT /api/v1/ahead`: data blob fronts to fetch before the image
/// they belong to is mounted, while its bootstrap is still on its way. The
/// daemon keeps the bytes in memory for a while and serves the image's
/// first fetches of those ranges from them, after verifying each chunk as
/// usual.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AheadRequest {
    pub config: InstanceConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<crate::registry::Credentials>,
    /// The image these are of, for the daemon's log.
    #[serde(default)]
    pub image_ref: Option<String>,
    pub blobs: Vec<crate::image::BlobFront>,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `conflict`.
    pub code: String,
    pub message: String,
}

/// Request count and failures of one FUSE operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FopCount {
    pub count: u64,
    pub errors: u64,
}

/// Counts of values at or below each bound; the last bucket has no bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds of the buckets but the last, in microseconds.
    pub bounds_us: Vec<u64>,
    /// `bounds_us.len() + 1` counts.
    pub counts: Vec<u64>,
}

/// `GET /api/v1/metrics?id=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMetrics {
    pub id: String,
    pub bytes_read: u64,
    pub fops: BTreeMap<String, FopCount>,
    pub read_latency: Histogram,
}

/// `GET /api/v1/metrics/cache?id=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMetrics {
    pub id: String,
    pub hits: u64,
    pub misses: u64,
    pub inflight_joins: u64,
    pub prefetch_hits: u64,
    pub readahead_requests: u64,
    /// Range requests for the image's prefetch list.
    pub prefetch_requests: u64,
    pub bytes_fetched: u64,
    /// Of `bytes_fetched`, the bytes of blob fronts the daemon fetched
    /// before the image was mounted (`PUT /ahead`).
    #[serde(default)]
    pub ahead_bytes: u64,
    pub chunks_cached: u64,
    pub bytes_cached: u64,
    pub write_errors: u64,
    pub digest_errors: u64,
    pub fetch_timeouts: u64,
}

/// `GET /api/v1/metrics/backend?id=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendMetrics {
    pub id: String,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency: Histogram,
}

/// `GET /api/v1/access?id=`: what an instance's readers read. `files` is
/// in the order the files were first read; `ranges` is what was read of
/// them at chunk granularity, in the order the chunks were first read,
/// ready to be a prefetch list (`lodectl daemon record`, then `lodectl
/// convert --prefetch-paths`). A file with several names is listed under
/// one, and a name that is not UTF-8 is shown lossily. `chunk_bytes` is the
/// stored (compressed) size of the distinct chunks read: what a start
/// needed from the registry at the least.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceAccess {
    pub id: String,
    pub files: Vec<String>,
    /// Empty from daemons that predate it.
    #[serde(default)]
    pub ranges: Vec<AccessRange>,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// Bytes `start..end` of file `path` (whole chunks, the last one up to the
/// file's end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRange {
    pub path: String,
    pub start: u64,
    pub end: u64,
}

/// A FUSE request being answered right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightOp {
    pub op: String,
    pub inode: u64,
    pub age_ms: u64,
}

/// `GET /api/v1/metrics/inflight`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightMetrics {
    pub ops: Vec<InflightOp>,
}

/// An instance as a successor daemon needs it to serve the same inodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInstance {
    pub info: InstanceInfo,
    pub request: MountRequest,
}
