//! Errors of image conversion.

use lode_common::format::FormatError;
use lode_common::registry::RegistryError;
use lode_common::Digest;

/// Why a single tar entry was refused. Wrapped in [`ConvertError::Entry`],
/// which names the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryProblem {
    #[error("path has a '..' component")]
    DotDot,
    #[error("path component \"{component}\": {reason}")]
    BadName {
        component: String,
        reason: &'static str,
    },
    #[error("parent {parent} is not a directory (links in paths are not followed)")]
    ParentNotDir { parent: String },
    #[error("the image root can only be a directory")]
    RootNotDir,
    #[error("hard link target \"{target}\" {reason}")]
    HardlinkTarget {
        target: String,
        reason: &'static str,
    },
    #[error("{kind} entry without a link name")]
    MissingLinkName { kind: &'static str },
    #[error("symlink target {reason}")]
    SymlinkTarget { reason: &'static str },
    #[error("device number {major}:{minor} out of range (major <= 4095, minor <= 1048575)")]
    DeviceNumber { major: u32, minor: u32 },
    #[error("header field {field}: {message}")]
    BadHeader {
        field: &'static str,
        message: String,
    },
    #[error("{what} {value} does not fit in 32 bits")]
    IdOutOfRange { what: &'static str, value: u64 },
    #[error("xattr \"{name}\": {reason}")]
    BadXattr { name: String, reason: &'static str },
    #[error("unsupported entry type {0:?}")]
    UnsupportedType(char),
    #[error("whiteout without a name")]
    EmptyWhiteout,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("invalid image location {input:?}: {reason}")]
    BadLocation { input: String, reason: String },
    #[error("invalid platform {input:?}: expected os/arch[/variant]")]
    BadPlatform { input: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{image}: {message}")]
    BadImage { image: String, message: String },
    #[error("{image}: no manifest for platform {platform} (the index offers: {available})")]
    NoPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("{image}: already a Lode image")]
    AlreadyLode { image: String },
    #[error("layer {layer}: unsupported media type {media_type}")]
    UnsupportedLayer { layer: String, media_type: String },
    #[error("layer {layer}: {source}")]
    LayerRead {
        layer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: content digest is {actual}, the manifest says {expected}")]
    LayerDigest {
        layer: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer}: entry \"{entry}\": {problem}")]
    Entry {
        layer: String,
        entry: String,
        #[source]
        problem: EntryProblem,
    },
    #[error("prefetch list {path}: {message}")]
    Prefetch { path: String, message: String },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("conversion task failed: {0}")]
    Task(String),
}

impl ConvertError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
