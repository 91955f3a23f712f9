//! Configuration of `lode-snapshotter`, the containerd proxy snapshotter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// The whole `lode-snapshotter` configuration file. Command-line flags
/// override it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Directory of the metadata store, snapshot directories and per-daemon
    /// state. Must be on a filesystem that can hold overlayfs upper dirs.
    pub root: PathBuf,
    /// The gRPC socket containerd's `proxy_plugins.lode` points at (mode 0600).
    pub address: PathBuf,
    /// containerd's own socket: the manifests pulls stored are read from its
    /// content store, and the CRI proxy forwards to it.
    pub containerd_address: PathBuf,
    /// One daemon for every image, or one per image.
    pub daemon_mode: DaemonMode,
    /// What to do when a daemon dies.
    pub recover_policy: RecoverPolicy,
    /// The daemons.
    pub daemon: DaemonConfig,
    /// The chunk cache shared by the daemons.
    pub cache: SnapshotterCacheConfig,
    /// How registries are reached when fetching bootstraps and chunks.
    pub registry: SnapshotterRegistryConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The CRI image service proxy (credentials from Kubernetes).
    pub cri: CriConfig,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/lode/snapshotter"),
            address: PathBuf::from("/run/lode/snapshotter.sock"),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            daemon_mode: DaemonMode::default(),
            recover_policy: RecoverPolicy::default(),
            daemon: DaemonConfig::default(),
            cache: SnapshotterCacheConfig::default(),
            registry: SnapshotterRegistryConfig::default(),
            metrics: MetricsConfig::default(),
            cri: CriConfig::default(),
        }
    }
}

impl SnapshotterConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::read_file(path)?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = crate::parse_toml(text, origin)?;
        config.validate()?;
        Ok(config)
    }

    /// Reports values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.root.is_absolute() {
            return Err(ConfigError::invalid("root", "must be an absolute path"));
        }
        if !self.address.is_absolute() {
            return Err(ConfigError::invalid("address", "must be an absolute path"));
        }
        if self.daemon.start_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "daemon.start_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.daemon.recover_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "daemon.recover_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.daemon.call_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "daemon.call_timeout_secs",
                "must be at least 1",
            ));
        }
        if let Some(address) = &self.cri.image_service_address {
            if !address.is_absolute() {
                return Err(ConfigError::invalid(
                    "cri.image_service_address",
                    "must be an absolute path",
                ));
            }
        }
        if self.cri.containerd_address.is_some() {
            return Err(ConfigError::invalid(
                "cri.containerd_address",
                "moved: set containerd_address at the top of the file instead",
            ));
        }
        if !self.containerd_address.is_absolute() {
            return Err(ConfigError::invalid(
                "containerd_address",
                "must be an absolute path",
            ));
        }
        if let Some(address) = &self.metrics.address {
            let addr: std::net::SocketAddr = address.parse().map_err(|_| {
                ConfigError::invalid("metrics.address", format!("{address:?} is not HOST:PORT"))
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError::invalid(
                    "metrics.address",
                    format!("{address} is not a loopback address; metrics are served on 127.0.0.1 or ::1 only"),
                ));
            }
        }
        Ok(())
    }

    /// Directory of per-daemon sockets and state files.
    pub fn daemons_dir(&self) -> PathBuf {
        self.root.join("daemons")
    }

    /// Directory of snapshot directories (`<id>/fs`, `<id>/work`).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Directory where instances are mounted (dedicated) or the shared mount lives.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// Directory of fetched bootstraps, by digest hex.
    pub fn bootstraps_dir(&self) -> PathBuf {
        self.root.join("bootstraps")
    }

    /// The metadata store file.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("metadata.redb")
    }

    /// The configuration the daemons run with: `daemon.config` (or the
    /// defaults) with what the snapshotter gives them on their command line,
    /// checked as `lode-fsd` checks it, so that a mistake in that file shows
    /// at the snapshotter's start rather than at a pull's.
    pub fn daemon_config(&self) -> Result<crate::FsdConfig, ConfigError> {
        let named = |source| match &self.daemon.config {
            Some(path) => ConfigError::Daemon {
                path: path.display().to_string(),
                source: Box::new(source),
            },
            None => source,
        };
        let mut fsd = match &self.daemon.config {
            Some(path) => crate::FsdConfig::load(path).map_err(named)?,
            None => crate::FsdConfig::default(),
        };
        fsd.cache.dir = Some(self.cache_dir());
        fsd.fuse.threads = self.daemon.threads;
        fsd.validate().map_err(named)?;
        Ok(fsd)
    }

    /// The chunk cache directory (shared by all daemons).
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.root.join("cache"))
    }
}

/// How daemons are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DaemonMode {
    /// One daemon and one FUSE mount for all images; instances are its
    /// subdirectories.
    #[default]
    Shared,
    /// One daemon and one FUSE mount per image.
    Dedicated,
}

impl DaemonMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Dedicated => "dedicated",
        }
    }
}

/// What happens when a daemon dies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoverPolicy {
    /// Nothing: its mounts fail until the snapshotter restarts.
    None,
    /// Unmount what is left, start a new daemon and mount its instances
    /// again in sequence order. Reads in flight fail; later reads work.
    Restart,
    /// Start a new daemon that takes the FUSE connection over from the
    /// supervisor: mounts never disappear and readers only pause.
    #[default]
    Failover,
}

impl RecoverPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Restart => "restart",
            Self::Failover => "failover",
        }
    }
}

/// `[daemon]`: the `lode-fsd` processes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// The `lode-fsd` binary; a bare name is looked up beside the
    /// snapshotter's own executable, then in PATH.
    pub binary: PathBuf,
    /// An `lode-fsd` config file passed to every daemon (`--config`).
    pub config: Option<PathBuf>,
    /// FUSE worker threads per daemon.
    pub threads: usize,
    /// How long a new daemon may take to reach RUNNING, in seconds.
    pub start_timeout_secs: u64,
    /// Bound on recovering one daemon or instance (after a crash or a
    /// snapshotter restart), in seconds; one hung item cannot block the rest.
    pub recover_timeout_secs: u64,
    /// Deadline of every API call to a daemon (mount, unmount, state), in
    /// seconds. A daemon that misses it is taken for hung: it is killed and
    /// replaced by the recover policy.
    pub call_timeout_secs: u64,
    /// How often each daemon's API is probed, in seconds (0: never), so a
    /// hung daemon is found and replaced even when no call is due.
    pub health_interval_secs: u64,
    /// How long a dedicated daemon started at a pull, to fetch the image's
    /// prefetch list ahead of its bootstrap, waits for the image's
    /// instance, in seconds. One with no instance by then (the pull failed
    /// or was abandoned) stops. The shared daemon runs with the snapshotter.
    pub ahead_wait_secs: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("lode-fsd"),
            config: None,
            threads: 4,
            start_timeout_secs: 10,
            recover_timeout_secs: 30,
            call_timeout_secs: 5,
            health_interval_secs: 5,
            ahead_wait_secs: 60,
        }
    }
}

impl DaemonConfig {
    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.start_timeout_secs)
    }

    pub fn recover_timeout(&self) -> Duration {
        Duration::from_secs(self.recover_timeout_secs)
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs(self.call_timeout_secs)
    }

    pub fn ahead_wait(&self) -> Duration {
        Duration::from_secs(self.ahead_wait_secs)
    }

    /// `None` when probing is off.
    pub fn health_interval(&self) -> Option<Duration> {
        (self.health_interval_secs > 0).then(|| Duration::from_secs(self.health_interval_secs))
    }
}

/// `[cache]`: the chunk cache of all daemons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterCacheConfig {
    /// Defaults to `<root>/cache`.
    pub dir: Option<PathBuf>,
    /// Upper bound of the cache in bytes; 0 = unbounded. Above it, blobs no
    /// mounted image uses are removed, then blobs of mounted images not read
    /// for a while, least recently used first; never a blob being read.
    pub size_limit_bytes: u64,
    /// How often the limit is applied while running, in seconds (besides
    /// at start and whenever an image is mounted); 0: only then.
    pub check_interval_secs: u64,
}

impl Default for SnapshotterCacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            size_limit_bytes: 0,
            check_interval_secs: 60,
        }
    }
}

impl SnapshotterCacheConfig {
    /// `None` when the limit is not applied periodically.
    pub fn check_interval(&self) -> Option<Duration> {
        (self.check_interval_secs > 0 && self.size_limit_bytes > 0)
            .then(|| Duration::from_secs(self.check_interval_secs))
    }
}

/// `[registry]`: reaching registries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterRegistryConfig {
    /// Hosts (`host` or `host:port`) reached over plain HTTP. Loopback hosts
    /// always are.
    pub plain_http_hosts: Vec<String>,
    /// Mirrors per registry host, tried in order before the host itself.
    pub mirrors: Vec<MirrorConfig>,
    /// containerd's registry host directory (its CRI plugin's
    /// `registry.config_path`, e.g. `/etc/containerd/certs.d`): the
    /// `hosts.toml` files there say where each registry's content is
    /// fetched from, host by host, request by request.
    pub config_path: Option<PathBuf>,
    /// Docker-style credentials file (`auths`); defaults to
    /// `$HOME/.docker/config.json` when unset.
    pub docker_config: Option<PathBuf>,
}

impl SnapshotterRegistryConfig {
    /// Whether `host` is to be reached over plain HTTP.
    pub fn is_plain_http(&self, host: &str) -> bool {
        let bare = host.rsplit_once(':').map_or(host, |(name, _)| name);
        matches!(bare, "localhost" | "127.0.0.1" | "[::1]" | "::1")
            || bare.starts_with("127.")
            || self.plain_http_hosts.iter().any(|h| h == host || h == bare)
    }
}

/// One `[[registry.mirrors]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The registry host being mirrored, e.g. `docker.io`.
    pub host: String,
    /// Mirror hosts (`host[:port]`), tried in order.
    pub endpoints: Vec<String>,
}

/// `[cri]`: the CRI image service proxy. kubelet's
/// `--image-service-endpoint` points at it; it forwards every call to
/// containerd and keeps the credentials of `PullImage` requests (image pull
/// secrets), in memory only, for the lazily pulled images' reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriConfig {
    /// The socket the proxy serves (mode 0600); unset, there is no proxy.
    /// It forwards to the top-level `containerd_address`.
    pub image_service_address: Option<PathBuf>,
    /// Where containerd's socket was given before it moved to the top
    /// level; refused with that advice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containerd_address: Option<PathBuf>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` on a loopback address, or unset for no endpoint.
    pub address: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: Some("127.0.0.1:9123".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_configuration_is_checked_naming_its_file() {
        let config = SnapshotterConfig::default();
        let fsd = config.daemon_config().unwrap();
        assert_eq!(fsd.cache.dir, Some(config.cache_dir()));
        assert_eq!(fsd.fuse.threads, config.daemon.threads);

        let path = std::env::temp_dir().join(format!("lode-fsd-{}.toml", std::process::id()));
        std::fs::write(&path, "[cache]\nflush_interval_ms = 5\n").unwrap();
        let config = SnapshotterConfig {
            daemon: DaemonConfig {
                config: Some(path.clone()),
                ..DaemonConfig::default()
            },
            ..SnapshotterConfig::default()
        };
        let error = config.daemon_config().unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            error.contains(&path.display().to_string())
                && error.contains("cache.flush_interval_ms"),
            "{error}"
        );
        let missing = config.daemon_config().unwrap_err().to_string();
        assert!(missing.contains(&path.display().to_string()), "{missing}");
    }

    #[test]
    fn empty_file_is_the_default() {
        let config = SnapshotterConfig::from_toml("", "test").unwrap();
        assert_eq!(config, SnapshotterConfig::default());
        assert_eq!(config.recover_policy, RecoverPolicy::Failover);
        assert_eq!(config.daemon_mode, DaemonMode::Shared);
    }

    #[test]
    fn the_cri_proxy_is_off_unless_given_a_socket() {
        let config = SnapshotterConfig::from_toml(
            "[cri]\nimage_service_address = \"/run/lode/cri.sock\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(
            config.containerd_address,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert!(SnapshotterConfig::default()
            .cri
            .image_service_address
            .is_none());
        let e = SnapshotterConfig::from_toml("[cri]\nimage_service_address = \"cri.sock\"\n", "t")
            .unwrap_err();
        assert!(e.to_string().contains("cri.image_service_address"), "{e}");
    }

    #[test]
    fn the_old_place_of_containerd_address_names_the_new_one() {
        let e = SnapshotterConfig::from_toml(
            "[cri]
containerd_address = \"/run/containerd/containerd.sock\"\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cri.containerd_address") && e.contains("top of the file"),
            "{e}"
        );
        let e = SnapshotterConfig::from_toml("containerd_address = \"c.sock\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn modes_and_policies_parse() {
        let config = SnapshotterConfig::from_toml(
            "daemon_mode = \"dedicated\"\nrecover_policy = \"restart\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(config.daemon_mode, DaemonMode::Dedicated);
        assert_eq!(config.recover_policy, RecoverPolicy::Restart);
        let err = SnapshotterConfig::from_toml("recover_policy = \"sometimes\"", "test");
        assert!(err.is_err());
    }

    #[test]
    fn metrics_must_stay_on_loopback() {
        let err = SnapshotterConfig::from_toml("[metrics]\naddress = \"0.0.0.0:9123\"", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        SnapshotterConfig::from_toml("[metrics]\naddress = \"127.0.0.1:1\"", "t").unwrap();
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_refused() {
        assert!(SnapshotterConfig::from_toml("rooot = \"/x\"", "t").is_err());
        assert!(SnapshotterConfig::from_toml("root = \"rel\"", "t").is_err());
    }

    #[test]
    fn sample_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../misc/snapshotter.sample.toml");
        let config = SnapshotterConfig::load(&path).unwrap();
        assert_eq!(config, SnapshotterConfig::default());
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        let mut registry = SnapshotterRegistryConfig::default();
        assert!(registry.is_plain_http("127.0.0.1:5000"));
        assert!(registry.is_plain_http("localhost"));
        assert!(!registry.is_plain_http("registry.example.com"));
        registry
            .plain_http_hosts
            .push("registry.example.com".into());
        assert!(registry.is_plain_http("registry.example.com:443"));
    }
}
