//! Builds OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/`)
//! from layers described as tar entries, for pushing with `skopeo`.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use lode_common::digest::Hasher;
use lode_common::Digest;
use serde_json::{json, Value};

use crate::tar_writer::{write_tar, TarEntry};
use crate::KitError;

/// Annotation naming a manifest's tag in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    /// A plain tar layer.
    None,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// How names longer than the 100-byte header field are encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LongNames {
    /// GNU `L`/`K` entries (what GNU tar and the `tar` crate write).
    #[default]
    Gnu,
    /// PAX `path`/`linkpath` records (what Go tools such as BuildKit write).
    Pax,
}

/// One layer: its entries, in archive order, and how it is packed.
#[derive(Clone, Debug)]
pub struct Layer {
    pub entries: Vec<TarEntry>,
    pub compression: Compression,
    pub long_names: LongNames,
}

impl Layer {
    pub fn new(compression: Compression, entries: Vec<TarEntry>) -> Self {
        Self {
            entries,
            compression,
            long_names: LongNames::Gnu,
        }
    }

    pub fn gzip(entries: Vec<TarEntry>) -> Self {
        Self::new(Compression::Gzip, entries)
    }

    pub fn zstd(entries: Vec<TarEntry>) -> Self {
        Self::new(Compression::Zstd, entries)
    }

    /// Encode long names with PAX records instead of GNU entries.
    pub fn pax(mut self) -> Self {
        self.long_names = LongNames::Pax;
        self
    }

    /// The uncompressed tar of this layer.
    pub fn to_tar(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        write_tar(&mut out, &self.entries, self.long_names)?;
        Ok(out)
    }
}

/// A layer as written to the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltLayer {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    pub media_type: String,
}

/// What [`OciLayoutBuilder::write`] produced.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub layout_dir: PathBuf,
    pub tag: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<BuiltLayer>,
}

impl BuiltImage {
    /// Where blob `digest` lives in the layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.layout_dir, digest)
    }
}

fn blob_path(layout_dir: &Path, digest: &Digest) -> PathBuf {
    layout_dir.join("blobs").join("sha256").join(digest.hex())
}

/// Builds a single-platform image into an OCI layout directory.
#[derive(Clone, Debug, Default)]
pub struct OciLayoutBuilder {
    layers: Vec<Layer>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    working_dir: Option<String>,
    user: Option<String>,
    architecture: Option<String>,
}

impl OciLayoutBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer on top of the previous ones.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = Some(args.into_iter().map(Into::into).collect());
        self
    }

    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Adds `NAME=value` to the environment.
    pub fn env(mut self, variable: impl Into<String>) -> Self {
        self.env.push(variable.into());
        self
    }

    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// OCI architecture name; defaults to the host's.
    pub fn architecture(mut self, arch: impl Into<String>) -> Self {
        self.architecture = Some(arch.into());
        self
    }

    /// Writes the image into `layout_dir` (created if needed) under `tag`.
    /// An existing layout keeps its other tags; a manifest already tagged
    /// `tag` is replaced in `index.json`.
    pub fn write(&self, layout_dir: &Path, tag: &str) -> Result<BuiltImage, KitError> {
        let blobs = layout_dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(KitError::io(format!("create {}", blobs.display())))?;
        let layout_file = layout_dir.join("oci-layout");
        fs::write(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(KitError::io(format!("write {}", layout_file.display())))?;

        let mut layers = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let built = write_layer(layout_dir, layer).map_err(KitError::io(format!(
                "write layer {i} into {}",
                layout_dir.display()
            )))?;
            layers.push(built);
        }

        let config = serde_json::to_vec(&self.config_json(&layers))
            .map_err(|e| KitError::Invalid(e.to_string()))?;
        let config_digest = write_blob(layout_dir, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest.to_string(),
                "size": l.size,
            })).collect::<Vec<_>>(),
        });
        let manifest =
            serde_json::to_vec(&manifest).map_err(|e| KitError::Invalid(e.to_string()))?;
        let manifest_digest = write_blob(layout_dir, &manifest)?;
        update_index(layout_dir, tag, &manifest_digest, manifest.len())?;
        Ok(BuiltImage {
            layout_dir: layout_dir.to_path_buf(),
            tag: tag.to_owned(),
            manifest,
            manifest_digest,
            config,
            config_digest,
            layers,
        })
    }

    fn config_json(&self, layers: &[BuiltLayer]) -> Value {
        let mut config = serde_json::Map::new();
        if let Some(entrypoint) = &self.entrypoint {
            config.insert("Entrypoint".into(), json!(entrypoint));
        }
        if let Some(cmd) = &self.cmd {
            config.insert("Cmd".into(), json!(cmd));
        }
        if !self.env.is_empty() {
            config.insert("Env".into(), json!(self.env));
        }
        if let Some(dir) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(dir));
        }
        if let Some(user) = &self.user {
            config.insert("User".into(), json!(user));
        }
        json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture.clone().unwrap_or_else(host_architecture),
            "os": "linux",
            "config": config,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
            "history": layers.iter().enumerate().map(|(i, _)| json!({
                "created": "2023-11-14T22:13:20Z",
                "created_by": format!("lode test layer {i}"),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The OCI name of the machine's architecture.
pub fn host_architecture() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
    .to_owned()
}

fn write_blob(layout_dir: &Path, data: &[u8]) -> Result<Digest, KitError> {
    let digest = Digest::of(data);
    let path = blob_path(layout_dir, &digest);
    fs::write(&path, data).map_err(KitError::io(format!("write {}", path.display())))?;
    Ok(digest)
}

/// Counts and hashes what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Encoder<W: Write> {
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    None(W),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

/// Streams the layer's tar through the compressor into a temporary blob,
/// hashing both sides, then renames it to its digest.
fn write_layer(layout_dir: &Path, layer: &Layer) -> io::Result<BuiltLayer> {
    let blobs = layout_dir.join("blobs").join("sha256");
    let temp = tempfile::NamedTempFile::new_in(&blobs)?;
    let file_side = HashingWriter {
        inner: BufWriter::new(temp.as_file().try_clone()?),
        hasher: Hasher::new(),
        written: 0,
    };
    let encoder = match layer.compression {
        Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
            file_side,
            flate2::Compression::fast(),
        )),
        Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(file_side, 3)?),
        Compression::None => Encoder::None(file_side),
    };
    let mut tar_side = HashingWriter {
        inner: encoder,
        hasher: Hasher::new(),
        written: 0,
    };
    write_tar(&mut tar_side, &layer.entries, layer.long_names)?;
    let diff_id = tar_side.hasher.finish();
    let mut file_side = tar_side.inner.finish()?;
    file_side.flush()?;
    let digest = file_side.hasher.finish();
    let size = file_side.written;
    temp.persist(blob_path(layout_dir, &digest))
        .map_err(|e| e.error)?;
    Ok(BuiltLayer {
        digest,
        diff_id,
        size,
        media_type: layer.compression.media_type().to_owned(),
    })
}

fn update_index(
    layout_dir: &Path,
    tag: &str,
    digest: &Digest,
    size: usize,
) -> Result<(), KitError> {
    let path = layout_dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&path) {
        Ok(bytes) => {
            let index: Value = serde_json::from_slice(&bytes)
                .map_err(|e| KitError::Invalid(format!("{}: {e}", path.display())))?;
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(KitError::io(format!("read {}", path.display()))(e)),
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != tag);
    manifests.push(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest.to_string(),
        "size": size,
        "annotations": { REF_NAME_ANNOTATION: tag },
        "platform": { "architecture": host_architecture(), "os": "linux" },
    }));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec_pretty(&index).map_err(|e| KitError::Invalid(e.to_string()))?;
    fs::write(&path, bytes).map_err(KitError::io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn sample() -> OciLayoutBuilder {
        OciLayoutBuilder::new()
            .layer(Layer::gzip(vec![
                TarEntry::dir("etc"),
                TarEntry::file("etc/hello", "hello\n"),
                TarEntry::file("gone", "x"),
            ]))
            .layer(Layer::zstd(vec![TarEntry::whiteout("gone"), TarEntry::opaque("etc")]).pax())
            .layer(Layer::new(
                Compression::None,
                vec![TarEntry::random_file("big", 100_000, 1)],
            ))
            .cmd(["/bin/sh"])
            .env("A=b")
    }

    fn decompress(compression: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match compression {
            Compression::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            Compression::Zstd => {
                out = zstd::decode_all(data).unwrap();
            }
            Compression::None => out = data.to_vec(),
        }
        out
    }

    #[test]
    fn layout_is_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let builder = sample();
        let image = builder.write(dir.path(), "v1").unwrap();

        let index: Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], image.manifest_digest.to_string());
        assert_eq!(entry["annotations"][REF_NAME_ANNOTATION], "v1");
        assert!(dir.path().join("oci-layout").exists());

        let manifest_bytes = fs::read(image.blob_path(&image.manifest_digest)).unwrap();
        assert_eq!(Digest::of(&manifest_bytes), image.manifest_digest);
        let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(
            manifest["config"]["digest"],
            image.config_digest.to_string()
        );
        let config: Value =
            serde_json::from_slice(&fs::read(image.blob_path(&image.config_digest)).unwrap())
                .unwrap();
        assert_eq!(config["config"]["Cmd"][0], "/bin/sh");

        for (i, (layer, spec)) in image.layers.iter().zip(&builder.layers).enumerate() {
            assert_eq!(manifest["layers"][i]["digest"], layer.digest.to_string());
            assert_eq!(
                manifest["layers"][i]["mediaType"],
                spec.compression.media_type()
            );
            let blob = fs::read(image.blob_path(&layer.digest)).unwrap();
            assert_eq!(Digest::of(&blob), layer.digest);
            assert_eq!(blob.len() as u64, layer.size);
            let tar = decompress(spec.compression, &blob);
            assert_eq!(tar, spec.to_tar().unwrap());
            assert_eq!(Digest::of(&tar), layer.diff_id);
            assert_eq!(config["rootfs"]["diff_ids"][i], layer.diff_id.to_string());
        }
    }

    #[test]
    fn writing_is_reproducible_and_keeps_other_tags() {
        let dir = tempfile::tempdir().unwrap();
        let first = sample().write(dir.path(), "a").unwrap();
        let again = sample().write(dir.path(), "a").unwrap();
        assert_eq!(first.manifest_digest, again.manifest_digest);
        let other = OciLayoutBuilder::new()
            .layer(Layer::gzip(vec![TarEntry::file("f", "other")]))
            .write(dir.path(), "b")
            .unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let tags: Vec<(String, String)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["annotations"][REF_NAME_ANNOTATION]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    m["digest"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            tags,
            vec![
                ("a".to_owned(), first.manifest_digest.to_string()),
                ("b".to_owned(), other.manifest_digest.to_string())
            ]
        );
    }
}
