//! What happens when a daemon dies, and when the snapshotter starts again
//! while daemons it started earlier are still running (or are not), even
//! when their records are damaged.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use futures_util::StreamExt;
use lode_common::api::DaemonClient;
use lode_common::supervisor::SupervisorServer;
use lode_config::RecoverPolicy;

use super::records::{DaemonRecord, InstanceRecord};
use super::{process, DaemonError, DaemonManager, Recovery};

/// Successors tried before a failover turns into a restart.
const FAILOVER_ATTEMPTS: u32 = 3;
/// Daemons recovered at once at start.
const RECOVER_CONCURRENCY: usize = 4;

impl DaemonManager {
    pub(super) async fn on_death(&self, id: &str, pid: u32) {
        let _held = self.locks.lock(id).await;
        let Ok(Some(record)) = self.daemon(id) else {
            return; // released on purpose
        };
        if record.pid != pid {
            return; // already replaced
        }
        self.recover(record).await;
    }

    /// Probes every daemon's API every `health_interval_secs`; a daemon that
    /// does not answer within the call deadline is replaced.
    pub(super) fn watch_health(&self) {
        if let Some(interval) = self.config.daemon.health_interval() {
            self.every(interval, |manager| async move { manager.probe_all().await });
        }
    }

    async fn probe_all(&self) {
        let daemons = self.records.daemons().unwrap_or_default();
        let probes = daemons.into_iter().map(|record| async move {
            let answer = self.client(&record).daemon_info().await;
            (record, answer)
        });
        for (record, answer) in futures_util::future::join_all(probes).await {
            let Err(error) = answer else { continue };
            if !error.is_timeout() {
                continue; // gone (its watcher recovers it) or still starting
            }
            let _held = self.locks.lock(&record.id).await;
            let still_there = self
                .live_daemon(&record.id)
                .ok()
                .flatten()
                .is_some_and(|d| d.pid == record.pid);
            if still_there {
                self.replace_hung(&record).await;
            }
        }
    }

    /// A daemon that missed a call's deadline: it is killed, so that
    /// nothing waits on it again, and recovered by the policy like a dead
    /// one (its readers pause, then go on with failover). The daemon's lock
    /// is held.
    pub(super) async fn replace_hung(&self, record: &DaemonRecord) {
        tracing::error!(daemon_id = %record.id, pid = record.pid, deadline = ?self.config.daemon.call_timeout(), "daemon did not answer in time; killing and replacing it");
        self.metrics.daemon_hung();
        process::kill(record).await;
        self.recover(record.clone()).await;
    }

    /// Recovers a dead daemon by the policy. The daemon's lock is held.
    pub(super) async fn recover(&self, record: DaemonRecord) {
        let (id, pid) = (record.id.as_str(), record.pid);
        let policy = self.config.recover_policy;
        tracing::warn!(daemon_id = id, pid, policy = policy.as_str(), "daemon died");
        self.metrics.daemon_died();
        let timeout = self.config.daemon.recover_timeout();
        match policy {
            RecoverPolicy::None => {}
            RecoverPolicy::Failover => {
                // The supervisor keeps the connection until a successor
                // reports its own state, so a successor that dies during
                // its takeover can be replaced by another.
                for attempt in 1..=FAILOVER_ATTEMPTS {
                    let launched = self.launch(record.clone(), true);
                    match tokio::time::timeout(timeout, launched).await {
                        Ok(Ok(_)) => {
                            self.metrics.daemon_recovered("failover");
                            return;
                        }
                        Ok(Err(error)) => {
                            tracing::error!(daemon_id = id, attempt, %error, "failover attempt failed")
                        }
                        Err(_) => tracing::error!(
                            daemon_id = id,
                            attempt,
                            ?timeout,
                            "failover attempt timed out"
                        ),
                    }
                }
                tracing::error!(daemon_id = id, "failover failed; restarting the daemon");
                self.restart_logged(record).await;
            }
            RecoverPolicy::Restart => self.restart_logged(record).await,
        }
    }

    async fn restart_logged(&self, record: DaemonRecord) {
        let id = record.id.clone();
        let timeout = self.config.daemon.recover_timeout();
        match tokio::time::timeout(timeout, self.restart(record)).await {
            Ok(Ok(())) => self.metrics.daemon_recovered("restart"),
            Ok(Err(error)) => tracing::error!(daemon_id = %id, %error, "daemon restart failed"),
            Err(_) => tracing::error!(daemon_id = %id, ?timeout, "daemon restart timed out"),
        }
    }

    /// Clears what a dead daemon left (its held FUSE descriptors, its mount,
    /// its socket), starts a new one and mounts its instances again in
    /// sequence order. Each instance is bounded by the recover timeout.
    /// The daemon's lock is held.
    async fn restart(&self, record: DaemonRecord) -> Result<(), DaemonError> {
        // Dropping the supervisor's copies ends the dead connection, so the
        // detach below cannot leave readers hanging on it.
        self.supervisors().remove(&record.id);
        let instances = self.instances_of(&record.id)?;
        for instance in &instances {
            if instance.mountpoint != record.mountpoint {
                process::detach_mount(instance.mountpoint.clone()).await;
            }
        }
        process::detach_mount(record.mountpoint.clone()).await;
        let _ = std::fs::remove_file(&record.apisock);
        if instances.is_empty() && !self.stays() {
            self.records.remove_daemon(&record.id)?;
            return Ok(());
        }
        let fresh = DaemonRecord { pid: 0, ..record };
        self.launch(fresh, false).await?;
        self.mount_missing(instances, &HashSet::new()).await;
        Ok(())
    }

    /// Mounts the given instances (already in sequence order, all of one
    /// daemon, whose lock is held) that are not in `mounted`, skipping
    /// those whose bootstrap is gone.
    async fn mount_missing(&self, instances: Vec<InstanceRecord>, mounted: &HashSet<PathBuf>) {
        let timeout = self.config.daemon.recover_timeout();
        for instance in instances {
            if mounted.contains(&instance.mountpoint) {
                continue;
            }
            if !instance.image.bootstrap_path.is_file() {
                tracing::warn!(image_ref = %instance.image.image_ref, bootstrap = %instance.image.bootstrap_path.display(), "bootstrap missing; not mounting the image again");
                let _ = self
                    .records
                    .remove_instance(&instance.image.bootstrap_digest);
                continue;
            }
            let mount = self.mount_instance(&instance.image, instance.seq, Recovery::Not);
            match tokio::time::timeout(timeout, mount).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(seq = instance.seq, %error, "cannot mount instance again")
                }
                Err(_) => tracing::error!(
                    seq = instance.seq,
                    ?timeout,
                    "mounting instance again timed out"
                ),
            }
        }
    }

    /// At start: re-attach to live daemons, recover dead ones, mount the
    /// instances that are missing, and remove what no record names. Daemons
    /// are recovered a few at a time, each bounded by the recover timeout.
    pub(super) async fn recover_all(&self) {
        let timeout = self.config.daemon.recover_timeout();
        let daemons = self.records.daemons().unwrap_or_default();
        futures_util::stream::iter(daemons)
            .for_each_concurrent(RECOVER_CONCURRENCY, |record| async move {
                let _held = self.locks.lock(&record.id).await;
                let id = record.id.clone();
                match tokio::time::timeout(timeout, self.reattach(record)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::error!(daemon_id = %id, %error, "cannot recover daemon")
                    }
                    Err(_) => {
                        tracing::error!(daemon_id = %id, ?timeout, "recovering daemon timed out")
                    }
                }
            })
            .await;
        // Instances whose daemon record is gone (a crash between records);
        // not while a record is damaged: it may be their daemon's, which
        // may still serve them.
        if !self.records.all_readable() {
            tracing::warn!(
                "daemon records damaged; instances without a readable daemon record are left alone"
            );
            return;
        }
        let daemons: HashSet<String> = self
            .records
            .daemons()
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.id)
            .collect();
        let mut orphans: BTreeMap<String, Vec<InstanceRecord>> = BTreeMap::new();
        for instance in self.records.instances().unwrap_or_default() {
            if !daemons.contains(&instance.daemon_id) {
                let id = self.daemon_record_for(&instance.image).id;
                orphans.entry(id).or_default().push(instance);
            }
        }
        futures_util::stream::iter(orphans)
            .for_each_concurrent(RECOVER_CONCURRENCY, |(id, instances)| async move {
                let _held = self.locks.lock(&id).await;
                self.mount_missing(instances, &HashSet::new()).await;
            })
            .await;
        self.remove_orphans().await;
    }

    async fn reattach(&self, record: DaemonRecord) -> Result<(), DaemonError> {
        let client = self.client(&record);
        let live = process::is_live_fsd(record.pid);
        let info = if live {
            client.daemon_info().await.ok()
        } else {
            None
        };
        let Some(info) = info else {
            if live {
                tracing::warn!(daemon_id = %record.id, pid = record.pid, "daemon does not answer; killing and restarting it");
                process::kill(&record).await;
            } else {
                tracing::warn!(daemon_id = %record.id, pid = record.pid, "daemon is gone; restarting it");
            }
            self.restart(record).await?;
            self.metrics.daemon_recovered("restart");
            return Ok(());
        };
        // The supervisor that held the descriptor died with the old
        // snapshotter.
        self.supervise_again(&record, &client).await?;
        self.watch(&record);
        tracing::info!(daemon_id = %record.id, pid = record.pid, "re-attached to running daemon");
        let mounted: HashSet<PathBuf> = info
            .instances
            .iter()
            .map(|i| i.mountpoint.clone())
            .collect();
        let instances = self.instances_of(&record.id)?;
        if instances.is_empty() {
            // Started for a pull whose wait ended with the old snapshotter.
            self.stop_unless_used(&record);
        }
        self.mount_missing(instances, &mounted).await;
        Ok(())
    }

    /// A daemon that answers at `wanted`'s socket although no readable
    /// record names it (its record is damaged) is recorded again and
    /// watched: a second daemon would take its socket and mount from the
    /// images it serves. The daemon's lock is held.
    pub(super) async fn adopt(
        &self,
        wanted: &DaemonRecord,
    ) -> Result<Option<DaemonRecord>, DaemonError> {
        if !wanted.apisock.exists() {
            return Ok(None);
        }
        let client = self.client(wanted);
        let Ok(info) = client.daemon_info().await else {
            return Ok(None);
        };
        if info.id != wanted.id || !process::is_live_fsd(info.pid) {
            return Ok(None);
        }
        let record = DaemonRecord {
            pid: info.pid,
            ..wanted.clone()
        };
        self.records.put_daemon(&record)?;
        self.supervise_again(&record, &client).await?;
        self.watch(&record);
        tracing::warn!(daemon_id = %record.id, pid = record.pid, "a daemon no readable record named answers at its socket; recorded again");
        Ok(Some(record))
    }

    /// Binds the supervisor socket of a running daemon this process did
    /// not start, and has the daemon hand its FUSE descriptor to it (the
    /// supervisor that held it is gone).
    async fn supervise_again(
        &self,
        record: &DaemonRecord,
        client: &DaemonClient,
    ) -> Result<(), DaemonError> {
        if !self.supervised() {
            return Ok(());
        }
        let server = SupervisorServer::bind(&record.supervisor)?;
        self.supervisors().insert(record.id.clone(), server);
        if let Err(error) = client.send_fd().await {
            tracing::warn!(daemon_id = %record.id, %error, "daemon did not hand over its FUSE descriptor; failover unavailable until it does");
        }
        Ok(())
    }

    /// Sockets and mount directories that no record names.
    /// Nothing is removed while a record cannot be read: it may name what
    /// looks orphaned (a running container's image mount).
    async fn remove_orphans(&self) {
        let daemons = match self.records.daemons() {
            Ok(daemons) if self.records.all_readable() => daemons,
            _ => {
                tracing::warn!("daemon records unreadable or damaged; not removing sockets or mountpoints that no record names");
                return;
            }
        };
        let known_files: HashSet<PathBuf> = daemons
            .iter()
            .flat_map(|d| [d.apisock.clone(), d.supervisor.clone()])
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.config.daemons_dir()) {
            for entry in entries.flatten() {
                let path = entry.path();
                let is_socket = matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("sock" | "supervisor")
                );
                if is_socket && !known_files.contains(&path) {
                    tracing::info!(path = %path.display(), "removing orphaned daemon socket");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let known_mounts: HashSet<PathBuf> = daemons.iter().map(|d| d.mountpoint.clone()).collect();
        if let Ok(entries) = std::fs::read_dir(self.config.mounts_dir()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if !known_mounts.contains(&path) {
                    tracing::info!(path = %path.display(), "removing orphaned mountpoint");
                    process::detach_mount(path.clone()).await;
                    let _ = std::fs::remove_dir(&path);
                }
            }
        }
    }

    /// Stops every daemon and unmounts everything (for a full shutdown; a
    /// snapshotter restart leaves daemons running instead).
    pub async fn stop_all(&self) {
        for record in self.records.daemons().unwrap_or_default() {
            let _held = self.locks.lock(&record.id).await;
            let _ = self.records.remove_daemon(&record.id);
            self.supervisors().remove(&record.id);
            process::stop(&record, self.config.daemon.call_timeout()).await;
            for instance in self.records.instances().unwrap_or_default() {
                if instance.daemon_id == record.id {
                    let _ = self
                        .records
                        .remove_instance(&instance.image.bootstrap_digest);
                }
            }
        }
    }
}
