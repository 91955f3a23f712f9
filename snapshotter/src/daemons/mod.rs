//! Starts, supervises and recovers the `lode-fsd` daemons that serve Lode
//! images, and implements [`crate::instances::InstanceProvider`] on top of them.
//!
//! - **shared** mode: one daemon (id `shared`) with one FUSE mount at
//!   `<root>/mnt/shared`; each image is an instance in a subdirectory. It
//!   is started with the snapshotter and runs while no image is served.
//! - **dedicated** mode: one daemon per image (id `d-<digest prefix>`) with
//!   its own mount at `<root>/mnt/<digest prefix>`.
//!
//! Every daemon is watched through a pidfd. When one dies, the recover
//! policy decides: `failover` starts a successor with `--takeover` that
//! resumes the FUSE connection the supervisor socket held on to (mounts
//! never disappear; readers pause); `restart` detaches the dead mount and
//! starts a fresh daemon that mounts the instances again in sequence order;
//! `none` only logs. Daemons outlive the snapshotter: on start it re-attaches
//! to the live ones and recovers the dead ones.
//!
//! Every call to a daemon has a deadline (`call_timeout_secs`), and each
//! daemon's API is probed every `health_interval_secs`: a daemon that misses
//! a deadline is taken for hung, killed, and recovered like a dead one. Work
//! on one daemon (start, mount, release, recovery) holds that daemon's lock
//! only, so a hung daemon never holds up another's images.

mod ahead;
mod cache;
mod images;
mod process;
pub mod records;
mod recover;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, Weak};

use lode_common::api::{DaemonClient, DaemonState, InstanceConfig, MountRequest};
use lode_common::registry::Reference;
use lode_common::supervisor::SupervisorServer;
use lode_config::{DaemonMode, RecoverPolicy, SnapshotterConfig};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::cri::Keychain;
use crate::instances::{InstanceError, LodeImage};
use crate::metrics::Metrics;
use records::{DaemonRecord, InstanceRecord, Records};

const SHARED_ID: &str = "shared";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon {daemon_id}: {message}")]
    Daemon { daemon_id: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Records(#[from] records::RecordError),
    #[error("supervisor: {0}")]
    Supervisor(#[from] lode_common::supervisor::SupervisorError),
    #[error("daemon records unreadable or damaged")]
    Unreadable,
    #[error(transparent)]
    Config(#[from] lode_config::ConfigError),
}

impl DaemonError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn daemon(daemon_id: &str, message: impl std::fmt::Display) -> Self {
        Self::Daemon {
            daemon_id: daemon_id.to_string(),
            message: message.to_string(),
        }
    }
}

impl From<DaemonError> for InstanceError {
    fn from(error: DaemonError) -> Self {
        match error {
            DaemonError::Daemon { daemon_id, message } => Self::Daemon { daemon_id, message },
            other => Self::Unavailable(Box::new(other)),
        }
    }
}

pub struct DaemonManager {
    config: SnapshotterConfig,
    binary: PathBuf,
    records: Records,
    metrics: Arc<Metrics>,
    /// Credentials from CRI pulls, handed to the daemons.
    keychain: Arc<Keychain>,
    /// Serialises the changes to each daemon and its instances (start,
    /// acquire, release, recovery), daemon by daemon.
    locks: DaemonLocks,
    /// One supervisor socket per supervised daemon, by daemon id.
    supervisors: std::sync::Mutex<HashMap<String, SupervisorServer>>,
    /// A cached blob used this recently is being read ([`cache::in_use`]).
    in_use: std::time::Duration,
    this: Weak<DaemonManager>,
}

/// One lock per daemon id. Whoever holds a daemon's lock may start, call,
/// kill and recover that daemon and change its records.
#[derive(Default)]
struct DaemonLocks(std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl DaemonLocks {
    async fn lock(&self, daemon_id: &str) -> OwnedMutexGuard<()> {
        let lock = Arc::clone(
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(daemon_id.to_string())
                .or_default(),
        );
        lock.lock_owned().await
    }
}

impl DaemonManager {
    /// Opens the records, re-attaches to the daemons that still run and
    /// recovers the rest (see [`recover`]).
    pub async fn start(
        config: &SnapshotterConfig,
        db: Arc<crate::store::MetaDb>,
        metrics: Arc<Metrics>,
        keychain: Arc<Keychain>,
    ) -> Result<Arc<Self>, DaemonError> {
        for dir in [
            config.daemons_dir(),
            config.mounts_dir(),
            config.cache_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(DaemonError::io(&dir))?;
        }
        let daemons = config.daemon_config()?;
        let flush_interval = std::time::Duration::from_millis(daemons.cache.flush_interval_ms);
        let records = Records::new(db)?;
        let manager = Arc::new_cyclic(|this| Self {
            binary: resolve_binary(&config.daemon.binary),
            config: config.clone(),
            records,
            metrics,
            keychain,
            locks: DaemonLocks::default(),
            supervisors: std::sync::Mutex::default(),
            in_use: cache::in_use(flush_interval),
            this: this.clone(),
        });
        manager.recover_all().await;
        manager.start_shared().await;
        manager.enforce_cache_limit();
        manager.watch_health();
        manager.watch_cache();
        Ok(manager)
    }

    /// In shared mode, starts the shared daemon unless it runs: it serves
    /// for as long as the snapshotter does, images or not, so that a pull
    /// finds it serving (a start during the pull, its binary read from
    /// disk, is on the path to the image's first bytes). One that does not
    /// start is logged; the first Lode image tries again.
    async fn start_shared(&self) {
        if !self.stays() {
            return;
        }
        let wanted = self.shared_record();
        let _held = self.locks.lock(&wanted.id).await;
        if let Err(error) = self.serving_daemon(wanted, Recovery::Allowed).await {
            tracing::error!(%error, "the shared daemon did not start; the first Lode image starts it");
        }
    }

    /// Whether daemons run with no image to serve: the shared daemon does
    /// (see [`Self::start_shared`]); a dedicated one stops with its image.
    fn stays(&self) -> bool {
        self.config.daemon_mode == DaemonMode::Shared
    }

    /// Recorded daemons with their API clients (for metrics scraping).
    pub fn daemons(&self) -> Vec<DaemonRecord> {
        self.records.daemons().unwrap_or_default()
    }

    /// Recorded instances in sequence order.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.records.instances().unwrap_or_default()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn daemon_record_for(&self, image: &LodeImage) -> DaemonRecord {
        match self.config.daemon_mode {
            DaemonMode::Shared => self.shared_record(),
            DaemonMode::Dedicated => {
                let short = short_digest(&image.bootstrap_digest);
                self.daemon_record(format!("d-{short}"), &short)
            }
        }
    }

    /// The shared daemon's record before it is started.
    fn shared_record(&self) -> DaemonRecord {
        self.daemon_record(SHARED_ID.to_string(), SHARED_ID)
    }

    /// The record of a daemon before it is started, mounted at `mount_dir`
    /// in the mounts directory.
    fn daemon_record(&self, id: String, mount_dir: &str) -> DaemonRecord {
        let dirs = self.config.daemons_dir();
        let mountpoint = self.config.mounts_dir().join(mount_dir);
        DaemonRecord {
            apisock: dirs.join(format!("{id}.sock")),
            supervisor: dirs.join(format!("{id}.supervisor")),
            mode: self.config.daemon_mode.as_str().to_string(),
            mountpoint,
            pid: 0,
            id,
        }
    }

    fn instance_mountpoint(&self, daemon: &DaemonRecord, image: &LodeImage) -> PathBuf {
        match self.config.daemon_mode {
            DaemonMode::Shared => daemon
                .mountpoint
                .join(short_digest(&image.bootstrap_digest)),
            DaemonMode::Dedicated => daemon.mountpoint.clone(),
        }
    }

    fn daemon_log(&self, daemon_id: &str) -> PathBuf {
        self.config.daemons_dir().join(format!("{daemon_id}.log"))
    }

    fn supervised(&self) -> bool {
        self.config.recover_policy == RecoverPolicy::Failover
    }

    /// The daemon's API, with the configured deadline on every call.
    fn client(&self, daemon: &DaemonRecord) -> DaemonClient {
        DaemonClient::new(&daemon.apisock).with_timeout(self.config.daemon.call_timeout())
    }

    /// The recorded daemon `daemon_id`, if any.
    fn daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>, DaemonError> {
        Ok(self
            .records
            .daemons()?
            .into_iter()
            .find(|d| d.id == daemon_id))
    }

    /// The recorded daemon `daemon_id` if its process is alive.
    fn live_daemon(&self, daemon_id: &str) -> Result<Option<DaemonRecord>, DaemonError> {
        Ok(self
            .daemon(daemon_id)?
            .filter(|d| process::is_live_fsd(d.pid)))
    }

    fn supervisors(&self) -> std::sync::MutexGuard<'_, HashMap<String, SupervisorServer>> {
        self.supervisors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a daemon for `record` (fresh or taking over) and waits until it
    /// serves; records its pid and watches it. The daemon's lock is held.
    async fn launch(
        &self,
        mut record: DaemonRecord,
        takeover: bool,
    ) -> Result<DaemonRecord, DaemonError> {
        if !takeover {
            // Never touch a mountpoint being taken over: nobody serves it
            // until the successor does, so any access would block.
            std::fs::create_dir_all(&record.mountpoint)
                .map_err(DaemonError::io(&record.mountpoint))?;
        }
        if self.supervised() && !self.supervisors().contains_key(&record.id) {
            let server = SupervisorServer::bind(&record.supervisor)?;
            self.supervisors().insert(record.id.clone(), server);
        }
        if !takeover {
            let _ = std::fs::remove_file(&record.apisock);
        }
        let log = self.daemon_log(&record.id);
        let pid = process::spawn(&process::Launch {
            binary: &self.binary,
            record: &record,
            cache_dir: &self.config.cache_dir(),
            fsd_config: self.config.daemon.config.as_deref(),
            threads: self.config.daemon.threads,
            supervised: self.supervised(),
            takeover,
            log: &log,
        })?;
        record.pid = pid;
        self.records.put_daemon(&record)?;
        self.watch(&record);
        let client = self.client(&record);
        let wanted: &[DaemonState] = match (self.config.daemon_mode, takeover) {
            (DaemonMode::Dedicated, false) => &[DaemonState::Init],
            _ => &[DaemonState::Ready, DaemonState::Running],
        };
        let reached = process::wait_for_states(
            &client,
            &record.id,
            pid,
            wanted,
            self.config.daemon.start_timeout(),
        )
        .await
        .map_err(|e| process::with_log_tail(e, &log))?;
        if reached == DaemonState::Ready {
            client
                .start()
                .await
                .map_err(|e| DaemonError::daemon(&record.id, e))?;
        }
        tracing::info!(daemon_id = %record.id, pid, takeover, "daemon serving");
        Ok(record)
    }

    /// Watches the daemon's process and runs recovery when it dies.
    fn watch(&self, record: &DaemonRecord) {
        let Some(pidfd) = process::pidfd(record.pid) else {
            tracing::warn!(daemon_id = %record.id, pid = record.pid, "cannot watch daemon (no pidfd)");
            return;
        };
        let this = self.this.clone();
        let (id, pid) = (record.id.clone(), record.pid);
        tokio::spawn(async move {
            process::wait_for_exit(pidfd).await;
            if let Some(manager) = this.upgrade() {
                manager.on_death(&id, pid).await;
            }
        });
    }

    /// What a daemon is asked to mount for `image`, with the credentials a
    /// CRI pull of it left in the keychain, if any.
    fn mount_request(&self, image: &LodeImage, seq: u32) -> MountRequest {
        MountRequest {
            source: image.bootstrap_path.clone(),
            config: self.instance_config(image),
            seq,
            image_ref: Some(image.image_ref.clone()),
            credentials: self.credentials(image),
        }
    }

    /// The image's source and the hosts to fetch it from as the
    /// configuration says now (see `crate::hosts`). A `hosts.toml` that
    /// cannot be read leaves the registry alone, so that an image already
    /// pulled keeps being served; the next pull fails with the same error.
    fn instance_config(&self, image: &LodeImage) -> InstanceConfig {
        let hosts = match image.registry() {
            None => Vec::new(),
            Some(registry) => crate::hosts::resolve(&self.config.registry, registry)
                .unwrap_or_else(|error| {
                    tracing::warn!(image = %image.image_ref, %error, "fetching from the registry alone");
                    Vec::new()
                }),
        };
        InstanceConfig {
            blob_source: image.blob_source.clone(),
            plain_http: image.plain_http,
            docker_config: self.config.registry.docker_config.clone(),
            hosts,
        }
    }

    fn credentials(&self, image: &LodeImage) -> Option<lode_common::registry::Credentials> {
        image
            .image_ref
            .parse::<Reference>()
            .ok()
            .and_then(|r| self.keychain.get(&r))
    }

    /// Forgets a daemon about to be stopped: no record, no supervisor, no
    /// recovery. The daemon's lock is held.
    fn retire(&self, daemon: &DaemonRecord) -> Result<(), DaemonError> {
        self.records.remove_daemon(&daemon.id)?;
        self.supervisors().remove(&daemon.id);
        Ok(())
    }

    /// Hands the keychain's credentials for `reference`'s repository to the
    /// daemons serving images of it (a later pull brought new ones). A
    /// daemon that cannot take them keeps its old ones; that is logged.
    /// Runs without the manager's lock: an instance released meanwhile
    /// just refuses the remount.
    pub async fn refresh_credentials(&self, reference: &Reference) {
        let (Ok(instances), Ok(daemons)) = (self.records.instances(), self.records.daemons())
        else {
            tracing::warn!(image = %reference, "cannot read the daemon records; credentials not handed on");
            return;
        };
        for instance in instances {
            let same_repository = instance
                .image
                .image_ref
                .parse::<Reference>()
                .is_ok_and(|r| {
                    r.registry == reference.registry && r.repository == reference.repository
                });
            let daemon = daemons.iter().find(|d| d.id == instance.daemon_id);
            let (true, Some(daemon)) = (same_repository, daemon) else {
                continue;
            };
            let request = self.mount_request(&instance.image, instance.seq);
            match self
                .client(daemon)
                .remount(&instance.mountpoint, &request)
                .await
            {
                Ok(()) => {
                    tracing::info!(daemon_id = %daemon.id, image_ref = %instance.image.image_ref, "credentials handed to the daemon")
                }
                Err(error) => {
                    tracing::warn!(daemon_id = %daemon.id, image_ref = %instance.image.image_ref, %error, "cannot hand new credentials to the daemon")
                }
            }
        }
    }

    /// The live daemon recorded as `wanted.id`; one is started when none is
    /// recorded, and a recorded one found dead (its watcher has not got to
    /// it yet) is recovered first when `recovery` allows. The daemon's lock
    /// is held.
    async fn serving_daemon(
        &self,
        wanted: DaemonRecord,
        recovery: Recovery,
    ) -> Result<DaemonRecord, DaemonError> {
        if let Some(live) = self.live_daemon(&wanted.id)? {
            return Ok(live);
        }
        if recovery == Recovery::Allowed {
            if let Some(dead) = self.daemon(&wanted.id)? {
                Box::pin(self.recover(dead)).await;
                if let Some(live) = self.live_daemon(&wanted.id)? {
                    return Ok(live);
                }
            }
        }
        if let Some(adopted) = self.adopt(&wanted).await? {
            return Ok(adopted);
        }
        self.launch(wanted, false).await
    }

    /// Every instance record; an error while one cannot be read (what its
    /// image uses would look unused).
    fn readable_instances(&self) -> Result<Vec<InstanceRecord>, DaemonError> {
        let instances = self.records.instances()?;
        if !self.records.all_readable() {
            return Err(DaemonError::Unreadable);
        }
        Ok(instances)
    }

    /// Instances a daemon serves, in sequence order.
    fn instances_of(&self, daemon_id: &str) -> Result<Vec<InstanceRecord>, DaemonError> {
        Ok(self
            .records
            .instances()?
            .into_iter()
            .filter(|i| i.daemon_id == daemon_id)
            .collect())
    }

    /// Runs `work` every `interval` (not at once) while the manager lives.
    fn every<F, Fut>(&self, interval: std::time::Duration, work: F)
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let this = self.this.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(manager) = this.upgrade() else {
                    return;
                };
                work(manager).await;
            }
        });
    }
}

/// Whether a mount may recover its daemon (see [`DaemonManager::mount_instance`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recovery {
    Allowed,
    Not,
}

/// The first 12 hex digits of a digest: names instance directories.
fn short_digest(digest: &str) -> String {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    hex.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect()
}

/// A bare binary name is looked up beside the running executable, then PATH.
fn resolve_binary(binary: &Path) -> PathBuf {
    if binary.components().count() > 1 {
        return binary.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(binary)))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_come_from_the_digest() {
        assert_eq!(short_digest("sha256:0123456789abcdef0123"), "0123456789ab");
        assert_eq!(short_digest("../../x"), "x");
    }
}
