//! The contract between the snapshot service and the daemon manager: the
//! service asks for a mounted instance of a Lode image when a container
//! snapshot needs one, and gives it back when the image's last snapshot goes.

use std::path::PathBuf;

/// A Lode image as the snapshotter recorded it when its bootstrap layer was
/// prepared: everything a daemon needs to serve it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LodeImage {
    /// The bootstrap layer's digest (`sha256:...`); names the image's
    /// instance, since two images with the same bootstrap have the same content.
    pub bootstrap_digest: String,
    /// The fetched, verified bootstrap file.
    pub bootstrap_path: PathBuf,
    /// The reference the image was pulled by, e.g. `127.0.0.1:5000/app:v1`.
    pub image_ref: String,
    /// Where the daemon fetches data blobs: `registry://HOST/REPO`.
    pub blob_source: String,
    /// Whether that registry is reached over plain HTTP.
    pub plain_http: bool,
    // The hosts the blobs are fetched from are resolved at each mount
    // (`crate::hosts`), not recorded; records of earlier versions hold
    // them as `hosts`, which reading ignores.
}

impl LodeImage {
    /// The registry of a `registry://` blob source.
    pub fn registry(&self) -> Option<&str> {
        let rest = self.blob_source.strip_prefix("registry://")?;
        rest.split_once('/').map(|(host, _)| host)
    }
}

/// An image being pulled whose data blobs begin with its prefetch list's
/// chunks: what a daemon needs to fetch them before the bootstrap arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledImage {
    /// The image as it will be served; its `bootstrap_path` is empty (the
    /// bootstrap has not arrived).
    pub image: LodeImage,
    pub fronts: Vec<lode_common::image::BlobFront>,
}

/// An image record for tests: digest `bootstrap_digest`, the rest made up.
#[cfg(test)]
pub(crate) fn test_image(bootstrap_digest: &str) -> LodeImage {
    LodeImage {
        bootstrap_digest: bootstrap_digest.into(),
        bootstrap_path: "/b".into(),
        image_ref: "r".into(),
        blob_source: "registry://h/r".into(),
        plain_http: true,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("daemon {daemon_id}: {message}")]
    Daemon { daemon_id: String, message: String },
    #[error("image {image}: {message}")]
    Image { image: String, message: String },
    /// The daemon manager could not serve the image (its cause kept).
    #[error("{0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Serves Lode images through filesystem daemons.
#[async_trait::async_trait]
pub trait InstanceProvider: Send + Sync + 'static {
    /// A directory that shows the image's merged root filesystem, mounting an
    /// instance first if none serves it. Idempotent: every call for the same
    /// image returns the same directory while the instance lives.
    async fn acquire(&self, image: &LodeImage) -> Result<PathBuf, InstanceError>;

    /// The image's last snapshot is gone: its instance may be unmounted.
    /// Releasing an image without an instance is not an error.
    async fn release(&self, bootstrap_digest: &str) -> Result<(), InstanceError>;

    /// A pull of `pulled` has begun: its daemon (started if need be) fetches
    /// the fronts of its data blobs while the bootstrap is on its way.
    async fn fetch_ahead(&self, pulled: &PulledImage) -> Result<(), InstanceError>;

    /// The bootstrap files mounted instances serve; an error when a record
    /// of one cannot be read (its file would look unused).
    fn bootstraps_in_use(&self) -> Result<Vec<PathBuf>, InstanceError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_is_the_blob_sources_host() {
        let mut image = test_image("sha256:b");
        image.blob_source = "registry://reg.io:5000/team/app".into();
        assert_eq!(image.registry(), Some("reg.io:5000"));
        image.blob_source = "dir:///var/lib/blobs".into();
        assert_eq!(image.registry(), None);
    }

    #[test]
    fn records_of_earlier_versions_read_without_their_hosts() {
        let earlier = r#"{"bootstrap_digest":"sha256:b","bootstrap_path":"/b","image_ref":"r",
            "blob_source":"registry://h/r","plain_http":true,
            "hosts":[{"host":"m:5000","resolve":true,"pull":true,"headers":{"x-token":"t"}}]}"#;
        let image: LodeImage = serde_json::from_str(earlier).unwrap();
        assert_eq!(image, test_image("sha256:b"));
        let written = serde_json::to_string(&image).unwrap();
        assert!(!written.contains("x-token"), "{written}");
    }
}
