//! Serving images: an instance of an image is mounted in its daemon
//! (started first when none runs) and recorded; on release it is
//! unmounted, its dedicated daemon stopped, and its cached blobs and
//! bootstrap removed.

use std::path::PathBuf;

use lode_common::api::DaemonState;
use lode_config::DaemonMode;

use super::records::InstanceRecord;
use super::{process, DaemonError, DaemonManager, Recovery};
use crate::instances::{InstanceError, InstanceProvider, LodeImage, PulledImage};

impl DaemonManager {
    /// Mounts an instance of `image` in its daemon, starting the daemon first
    /// when needed; the daemon's lock is held. With `Recovery::Allowed`, a
    /// recorded daemon found dead is recovered first, and a daemon that
    /// misses the mount's deadline is killed, recovered and asked again;
    /// recovery itself mounts with `Recovery::Not`.
    pub(super) async fn mount_instance(
        &self,
        image: &LodeImage,
        seq: u32,
        recovery: Recovery,
    ) -> Result<PathBuf, DaemonError> {
        let wanted = self.daemon_record_for(image);
        let mut daemon = self.serving_daemon(wanted, recovery).await?;
        let mountpoint = self.instance_mountpoint(&daemon, image);
        let request = self.mount_request(image, seq);
        let mut mounted = self.client(&daemon).mount(&mountpoint, &request).await;
        if recovery == Recovery::Allowed && mounted.as_ref().is_err_and(|e| e.is_timeout()) {
            Box::pin(self.replace_hung(&daemon)).await;
            daemon = self.serving_daemon(daemon, Recovery::Not).await?;
            mounted = self.client(&daemon).mount(&mountpoint, &request).await;
        }
        mounted.map_err(|e| {
            DaemonError::daemon(&daemon.id, format!("mount {}: {e}", mountpoint.display()))
        })?;
        if self.config.daemon_mode == DaemonMode::Dedicated {
            let client = self.client(&daemon);
            let deadline = self.config.daemon.start_timeout();
            let state = process::wait_for_states(
                &client,
                &daemon.id,
                daemon.pid,
                &[DaemonState::Ready, DaemonState::Running],
                deadline,
            )
            .await
            .map_err(|e| process::with_log_tail(e, &self.daemon_log(&daemon.id)))?;
            if state == DaemonState::Ready {
                client
                    .start()
                    .await
                    .map_err(|e| DaemonError::daemon(&daemon.id, e))?;
            }
        }
        self.records.put_instance(&InstanceRecord {
            seq,
            daemon_id: daemon.id.clone(),
            image: image.clone(),
            mountpoint: mountpoint.clone(),
        })?;
        tracing::info!(daemon_id = %daemon.id, seq, image_ref = %image.image_ref, mountpoint = %mountpoint.display(), "instance mounted");
        Ok(mountpoint)
    }
}

#[async_trait::async_trait]
impl InstanceProvider for DaemonManager {
    async fn acquire(&self, image: &LodeImage) -> Result<PathBuf, InstanceError> {
        let daemon_id = self.daemon_record_for(image).id;
        let _held = self.locks.lock(&daemon_id).await;
        let known = self
            .records
            .instances()
            .map_err(DaemonError::from)?
            .into_iter()
            .find(|i| i.image.bootstrap_digest == image.bootstrap_digest);
        if let Some(instance) = known {
            return Ok(instance.mountpoint);
        }
        let seq = self.records.next_seq().map_err(DaemonError::from)?;
        let mountpoint = self.mount_instance(image, seq, Recovery::Allowed).await?;
        self.enforce_cache_limit();
        Ok(mountpoint)
    }

    async fn release(&self, bootstrap_digest: &str) -> Result<(), InstanceError> {
        let find = || -> Result<Option<InstanceRecord>, DaemonError> {
            Ok(self
                .records
                .instances()?
                .into_iter()
                .find(|i| i.image.bootstrap_digest == bootstrap_digest))
        };
        let Some(instance) = find()? else {
            return Ok(());
        };
        let _held = self.locks.lock(&instance.daemon_id).await;
        // Looked up again under the lock: a concurrent release may have won.
        let Some(instance) = find()? else {
            return Ok(());
        };
        let daemon = self.daemon(&instance.daemon_id)?;
        self.records
            .remove_instance(bootstrap_digest)
            .map_err(DaemonError::from)?;
        let Some(daemon) = daemon else { return Ok(()) };
        // A dedicated daemon served this image only: it goes too, and
        // must not be recovered. The shared one stays.
        let stops = !self.stays();
        if stops {
            self.retire(&daemon)?;
        }
        if let Err(error) = self.client(&daemon).umount(&instance.mountpoint).await {
            tracing::warn!(daemon_id = %daemon.id, %error, "unmount through the daemon failed; detaching");
            process::detach_mount(instance.mountpoint.clone()).await;
            if error.is_timeout() && !stops {
                // It serves other images, or will: they need it answering.
                self.replace_hung(&daemon).await;
            }
        }
        if stops {
            // A daemon that does not stop (hung) is killed.
            process::stop(&daemon, self.config.daemon.call_timeout()).await;
        }
        tracing::info!(daemon_id = %daemon.id, mountpoint = %instance.mountpoint.display(), "instance released");
        self.clean_cache(&instance.image);
        crate::bootstraps::remove(&instance.image);
        Ok(())
    }

    async fn fetch_ahead(&self, pulled: &PulledImage) -> Result<(), InstanceError> {
        Ok(self.ahead(pulled).await?)
    }

    fn bootstraps_in_use(&self) -> Result<Vec<PathBuf>, InstanceError> {
        let instances = self.readable_instances()?;
        Ok(instances
            .into_iter()
            .map(|i| i.image.bootstrap_path)
            .collect())
    }
}
