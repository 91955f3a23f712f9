//! Configuration of `lode-fsd`, the FUSE daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The whole `lode-fsd` configuration file. Command-line flags override it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsdConfig {
    /// The persistent chunk cache.
    pub cache: CacheConfig,
    /// How chunks are fetched from the blob source.
    pub fetch: FetchConfig,
    /// How the registry is reached (for `registry://` blob sources).
    pub registry: RegistryConfig,
    /// The FUSE session.
    pub fuse: FuseConfig,
}

/// `[cache]`: where verified, decompressed chunks are kept across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory holding one data file and one presence map per blob. Required,
    /// here or as `--cache-dir`. Instances of images that share blobs may share it.
    pub dir: Option<PathBuf>,
    /// How often chunks written to the cache are made durable (fdatasync) and
    /// recorded in the presence maps, in milliseconds. Chunks are readable by
    /// this process as soon as they are written; a crash loses at most this
    /// much of the cache's recent content, never its integrity.
    pub flush_interval_ms: u64,
    /// Write page-aligned chunks with O_DIRECT, bypassing the page cache (the
    /// kernel already caches file data above FUSE). Falls back to buffered
    /// writes where the filesystem does not support it.
    pub direct_io: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            flush_interval_ms: 1000,
            direct_io: true,
        }
    }
}

/// `[fetch]`: the read path's network behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Largest single range request for a reader, in stored (compressed)
    /// bytes. A miss also fetches the missing chunks around it in its blob
    /// (neighbouring files): as many bytes as the link delivers in a round
    /// trip (measured from recent requests), scaled by the share of such
    /// bytes that readers went on to read; at most this, and at least
    /// 1 MiB while that share is a half or more (less in proportion below).
    pub merge_limit_bytes: u64,
    /// What misses take along is also bounded by what readers read: the
    /// bytes taken along that no reader has read (yet) stay below this
    /// share, in percent, of the bytes readers read, so that without a
    /// prefetch list an image moves at most 1 + this/100 times what its
    /// readers need (readahead of sequential readers aside). 0 takes nothing
    /// along.
    pub unread_ahead_percent: u32,
    /// How far ahead of a sequential reader, in file bytes, chunks are fetched
    /// in the background at most. The window grows with the reader: as far
    /// ahead as it has read in order, at least a round trip's worth of the
    /// link. 0 turns background readahead off.
    pub readahead_bytes: u64,
    /// Largest single background readahead request, in stored bytes. Larger
    /// than `merge_limit_bytes` because nobody waits for its first byte, and
    /// registries spend CPU per request, so fewer, larger requests stream faster.
    pub readahead_request_bytes: u64,
    /// How long a read waits for the chunks it needs before failing with EIO,
    /// in seconds. Retries of the registry client happen within this time.
    pub deadline_secs: u64,
    /// Threads that run range requests and decompress and verify their chunks.
    /// Bounds the number of concurrent range requests.
    pub workers: usize,
    /// The share of `workers`, in percent, that background fetches (the
    /// image's prefetch list, readahead) may occupy at once; readers' fetches
    /// always go first and keep the rest.
    pub background_share_percent: u8,
    /// How much nicer (CPU niceness, 0-19; at most 19 in all) than the
    /// daemon a thread is while it runs a background fetch, so that
    /// decompressing and verifying chunks nobody waits for yet yields the
    /// CPU to the containers starting beside it. A thread gets the daemon's
    /// niceness back once a reader waits for one of its chunks. 0 turns it
    /// off; without the right to raise priority again (CAP_SYS_NICE, or
    /// RLIMIT_NICE) background fetches run at the daemon's niceness.
    pub background_nice: u8,
    /// How many bytes of data blob fronts (the chunks of an image's
    /// prefetch list, stored bytes) the daemon fetches ahead of mounting
    /// their image, when the snapshotter asks it to while the image's
    /// bootstrap is still on its way. They are held in memory until the
    /// image's fetches take them, for a minute at most. 0 turns it off.
    pub ahead_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            merge_limit_bytes: 4 * MIB,
            unread_ahead_percent: 50,
            readahead_bytes: 64 * MIB,
            readahead_request_bytes: 32 * MIB,
            deadline_secs: 30,
            workers: 8,
            background_share_percent: 50,
            background_nice: 10,
            ahead_bytes: 256 * MIB,
        }
    }
}

impl FetchConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_secs)
    }

    /// Workers that may run background fetches at once (at least one).
    pub fn background_workers(&self) -> usize {
        (self.workers * usize::from(self.background_share_percent) / 100).max(1)
    }
}

/// `[registry]`: the registry client's options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Use plain HTTP instead of HTTPS (loopback registries always use plain HTTP).
    pub plain_http: bool,
    /// Deadline of one HTTP request including its body, in seconds.
    pub request_timeout_secs: u64,
    /// Attempts after the first on server errors, timeouts and connection errors.
    pub max_retries: u32,
    /// Docker config file with registry credentials (`auths`); unset means
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` if present.
    pub docker_config: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            plain_http: false,
            request_timeout_secs: 30,
            max_retries: 3,
            docker_config: None,
        }
    }
}

impl RegistryConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// `[fuse]`: the FUSE session and the kernel's caching of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// Threads serving FUSE requests, each reading its own clone of the
    /// /dev/fuse descriptor. Reads that wait for the network occupy one each.
    pub threads: usize,
    /// How long the kernel may cache a name lookup, in seconds. Images are
    /// immutable, so this can be long.
    pub entry_timeout_secs: u64,
    /// How long the kernel may cache an inode's attributes, in seconds.
    pub attr_timeout_secs: u64,
    /// Kernel readahead window of the mount in KiB, set through
    /// `/sys/class/bdi/<dev>/read_ahead_kb` after mounting. 0 keeps the kernel's default.
    pub read_ahead_kb: u32,
    /// Read requests (readahead included) the kernel may keep outstanding at once.
    pub max_background: u16,
}

impl Default for FuseConfig {
    fn default() -> Self {
        Self {
            threads: 4,
            entry_timeout_secs: 86400,
            attr_timeout_secs: 86400,
            read_ahead_kb: 4096,
            max_background: 64,
        }
    }
}

impl FsdConfig {
    /// Reads and parses a TOML file (not validated: CLI overrides come first).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::read_file(path)?;
        crate::parse_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        crate::parse_toml(text, "<string>")
    }

    /// Checks that every value is usable, naming the first one that is not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.cache.dir {
            None => {
                return Err(ConfigError::invalid(
                    "cache.dir",
                    "not set (set it in the file or pass --cache-dir)",
                ))
            }
            Some(dir) if dir.as_os_str().is_empty() => {
                return Err(ConfigError::invalid("cache.dir", "empty path"))
            }
            Some(_) => {}
        }
        check_range(
            "cache.flush_interval_ms",
            self.cache.flush_interval_ms,
            10,
            600_000,
        )?;
        check_range(
            "fetch.merge_limit_bytes",
            self.fetch.merge_limit_bytes,
            64 * KIB,
            256 * MIB,
        )?;
        check_range(
            "fetch.unread_ahead_percent",
            u64::from(self.fetch.unread_ahead_percent),
            0,
            10_000,
        )?;
        check_range("fetch.ahead_bytes", self.fetch.ahead_bytes, 0, 4096 * MIB)?;
        check_range(
            "fetch.background_share_percent",
            u64::from(self.fetch.background_share_percent),
            1,
            100,
        )?;
        check_range(
            "fetch.background_nice",
            u64::from(self.fetch.background_nice),
            0,
            19,
        )?;
        check_range(
            "fetch.readahead_bytes",
            self.fetch.readahead_bytes,
            0,
            4096 * MIB,
        )?;
        check_range("fetch.deadline_secs", self.fetch.deadline_secs, 1, 3600)?;
        check_range("fetch.workers", self.fetch.workers as u64, 1, 256)?;
        check_range(
            "registry.request_timeout_secs",
            self.registry.request_timeout_secs,
            1,
            3600,
        )?;
        check_range(
            "registry.max_retries",
            u64::from(self.registry.max_retries),
            0,
            20,
        )?;
        check_range("fuse.threads", self.fuse.threads as u64, 1, 256)?;
        check_range(
            "fuse.entry_timeout_secs",
            self.fuse.entry_timeout_secs,
            0,
            365 * 86400,
        )?;
        check_range(
            "fuse.attr_timeout_secs",
            self.fuse.attr_timeout_secs,
            0,
            365 * 86400,
        )?;
        check_range(
            "fuse.read_ahead_kb",
            u64::from(self.fuse.read_ahead_kb),
            0,
            1024 * 1024,
        )?;
        check_range(
            "fuse.max_background",
            u64::from(self.fuse.max_background),
            1,
            4096,
        )?;
        Ok(())
    }
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            field,
            format!("{value} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_dir() -> FsdConfig {
        let mut config = FsdConfig::default();
        config.cache.dir = Some(PathBuf::from("/var/cache/lode"));
        config
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = FsdConfig::from_toml_str("").unwrap();
        assert_eq!(config, FsdConfig::default());
        assert_eq!(config.fetch.merge_limit_bytes, 4 * MIB);
    }

    #[test]
    fn defaults_with_a_cache_dir_validate() {
        with_dir().validate().unwrap();
    }

    #[test]
    fn missing_cache_dir_is_reported() {
        let err = FsdConfig::default().validate().unwrap_err();
        assert!(err.to_string().contains("cache.dir"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = FsdConfig::from_toml_str("[fetch]\nmerge_limit = 5\n").unwrap_err();
        assert!(err.to_string().contains("merge_limit"), "{err}");
        assert!(FsdConfig::from_toml_str("[cahce]\n").is_err());
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let config = FsdConfig::from_toml_str("[fetch]\nworkers = 3\n").unwrap();
        assert_eq!(config.fetch.workers, 3);
        assert_eq!(
            config.fetch.deadline_secs,
            FetchConfig::default().deadline_secs
        );
        assert_eq!(config.fuse, FuseConfig::default());
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let mut config = with_dir();
        config.fetch.merge_limit_bytes = 1;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("fetch.merge_limit_bytes"), "{err}");

        let mut config = with_dir();
        config.fuse.threads = 0;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("fuse.threads"), "{err}");

        let mut config = with_dir();
        config.fetch.background_nice = 20;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("fetch.background_nice"), "{err}");
    }

    #[test]
    fn sample_file_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../misc/fsd.sample.toml");
        let config = FsdConfig::load(&path).unwrap();
        config.validate().unwrap();
        // The sample documents the defaults: any drift means the sample lies.
        let mut expected = FsdConfig::default();
        expected.cache.dir = config.cache.dir.clone();
        assert_eq!(config, expected);
    }
}
