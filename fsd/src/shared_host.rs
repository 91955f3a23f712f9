//! A shared daemon's mount: mounts the pseudo root at start, builds each
//! instance's read path when the API adds it, and tears it down when the
//! API removes it, without disturbing the other instances.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use lode_common::api::{InstanceInfo, MountRequest, SavedInstance};
use lode_common::format::Bootstrap;
use lode_common::registry::{RegistryClient, RegistryOptions};
use lode_common::supervisor::{DaemonState as SupervisedState, FuseConnParams, InstanceState};
use lode_config::FsdConfig;
use tracing::{info, warn};

use crate::api::ControlError;
use crate::backend::{BlobBackend, BlobSource, DirBackend, RegistryBackend};
use crate::cache::ChunkCache;
use crate::daemon::{DaemonError, Event};
use crate::fetch::{FetchSettings, Fetcher};
use crate::inode_map::InstanceSeq;
use crate::metrics::Metrics;
use crate::mount::{self, MountOptions};
use crate::ops::{LodeFs, Ttls};
use crate::shared::{SharedFuse, SharedInstance, SharedTable};
use crate::takeover::{self, Failover, Predecessor};

/// How long removing an instance waits for its running fetches.
const REMOVE_GRACE: Duration = Duration::from_secs(5);

struct Record {
    saved: SavedInstance,
    fetcher: Arc<Fetcher>,
    cache: Arc<ChunkCache>,
    backend: Arc<SwappableBackend>,
}

/// The instance's blob source, replaceable while reads go on (remount with
/// new credentials or a new registry address); the cache stays.
struct SwappableBackend(RwLock<Arc<dyn BlobBackend>>);

impl SwappableBackend {
    fn current(&self) -> Arc<dyn BlobBackend> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, backend: Arc<dyn BlobBackend>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = backend;
    }
}

impl BlobBackend for SwappableBackend {
    fn read_range(
        &self,
        blob: &lode_common::format::BlobRecord,
        offset: u64,
        len: u64,
        sink: &mut crate::backend::Sink<'_>,
    ) -> Result<(), crate::backend::BackendError> {
        self.current().read_range(blob, offset, len, sink)
    }

    fn describe(&self) -> String {
        self.current().describe()
    }
}

pub struct SharedMount {
    mountpoint: PathBuf,
    table: Arc<SharedTable>,
    records: Mutex<HashMap<String, Record>>,
    runtime: tokio::runtime::Runtime,
    session: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
    handover: Mutex<Option<Handover>>,
    entry_timeout: Duration,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        what: what.to_owned(),
        source,
    }
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

/// The connection as the supervisor needs it: a duplicate of the
/// /dev/fuse descriptor and what was negotiated at INIT.
struct Handover {
    supervisor: PathBuf,
    daemon_id: String,
    dev: OwnedFd,
    params: FuseConnParams,
}

impl SharedMount {
    /// The instance table and network runtime; nothing is mounted until
    /// [`SharedMount::serve`], so that a successor can rebuild the instances
    /// before the kernel's first (resent) request reaches them.
    pub fn new(mountpoint: &Path, config: &FsdConfig) -> Result<Self, DaemonError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lode-net")
            .enable_all()
            .build()
            .map_err(io("start tokio runtime"))?;
        Ok(Self {
            mountpoint: mountpoint.to_path_buf(),
            table: Arc::new(SharedTable::default()),
            records: Mutex::new(HashMap::new()),
            runtime,
            session: Mutex::new(None),
            handover: Mutex::new(None),
            entry_timeout: Duration::from_secs(config.fuse.entry_timeout_secs),
        })
    }

    /// Mounts the pseudo root (or, with `predecessor`, resumes the
    /// connection it served) and starts serving it. With a supervisor in
    /// `failover`, every worker reads the one /dev/fuse descriptor the
    /// supervisor holds a copy of: requests read on a cloned descriptor
    /// would be lost with it when the daemon dies.
    pub fn serve(
        &self,
        config: &FsdConfig,
        events: mpsc::Sender<Event>,
        failover: &Failover,
        predecessor: Option<Predecessor>,
    ) -> Result<(), DaemonError> {
        let mut session_config = fuser::Config::default();
        session_config.n_threads = Some(config.fuse.threads);
        session_config.clone_fd = failover.supervisor.is_none();
        let fs = SharedFuse::new(Arc::clone(&self.table), self.entry_timeout);
        let (session, connection) = match predecessor {
            Some(p) => {
                let session = takeover::start_resumed(fs, &p.fd, &p.params, session_config)?;
                if let Ok(fd) = p.fd.try_clone() {
                    takeover::resend_after_exit(p.state.pid, fd);
                }
                (session, Some((p.fd, p.params)))
            }
            None => {
                takeover::check_not_mounted(&self.mountpoint)?;
                let fd = mount::mount_fuse(&self.mountpoint, &MountOptions::lode(0o040_755))?;
                let started = if failover.supervisor.is_some() {
                    takeover::start_fresh(fs, &fd, session_config)
                        .map(|(session, params)| (session, Some((fd, params))))
                        .map_err(DaemonError::from)
                } else {
                    fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, session_config)
                        .map(|session| (session, None))
                        .map_err(io("FUSE handshake"))
                };
                match started {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = mount::unmount(&self.mountpoint);
                        return Err(e);
                    }
                }
            }
        };
        let session = std::thread::Builder::new()
            .name("lode-session".into())
            .spawn(move || {
                let result = session.run();
                let _ = events.send(Event::SessionEnded);
                result
            })
            .map_err(io("spawn FUSE session"))?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
        if let (Some(supervisor), Some((dev, params))) = (&failover.supervisor, connection) {
            *self.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(Handover {
                supervisor: supervisor.clone(),
                daemon_id: failover.id.clone(),
                dev,
                params,
            });
        }
        info!(mountpoint = %self.mountpoint.display(), "shared mount serving");
        Ok(())
    }

    /// Hands the instances and the connection to the supervisor (if there is
    /// one); called after every change of the instances and on `sendfd`.
    pub fn report(&self) -> Result<(), DaemonError> {
        let handover = self.handover.lock().unwrap_or_else(|e| e.into_inner());
        let Some(handover) = handover.as_ref() else {
            return Ok(());
        };
        let instances = self
            .saved()
            .into_iter()
            .map(|saved| InstanceState {
                id: saved.info.id.clone(),
                seq: u64::from(saved.info.seq),
                mountpoint: saved.info.mountpoint.display().to_string(),
                bootstrap: saved.request.source.display().to_string(),
                blob_source: saved.request.config.blob_source.clone(),
                image_ref: saved.request.image_ref.clone(),
                // The whole request, so a successor mounts exactly this.
                config: serde_json::to_string(&saved.request).unwrap_or_default(),
            })
            .collect();
        let state = SupervisedState {
            id: handover.daemon_id.clone(),
            pid: std::process::id(),
            mode: "shared".into(),
            fuse: vec![handover.params.clone()],
            instances,
        };
        Ok(takeover::report(
            &handover.supervisor,
            &state,
            &handover.dev,
        )?)
    }

    fn reported(&self) {
        if let Err(e) = self.report() {
            warn!(error = %e, "cannot hand the state to the supervisor; no takeover possible");
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds instance `id`'s read path and makes it visible as `<mnt>/<id>`.
    pub fn add(
        &self,
        id: &str,
        request: MountRequest,
        blob_source: &BlobSource,
        config: &FsdConfig,
        mounted_at: u64,
    ) -> Result<(), ControlError> {
        let seq = InstanceSeq::new(request.seq)
            .map_err(|e| ControlError::InvalidArgument(e.to_string()))?;
        let mut records = self.records();
        if records.contains_key(id) {
            return Err(ControlError::Conflict(format!(
                "instance {id} is already mounted"
            )));
        }
        let bootstrap = Bootstrap::open(&request.source).map_err(|e| {
            ControlError::InvalidArgument(format!("bootstrap {}: {e}", request.source.display()))
        })?;
        let backend = Arc::new(SwappableBackend(RwLock::new(
            self.backend(blob_source, config)?,
        )));
        let cache_dir = config.cache.dir.as_deref().unwrap_or(Path::new("."));
        let cache = Arc::new(
            ChunkCache::open(cache_dir)
                .map_err(internal)?
                .with_direct_io(config.cache.direct_io),
        );
        let metrics = Arc::new(Metrics::new());
        let fetcher = Arc::new(
            Fetcher::new(
                Arc::new(bootstrap),
                Arc::clone(&backend) as Arc<dyn BlobBackend>,
                Arc::clone(&cache),
                Arc::clone(&metrics),
                FetchSettings::from(&config.fetch),
            )
            .map_err(internal)?,
        );
        let ttls = Ttls {
            entry: Duration::from_secs(config.fuse.entry_timeout_secs),
            attr: Duration::from_secs(config.fuse.attr_timeout_secs),
        };
        let instance = Arc::new(SharedInstance {
            id: id.to_owned(),
            seq,
            fs: Arc::new(LodeFs::new(Arc::clone(&fetcher), ttls)),
            metrics,
        });
        self.table
            .insert(instance)
            .map_err(|e| ControlError::Conflict(e.to_string()))?;
        let info = InstanceInfo {
            id: id.to_owned(),
            seq: request.seq,
            mountpoint: self.mountpoint.join(id),
            bootstrap: request.source.clone(),
            image_ref: request.image_ref.clone(),
            mounted_at,
        };
        info!(instance = id, seq = request.seq, "instance added");
        records.insert(
            id.to_owned(),
            Record {
                saved: SavedInstance { info, request },
                fetcher,
                cache,
                backend,
            },
        );
        drop(records);
        self.reported();
        Ok(())
    }

    fn backend(
        &self,
        blob_source: &BlobSource,
        config: &FsdConfig,
    ) -> Result<Arc<dyn BlobBackend>, ControlError> {
        Ok(match blob_source {
            BlobSource::Registry(reference) => {
                let client = RegistryClient::new(RegistryOptions {
                    plain_http: config.registry.plain_http,
                    request_timeout: config.registry.request_timeout(),
                    max_retries: config.registry.max_retries,
                    docker_config: config.registry.docker_config.clone(),
                })
                .map_err(internal)?;
                Arc::new(RegistryBackend::new(
                    client,
                    reference.clone(),
                    self.runtime.handle().clone(),
                ))
            }
            BlobSource::Dir(dir) => Arc::new(DirBackend::new(dir)),
        })
    }

    /// Replaces instance `id`'s blob source (and credentials) in place; the
    /// image, its inodes and its cache stay.
    pub fn remount(
        &self,
        id: &str,
        request: MountRequest,
        blob_source: &BlobSource,
        config: &FsdConfig,
    ) -> Result<(), ControlError> {
        let mut records = self.records();
        let record = records
            .get_mut(id)
            .ok_or_else(|| ControlError::NotFound(format!("no instance {id}")))?;
        let old = &record.saved.request;
        if old.source != request.source || old.seq != request.seq {
            return Err(ControlError::InvalidArgument(format!(
                "remount of {id} cannot change the bootstrap or seq (unmount and mount instead)"
            )));
        }
        record.backend.replace(self.backend(blob_source, config)?);
        info!(instance = id, source = %blob_source, "instance blob source replaced");
        record.saved.info.image_ref = request.image_ref.clone();
        record.saved.request = request;
        Ok(())
    }

    /// Hides instance `id` (its inodes answer ENOENT from now on), then
    /// stops its fetches and makes its cache durable.
    pub fn remove(&self, id: &str) -> Result<(), ControlError> {
        let record = self
            .records()
            .remove(id)
            .ok_or_else(|| ControlError::NotFound(format!("no instance {id}")))?;
        self.table.remove(id);
        if !record.fetcher.shutdown(REMOVE_GRACE) {
            warn!(instance = id, "fetches still running at removal");
        }
        if let Err(e) = record.cache.flush() {
            warn!(instance = id, error = %e, "cache flush at removal failed");
        }
        info!(instance = id, "instance removed");
        self.reported();
        Ok(())
    }

    pub fn saved(&self) -> Vec<SavedInstance> {
        let mut all: Vec<_> = self.records().values().map(|r| r.saved.clone()).collect();
        all.sort_by_key(|s| s.info.seq);
        all
    }

    pub fn metrics(&self, id: &str) -> Option<Arc<Metrics>> {
        self.table.get(id).map(|i| Arc::clone(&i.metrics))
    }

    pub fn table(&self) -> &Arc<SharedTable> {
        &self.table
    }

    pub fn unmount(&self) -> Result<(), DaemonError> {
        Ok(mount::unmount(&self.mountpoint)?)
    }

    /// Waits for the session to end, then stops every instance.
    pub fn wait(&self) -> Result<(), DaemonError> {
        let session = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let result = match session.map(JoinHandle::join) {
            Some(Ok(r)) => r.map_err(io("FUSE session")),
            Some(Err(_)) => Err(io("FUSE session")(std::io::Error::other("panicked"))),
            None => Ok(()),
        };
        let ids: Vec<String> = self.records().keys().cloned().collect();
        for id in ids {
            let _ = self.remove(&id);
        }
        result
    }
}
