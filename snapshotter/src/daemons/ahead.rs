//! Fetching a pulled image's prefetch list before its bootstrap arrives:
//! at the first data blob layer the pull prepares (layers shared with
//! images already there are skipped), the image's daemon is started if
//! none runs and asked for the data blobs' fronts (`PUT /ahead`). A
//! dedicated daemon started this way stops again if its image is not
//! mounted within `daemon.ahead_wait_secs` (the pull failed).

use lode_common::api::AheadRequest;

use super::records::DaemonRecord;
use super::{process, DaemonError, DaemonManager, Recovery};
use crate::instances::PulledImage;

impl DaemonManager {
    /// Has the daemon that will serve `pulled` (started if none runs)
    /// fetch its blob fronts; a dedicated daemon started for this stops
    /// unless the image is mounted in time.
    pub(super) async fn ahead(&self, pulled: &PulledImage) -> Result<(), DaemonError> {
        let image = &pulled.image;
        let wanted = self.daemon_record_for(image);
        let daemon_id = wanted.id.clone();
        let held = self.locks.lock(&daemon_id).await;
        // The shared daemon stays whatever it serves: no records to read.
        let idle = !self.stays() && self.instances_of(&daemon_id)?.is_empty();
        let daemon = self.serving_daemon(wanted, Recovery::Allowed).await?;
        let request = AheadRequest {
            config: self.instance_config(image),
            credentials: self.credentials(image),
            image_ref: Some(image.image_ref.clone()),
            blobs: pulled.fronts.clone(),
        };
        let asked = self.client(&daemon).ahead(&request).await;
        drop(held);
        if idle {
            self.stop_unless_used(&daemon);
        }
        asked.map_err(|e| DaemonError::daemon(&daemon_id, e))
    }

    /// Stops a dedicated `daemon` (this process of it) if it still serves
    /// no image after `daemon.ahead_wait_secs`: it was started for a pull
    /// that never got its instance mounted.
    pub(super) fn stop_unless_used(&self, daemon: &DaemonRecord) {
        if self.stays() {
            return;
        }
        let (daemon_id, pid) = (daemon.id.clone(), daemon.pid);
        let this = self.this.clone();
        let wait = self.config.daemon.ahead_wait();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(manager) = this.upgrade() else {
                return;
            };
            let _held = manager.locks.lock(&daemon_id).await;
            let (Ok(Some(daemon)), Ok(instances)) = (
                manager.live_daemon(&daemon_id),
                manager.instances_of(&daemon_id),
            ) else {
                return;
            };
            if daemon.pid != pid || !instances.is_empty() {
                return;
            }
            if let Err(error) = manager.retire(&daemon) {
                tracing::warn!(daemon_id, %error, "cannot stop a daemon that serves no image");
                return;
            }
            process::stop(&daemon, manager.config.daemon.call_timeout()).await;
            tracing::info!(
                daemon_id,
                "daemon stopped: the pull it was started for mounted no image"
            );
        });
    }
}
