//! One image instance: everything serving one image needs (bootstrap, blob
//! source, chunk cache with its periodic flush, fetcher, filesystem
//! operations, metrics), built in one place whatever the daemon's mode.
//! The host decides only where the kernel sees it: at the mount root
//! (dedicated) or below it (shared).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lode_common::api::{AheadRequest, InstanceConfig, InstanceInfo, MountRequest, SavedInstance};
use lode_common::format::{Bootstrap, FormatError, Ino};
use lode_common::registry::{Credentials, RegistryError};
use lode_common::supervisor::InstanceState;
use lode_config::FsdConfig;
use tracing::{info, warn};

use crate::fs::ops::{LodeFs, Ttls};
use crate::metrics::Metrics;
use crate::read::ahead::{Ahead, AheadBackend};
use crate::read::backend::{BlobBackend, BlobSource, BlobSourceError, Swappable};
use crate::read::cache::{CacheError, ChunkCache};
use crate::read::fetch::{FetchSettings, Fetcher};
use crate::read::pools::Pools;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("bootstrap {path}: {source}")]
    Bootstrap {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    BlobSource(#[from] BlobSourceError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(
        "instance {id}: a remount cannot change the bootstrap or seq (unmount and mount instead)"
    )]
    Immutable { id: String },
    #[error("instance {id}: {what}: {source}")]
    Io {
        id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl InstanceError {
    /// Whether the request was at fault (rather than the machine).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            InstanceError::Bootstrap { .. }
                | InstanceError::BlobSource(_)
                | InstanceError::Immutable { .. }
        )
    }
}

/// What every instance of a daemon shares.
pub struct Resources<'a> {
    /// Defaults of every instance; a mount request overrides its subset.
    pub config: &'a FsdConfig,
    /// Runs registry requests.
    pub runtime: &'a tokio::runtime::Handle,
    pub pools: &'a Pools,
    /// Blob fronts fetched ahead of mounts.
    pub ahead: &'a Arc<Ahead>,
    /// How much nicer background work runs (`fetch.background_nice` if
    /// the daemon may give a thread its priority back, else 0).
    pub background_nice: i32,
}

impl Resources<'_> {
    /// The daemon's configuration with what `request` overrides.
    fn config_for(&self, request: &InstanceConfig) -> FsdConfig {
        let mut config = self.config.clone();
        config.registry.plain_http |= request.plain_http;
        if let Some(path) = &request.docker_config {
            config.registry.docker_config = Some(path.clone());
        }
        config
    }

    /// An instance's backend: `request`'s blob source, with what was
    /// fetched ahead in front of it.
    fn backend(
        &self,
        request: &MountRequest,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<dyn BlobBackend>, InstanceError> {
        let inner = self.source(&request.config, request.credentials.as_ref())?;
        Ok(Arc::new(AheadBackend {
            ahead: Arc::clone(self.ahead),
            inner,
            metrics: Arc::clone(metrics),
        }))
    }

    /// The blob source `config` names, with the daemon's configuration and
    /// what `config` overrides.
    fn source(
        &self,
        config: &InstanceConfig,
        credentials: Option<&Credentials>,
    ) -> Result<Arc<dyn BlobBackend>, InstanceError> {
        let source: BlobSource = config.blob_source.parse()?;
        let registry = self.config_for(config).registry;
        Ok(source.open(&registry, credentials, &config.hosts, self.runtime)?)
    }

    /// Starts fetching `request`'s blob fronts into [`Ahead`].
    pub fn fetch_ahead(&self, request: &AheadRequest) -> Result<(), InstanceError> {
        let source = self.source(&request.config, request.credentials.as_ref())?;
        let fetch = &self.config.fetch;
        self.ahead
            .fetch(
                source,
                &request.blobs,
                fetch.merge_limit_bytes,
                fetch.background_workers(),
                self.runtime,
            )
            .map_err(|source| InstanceError::Io {
                id: request.image_ref.clone().unwrap_or_default(),
                what: "spawn threads fetching blob fronts ahead",
                source,
            })
    }
}

/// How long stopping an instance waits for its running fetches, so that
/// what they fetched is cached.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// One served image.
pub struct Instance {
    pub id: String,
    pub seq: u32,
    pub fs: LodeFs,
    pub metrics: Arc<Metrics>,
    /// Mode of the image's root directory.
    pub root_mode: u32,
    backend: Arc<Swappable>,
    cache: Arc<ChunkCache>,
    flusher: Mutex<Option<Flusher>>,
    saved: Mutex<SavedInstance>,
}

impl Instance {
    /// Opens the bootstrap and builds the read path of `request`, seen by
    /// users at `mountpoint`.
    pub fn build(
        id: &str,
        mountpoint: &Path,
        request: MountRequest,
        resources: &Resources<'_>,
    ) -> Result<Self, InstanceError> {
        let config = resources.config_for(&request.config);
        let bad_bootstrap = |source| InstanceError::Bootstrap {
            path: request.source.clone(),
            source,
        };
        let bootstrap = Bootstrap::open(&request.source).map_err(bad_bootstrap)?;
        let root_mode = bootstrap.inode(Ino::ROOT).map_err(bad_bootstrap)?.mode;
        let metrics = Arc::new(Metrics::new());
        let backend = Arc::new(Swappable::new(resources.backend(&request, &metrics)?));
        let cache_dir = config.cache.dir.as_deref().unwrap_or(Path::new("."));
        let cache = Arc::new(ChunkCache::open(cache_dir)?.with_direct_io(config.cache.direct_io));
        let io = |what| {
            move |source| InstanceError::Io {
                id: id.to_owned(),
                what,
                source,
            }
        };
        let fetcher = Fetcher::new(
            Arc::new(bootstrap),
            Arc::clone(&backend) as Arc<dyn BlobBackend>,
            Arc::clone(&cache),
            Arc::clone(&metrics),
            FetchSettings::new(&config.fetch, resources.background_nice),
            resources.pools,
        )
        .map_err(io("start fetch workers"))?;
        let fetcher = Arc::new(fetcher);
        let ttls = Ttls {
            entry: Duration::from_secs(config.fuse.entry_timeout_secs),
            attr: Duration::from_secs(config.fuse.attr_timeout_secs),
        };
        let flusher = Flusher::start(
            Arc::clone(&cache),
            Duration::from_millis(config.cache.flush_interval_ms),
        )
        .map_err(io("spawn cache flusher"))?;
        Fetcher::start_prefetch(&fetcher).map_err(io("spawn prefetch thread"))?;
        let info = InstanceInfo {
            id: id.to_owned(),
            seq: request.seq,
            mountpoint: mountpoint.to_path_buf(),
            bootstrap: request.source.clone(),
            image_ref: request.image_ref.clone(),
            mounted_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        info!(
            instance = id,
            seq = request.seq,
            bootstrap = %request.source.display(),
            source = %backend.describe(),
            "instance ready"
        );
        Ok(Self {
            id: id.to_owned(),
            seq: request.seq,
            fs: LodeFs::new(fetcher, ttls),
            metrics,
            root_mode,
            backend,
            cache,
            flusher: Mutex::new(Some(flusher)),
            saved: Mutex::new(SavedInstance { info, request }),
        })
    }

    /// Replaces the blob source (and credentials, if the request has any)
    /// in place; the image, its inodes and its cache stay.
    pub fn remount(
        &self,
        request: MountRequest,
        resources: &Resources<'_>,
    ) -> Result<(), InstanceError> {
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if saved.request.source != request.source || saved.request.seq != request.seq {
            return Err(InstanceError::Immutable {
                id: self.id.clone(),
            });
        }
        let mut request = request;
        if request.credentials.is_none() {
            request.credentials = saved.request.credentials.clone();
        }
        self.backend
            .replace(resources.backend(&request, &self.metrics)?);
        info!(instance = %self.id, source = %self.backend.describe(), "blob source replaced");
        saved.info.image_ref = request.image_ref.clone();
        saved.request = request;
        Ok(())
    }

    /// What the API reports and a successor needs to mount it again.
    pub fn saved(&self) -> SavedInstance {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The instance as a supervisor keeps it for a successor.
    pub fn handover_state(&self) -> InstanceState {
        let saved = self.saved();
        InstanceState {
            id: self.id.clone(),
            seq: u64::from(self.seq),
            mountpoint: saved.info.mountpoint.display().to_string(),
            bootstrap: saved.request.source.display().to_string(),
            blob_source: saved.request.config.blob_source.clone(),
            image_ref: saved.request.image_ref.clone(),
            // The whole request, so that a successor mounts exactly this.
            config: serde_json::to_string(&saved.request).unwrap_or_default(),
        }
    }

    /// Stops fetching (queued fetches fail, running ones get up to `grace`
    /// to finish) and makes the cache durable. Idempotent.
    pub fn stop(&self, grace: Duration) {
        if !self.fs.fetcher().shutdown(grace) {
            warn!(instance = %self.id, "fetches still running at stop; their chunks stay uncached");
        }
        self.flush();
    }

    /// Makes the cache durable and ends the periodic flush, leaving running
    /// fetches to the process's exit (a successor serves on).
    pub fn flush(&self) {
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match flusher {
            Some(flusher) => flusher.stop(),
            None => {
                if let Err(e) = self.cache.flush() {
                    warn!(instance = %self.id, error = %e, "cache flush failed");
                }
            }
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Makes written cache chunks durable periodically (and once more at stop),
/// and lets go of blobs whose cache files were removed (`ChunkCache::maintain`).
struct Flusher {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Flusher {
    fn start(cache: Arc<ChunkCache>, interval: Duration) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lode-flush".into())
            .spawn(move || loop {
                let last = !matches!(
                    stopped.recv_timeout(interval),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
                if let Err(e) = cache.flush() {
                    warn!(error = %e, "periodic cache flush failed");
                }
                cache.maintain();
                if last {
                    return;
                }
            })?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
