//! What Lode's processes agree on with each other and with containerd: the
//! names under which `lode-fsd` mounts appear, the name containerd knows the
//! proxy snapshotter by, and the snapshot and content labels that
//! `lodectl pull` (or CRI) writes and `lode-snapshotter` reads and writes.
//! A value here may only change in every process at once.

/// The source column (`fsname`) of a `lode-fsd` FUSE mount.
pub const FUSE_FS_NAME: &str = "lode";
/// The FUSE subtype of a `lode-fsd` mount: its type is `fuse.<subtype>`.
pub const FUSE_SUBTYPE: &str = "lode";
/// The file system type of a `lode-fsd` mount in `/proc/self/mountinfo`.
pub const FUSE_FS_TYPE: &str = "fuse.lode";

/// The name containerd's configuration gives the proxy snapshotter
/// (`[proxy_plugins.lode]`, `ctr --snapshotter lode`), which `lodectl pull`
/// uses unless told otherwise.
pub const DEFAULT_SNAPSHOTTER_NAME: &str = "lode";

/// The chain id containerd asks for when it prepares a layer; answering
/// AlreadyExists for it tells containerd the layer needs no unpacking.
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// The image reference a layer belongs to (CRI's name for it).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the manifest a layer belongs to.
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The digest of the layer being prepared.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Every layer digest of the image, comma-separated.
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Put on committed Lode layers, like other remote snapshotters do, with
/// [`REMOTE_LODE`] as its value.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// The value of [`LABEL_REMOTE`] on Lode layers.
pub const REMOTE_LODE: &str = "lode";

/// Prefix of the garbage-collection label on an image config that keeps its
/// top snapshot alive; the snapshotter's name completes it.
pub const LABEL_GC_REF_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// Garbage-collection label on a manifest that keeps its config alive.
pub const LABEL_GC_REF_CONTENT_CONFIG: &str = "containerd.io/gc.ref.content.config";
/// Prefix of the garbage-collection labels on a manifest that keep its
/// layers alive; the layer's index completes it.
pub const LABEL_GC_REF_CONTENT_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";

/// The label that keeps the top snapshot in `snapshotter` alive.
pub fn gc_ref_snapshot(snapshotter: &str) -> String {
    format!("{LABEL_GC_REF_SNAPSHOT_PREFIX}{snapshotter}")
}

/// The label that keeps a manifest's `index`th layer alive.
pub fn gc_ref_content_layer(index: usize) -> String {
    format!("{LABEL_GC_REF_CONTENT_LAYER_PREFIX}{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mountinfo_type_is_fuse_and_the_subtype() {
        assert_eq!(FUSE_FS_TYPE, format!("fuse.{FUSE_SUBTYPE}"));
    }

    #[test]
    fn gc_labels_are_the_ones_containerd_pull_sets() {
        assert_eq!(
            gc_ref_snapshot("lode"),
            "containerd.io/gc.ref.snapshot.lode"
        );
        assert_eq!(gc_ref_content_layer(3), "containerd.io/gc.ref.content.l.3");
    }
}
