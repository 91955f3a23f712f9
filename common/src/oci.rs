//! How a Lode image is packaged as an OCI image (see docs/format.md).

/// Media type of a Lode data blob layer. It keeps containerd's
/// `application/vnd.oci.image.layer.` prefix so that containerd 1.6's unpacker
/// asks the snapshotter about the layer instead of skipping it.
pub const MEDIA_TYPE_DATA_BLOB: &str = "application/vnd.oci.image.layer.v1.lode.blob";
/// Media type of the bootstrap layer: a gzip tar holding one file, [`BOOTSTRAP_TAR_PATH`].
pub const MEDIA_TYPE_BOOTSTRAP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer annotation marking a Lode data blob (value "true").
pub const ANNOTATION_DATA_BLOB: &str = "lode.blob";
/// Layer annotation marking the Lode bootstrap (value "true").
pub const ANNOTATION_BOOTSTRAP: &str = "lode.bootstrap";
/// Layer annotation with the digest of the layer's uncompressed content,
/// its `rootfs.diff_ids` entry in the config (containerd's name, also used
/// by eStargz): a pull can name the layers' snapshots from the manifest
/// alone, before the config has arrived.
pub const ANNOTATION_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Data blob annotation: how many bytes at the blob's front hold the chunks
/// of the image's prefetch list (the converter puts them there). A daemon
/// may fetch that front before it has the bootstrap; the chunks are
/// verified against the bootstrap when they are used, like any other.
pub const ANNOTATION_PREFETCH_FRONT: &str = "lode.prefetch.front";
/// Manifest annotation with the Lode format version.
pub const ANNOTATION_FORMAT_VERSION: &str = "lode.format.version";
/// Manifest annotation with the source image's manifest digest.
pub const ANNOTATION_SOURCE_DIGEST: &str = "lode.source.digest";

/// Path of the bootstrap file inside the bootstrap layer's tar.
pub const BOOTSTRAP_TAR_PATH: &str = "lode/bootstrap";
