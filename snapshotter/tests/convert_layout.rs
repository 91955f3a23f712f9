//! `lodectl convert` from an OCI image layout to an OCI image layout: the
//! published image is read back (manifest, config, bootstrap, data blobs)
//! and compared with the tree the source layers describe.

use std::collections::BTreeMap;
use std::path::Path;

use lode_common::format::{Bootstrap, ChunkHash, ChunkIndex, Ino, InodeKind};
use lode_common::registry::Reference;
use lode_common::{image, Digest};
use lode_snapshotter::convert::{
    convert, prefetch_list::Listed, ConvertError, ConvertOptions, ImageLocation, PlatformSpec,
};
use lode_tests::{pseudo_random_bytes, BuiltImage, Compression, Layer, OciLayoutBuilder, TarEntry};
use serde_json::{json, Value};

const CHUNK: u32 = 64 * 1024;

/// What a path of the converted image should be.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expect {
    kind: InodeKind,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    /// File content, or symlink target.
    data: Vec<u8>,
    rdev: (u32, u32),
    mtime: (i64, u32),
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn expect(kind: InodeKind, perm: u32, data: impl Into<Vec<u8>>) -> Expect {
    Expect {
        kind,
        perm,
        uid: 0,
        gid: 0,
        nlink: 1,
        data: data.into(),
        rdev: (0, 0),
        mtime: (1_700_000_000, 0),
        xattrs: BTreeMap::new(),
    }
}

fn dir(perm: u32, nlink: u32) -> Expect {
    Expect {
        nlink,
        ..expect(InodeKind::Dir, perm, "")
    }
}

fn layout(dir: &Path, tag: &str) -> ImageLocation {
    ImageLocation::Layout {
        dir: dir.to_path_buf(),
        tag: Some(tag.to_owned()),
    }
}

fn options(source: ImageLocation, target: ImageLocation) -> ConvertOptions {
    let mut options = ConvertOptions::new(source, target);
    options.chunk_size = CHUNK;
    options.threads = 2;
    options
}

fn sample_image(dir: &Path) -> BuiltImage {
    let big = pseudo_random_bytes(1, 0, 300_000);
    let long_name = format!("usr/share/{}/file", "long".repeat(40));
    OciLayoutBuilder::new()
        .env("PATH=/usr/bin")
        .layer(Layer::gzip(vec![
            TarEntry::dir("etc"),
            TarEntry::file("etc/passwd", "root:x:0:0\n"),
            TarEntry::file("etc/shadow", "secret")
                .mode(0o640)
                .owner(0, 42),
            TarEntry::dir("usr/lib"),
            TarEntry::file("usr/lib/big", big.clone()),
            TarEntry::symlink("bin", "usr/bin"),
            TarEntry::file("usr/bin/tool", "#!tool").mode(0o4755),
            TarEntry::hardlink("usr/bin/alias", "usr/bin/tool"),
            TarEntry::char_device("dev/null", 1, 3),
            TarEntry::fifo("run/fifo"),
            TarEntry::dir("tmp").mode(0o1777),
            TarEntry::file("gone/a", "a"),
            TarEntry::file("keep/lower", "lower"),
            TarEntry::file("cap", "x").xattr("security.capability", [1u8, 2, 3]),
        ]))
        .layer(
            Layer::zstd(vec![
                TarEntry::whiteout("gone"),
                TarEntry::opaque("keep"),
                TarEntry::file("keep/upper", "upper"),
                TarEntry::file("usr/lib/big-copy", big),
                TarEntry::file("nanos", "n").pax_record("mtime", "1700000000.5"),
                TarEntry::file(&long_name, "long"),
                TarEntry::file(b"odd-\xff".as_slice(), "odd"),
            ])
            .pax(),
        )
        .layer(Layer::new(
            Compression::None,
            vec![
                TarEntry::file("etc/passwd", "root:x:0:0:new\n"),
                TarEntry::hardlink("passwd-link", "etc/passwd"),
                TarEntry::file("empty", ""),
            ],
        ))
        .write(dir, "v1")
        .expect("write source layout")
}

fn expected_tree() -> BTreeMap<Vec<u8>, Expect> {
    let long_dir = format!("usr/share/{}", "long".repeat(40));
    let long_name = format!("{long_dir}/file");
    let big = pseudo_random_bytes(1, 0, 300_000);
    let implicit = |nlink| Expect {
        mtime: (0, 0),
        ..dir(0o755, nlink)
    };
    let mut passwd = expect(InodeKind::File, 0o644, "root:x:0:0:new\n");
    passwd.nlink = 2;
    let mut tool = expect(InodeKind::File, 0o4755, "#!tool");
    tool.nlink = 2;
    let mut shadow = expect(InodeKind::File, 0o640, "secret");
    shadow.gid = 42;
    let mut null = expect(InodeKind::CharDevice, 0o666, "");
    null.rdev = (1, 3);
    let mut cap = expect(InodeKind::File, 0o644, "x");
    cap.xattrs
        .insert(b"security.capability".to_vec(), vec![1, 2, 3]);
    let mut nanos = expect(InodeKind::File, 0o644, "n");
    nanos.mtime = (1_700_000_000, 500_000_000);
    let entries: Vec<(&[u8], Expect)> = vec![
        (b"", implicit(8)),
        (b"bin", expect(InodeKind::Symlink, 0o777, "usr/bin")),
        (b"cap", cap),
        (b"dev", implicit(2)),
        (b"dev/null", null),
        (b"empty", expect(InodeKind::File, 0o644, "")),
        (b"etc", dir(0o755, 2)),
        (b"etc/passwd", passwd.clone()),
        (b"etc/shadow", shadow),
        (b"keep", implicit(2)),
        (b"keep/upper", expect(InodeKind::File, 0o644, "upper")),
        (b"nanos", nanos),
        (b"odd-\xff", expect(InodeKind::File, 0o644, "odd")),
        (b"passwd-link", passwd),
        (b"run", implicit(2)),
        (b"run/fifo", expect(InodeKind::Fifo, 0o644, "")),
        (b"tmp", dir(0o1777, 2)),
        (b"usr", implicit(5)),
        (b"usr/bin", implicit(2)),
        (b"usr/bin/alias", tool.clone()),
        (b"usr/bin/tool", tool),
        (b"usr/lib", dir(0o755, 2)),
        (b"usr/lib/big", expect(InodeKind::File, 0o644, big.clone())),
        (b"usr/lib/big-copy", expect(InodeKind::File, 0o644, big)),
        (b"usr/share", implicit(3)),
        (long_dir.as_bytes(), implicit(2)),
        (long_name.as_bytes(), expect(InodeKind::File, 0o644, "long")),
    ];
    entries.into_iter().map(|(p, e)| (p.to_vec(), e)).collect()
}

/// Reads every path of a bootstrap, file contents from the layout's blobs.
fn read_back(boot: &Bootstrap, layout_dir: &Path) -> BTreeMap<Vec<u8>, Expect> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Vec::new(), Ino::ROOT)];
    while let Some((path, ino)) = stack.pop() {
        let inode = boot.inode(ino).unwrap();
        let data = match inode.kind {
            InodeKind::File => file_content(boot, ino, layout_dir),
            InodeKind::Symlink => boot.symlink_target(ino).unwrap().to_vec(),
            _ => Vec::new(),
        };
        let xattrs = boot
            .xattr_names(ino)
            .unwrap()
            .into_iter()
            .map(|n| (n.to_vec(), boot.xattr(ino, n).unwrap().unwrap().to_vec()))
            .collect();
        if inode.kind == InodeKind::Dir {
            for i in 0..boot.dir_len(ino).unwrap() {
                let entry = boot.dir_entry(ino, i).unwrap().unwrap();
                let mut child = path.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(entry.name);
                stack.push((child, entry.ino));
            }
        }
        let got = Expect {
            kind: inode.kind,
            perm: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            data,
            rdev: (inode.rdev_major, inode.rdev_minor),
            mtime: (inode.mtime_sec, inode.mtime_nsec),
            xattrs,
        };
        out.insert(path, got);
    }
    out
}

fn file_content(boot: &Bootstrap, ino: Ino, layout_dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..boot.file_chunk_count(ino).unwrap() {
        let chunk = boot.chunk(boot.file_chunk(ino, i).unwrap()).unwrap();
        let blob = boot.blob(chunk.blob).unwrap();
        let bytes = std::fs::read(blob_path(layout_dir, &blob.digest)).unwrap();
        assert_eq!(bytes.len() as u64, blob.compressed_size);
        let start = chunk.compressed_offset as usize;
        let stored = &bytes[start..start + chunk.compressed_size as usize];
        let data = if chunk.compressed {
            zstd::bulk::decompress(stored, chunk.uncompressed_size as usize).unwrap()
        } else {
            stored.to_vec()
        };
        // The converter writes BLAKE3 chunk digests.
        assert_eq!(ChunkHash::Blake3.digest(&data), chunk.digest);
        out.extend(data);
    }
    out
}

fn blob_path(dir: &Path, digest: &Digest) -> std::path::PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn chunk_list(boot: &Bootstrap, path: &[&[u8]]) -> Vec<ChunkIndex> {
    let mut ino = Ino::ROOT;
    for part in path {
        ino = boot.lookup(ino, part).unwrap().unwrap().ino;
    }
    (0..boot.file_chunk_count(ino).unwrap())
        .map(|i| boot.file_chunk(ino, i).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_to_layout_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let built = sample_image(&src);
    let bootstrap_out = tmp.path().join("bootstrap");
    let mut opts = options(layout(&src, "v1"), layout(&dst, "lode"));
    opts.bootstrap_out = Some(bootstrap_out.clone());
    let listed = |path: &[u8], bytes| Listed {
        path: path.to_vec(),
        bytes,
    };
    // big is 300,000 bytes: chunks 0..5 of 64 KiB.
    opts.prefetch = vec![
        listed(b"/usr/lib/big", Some(70_000..140_000)),
        listed(b"/bin", None),
        listed(b"missing", None),
        listed(b"/usr/lib/big", Some(500_000..600_000)),
        listed(b"/usr/lib/big", Some(299_999..300_000)),
    ];
    let outcome = convert(&opts).await.expect("convert");
    assert_eq!(outcome.source_manifest_digest, built.manifest_digest);

    // index.json tags the manifest; its bytes hash to the digest.
    let index = read_json(&dst.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "lode"
    );
    assert_eq!(entry["digest"], outcome.manifest_digest.to_string());
    let manifest_bytes = std::fs::read(blob_path(&dst, &outcome.manifest_digest)).unwrap();
    assert_eq!(Digest::of(&manifest_bytes), outcome.manifest_digest);
    assert_eq!(manifest_bytes, outcome.manifest);
    let reference: Reference = "127.0.0.1:5000/unused:tag".parse().unwrap();
    let lode = image::parse_lode_manifest(&reference, outcome.manifest_digest, &manifest_bytes)
        .expect("a Lode manifest");
    let blob_digests: Vec<Digest> = outcome.blobs.iter().map(|b| b.0).collect();
    assert_eq!(lode.data_blobs, blob_digests);
    assert_eq!(lode.bootstrap, outcome.bootstrap_layer);
    assert_eq!(blob_digests.len(), 3, "every layer has new content");
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(
        manifest["annotations"]["lode.source.digest"],
        built.manifest_digest.to_string()
    );

    // The config keeps the source's settings and lists the new layers.
    let config_bytes = std::fs::read(blob_path(&dst, &outcome.config_digest)).unwrap();
    assert_eq!(
        manifest["config"]["digest"],
        outcome.config_digest.to_string()
    );
    let config: Value = serde_json::from_slice(&config_bytes).unwrap();
    let mut diff_ids: Vec<String> = blob_digests.iter().map(Digest::to_string).collect();
    diff_ids.push(outcome.bootstrap_diff_id.to_string());
    assert_eq!(config["rootfs"]["diff_ids"], json!(diff_ids));
    assert_eq!(config["config"]["Env"], json!(["PATH=/usr/bin"]));
    assert_eq!(config["history"].as_array().unwrap().len(), 4);

    // The bootstrap layer holds the bootstrap that was also written out.
    let layer = std::fs::read(blob_path(&dst, &outcome.bootstrap_layer)).unwrap();
    let extracted = tempfile::NamedTempFile::new().unwrap();
    image::extract_bootstrap(&layer, outcome.bootstrap_layer, extracted.as_file()).unwrap();
    let written = std::fs::read(&bootstrap_out).unwrap();
    assert_eq!(std::fs::read(extracted.path()).unwrap(), written);
    assert_eq!(written.len() as u64, outcome.bootstrap_size);

    let boot = Bootstrap::open(&bootstrap_out).unwrap();
    boot.verify_all().unwrap();
    assert_eq!(boot.chunk_size(), CHUNK);
    let blob_table: Vec<Digest> = (0..boot.blob_count())
        .map(|b| boot.blob(lode_common::format::BlobIndex(b)).unwrap().digest)
        .collect();
    assert_eq!(blob_table, blob_digests);

    let got = read_back(&boot, &dst);
    let want = expected_tree();
    let got_paths: Vec<&Vec<u8>> = got.keys().collect();
    let want_paths: Vec<&Vec<u8>> = want.keys().collect();
    assert_eq!(got_paths, want_paths);
    for (path, expected) in &want {
        assert_eq!(&got[path], expected, "{}", path.escape_ascii());
    }
    assert_eq!(
        chunk_list(&boot, &[b"usr", b"lib", b"big"]),
        chunk_list(&boot, &[b"usr", b"lib", b"big-copy"]),
        "identical files share chunks across layers"
    );
    let big = boot
        .lookup(
            boot.lookup(boot.lookup(Ino::ROOT, b"usr").unwrap().unwrap().ino, b"lib")
                .unwrap()
                .unwrap()
                .ino,
            b"big",
        )
        .unwrap()
        .unwrap();
    let listed: Vec<_> = boot
        .prefetch_list()
        .unwrap()
        .into_iter()
        .map(|r| (r.ino, r.chunks))
        .collect();
    assert_eq!(
        listed,
        vec![(big.ino, 1..3), (big.ino, 4..5)],
        "the chunks holding each listed range; a range past the end is skipped"
    );
    // The listed chunks lead their blob, in list order.
    let offsets: Vec<u64> = [1, 2, 4, 0, 3]
        .iter()
        .map(|&i| {
            boot.chunk(boot.file_chunk(big.ino, i).unwrap())
                .unwrap()
                .compressed_offset
        })
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversion_is_reproducible_and_the_cli_prints_the_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample_image(&src);
    let first = convert(&options(
        layout(&src, "v1"),
        layout(&tmp.path().join("a"), "x"),
    ))
    .await
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lodectl"))
        .arg("convert")
        .args(["--chunk-size", "64K"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:y", tmp.path().join("b").display()))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("converted layer"),
        "info logs off a terminal: {stderr}"
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.trim(), first.manifest_digest.to_string());
}

/// A layout whose only index.json entry is a nested index of two platforms.
fn multi_platform_layout(dir: &Path) -> (Digest, Digest) {
    let one = |arch: &str, tag: &str| {
        OciLayoutBuilder::new()
            .architecture(arch)
            .layer(Layer::gzip(vec![TarEntry::file("arch", arch)]))
            .write(dir, tag)
            .unwrap()
    };
    let amd = one("amd64", "amd");
    let arm = one("arm64", "arm");
    let descriptor = |image: &BuiltImage, arch: &str| {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest.to_string(),
            "size": image.manifest.len(),
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let nested = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor(&amd, "amd64"), descriptor(&arm, "arm64")],
    }))
    .unwrap();
    let nested_digest = Digest::of(&nested);
    std::fs::write(blob_path(dir, &nested_digest), &nested).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": nested_digest.to_string(),
            "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    (amd.manifest_digest, arm.manifest_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_is_picked_from_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let (amd, arm) = multi_platform_layout(&src);
    let out = tmp.path().join("out");

    let default = convert(&options(
        ImageLocation::Layout {
            dir: src.clone(),
            tag: None,
        },
        layout(&out, "d"),
    ))
    .await
    .unwrap();
    assert_eq!(default.source_manifest_digest, amd);

    let mut opts = options(layout(&src, "multi"), layout(&out, "arm"));
    opts.platform = "linux/arm64".parse().unwrap();
    let arm_outcome = convert(&opts).await.unwrap();
    assert_eq!(arm_outcome.source_manifest_digest, arm);

    opts.platform = PlatformSpec {
        os: "linux".into(),
        architecture: "s390x".into(),
        variant: None,
    };
    let err = convert(&opts).await.unwrap_err();
    assert!(matches!(err, ConvertError::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64"), "{err}");

    let index = read_json(&out.join("index.json"));
    let tags: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        tags,
        ["d", "arm"],
        "the failed conversion published nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_and_hostile_sources_are_refused() {
    let tmp = tempfile::tempdir().unwrap();

    // A plain tar layer with one byte changed still parses, but its digest
    // no longer matches the manifest.
    let src = tmp.path().join("damaged");
    let built = OciLayoutBuilder::new()
        .layer(Layer::new(
            Compression::None,
            vec![TarEntry::file("f", vec![b'a'; 2000])],
        ))
        .write(&src, "v1")
        .unwrap();
    let path = built.blob_path(&built.layers[0].digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] = b'b';
    std::fs::write(&path, bytes).unwrap();
    let target = tmp.path().join("never");
    let err = convert(&options(layout(&src, "v1"), layout(&target, "x")))
        .await
        .unwrap_err();
    assert!(matches!(err, ConvertError::LayerDigest { .. }), "{err}");

    let src = tmp.path().join("hostile");
    OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![TarEntry::file("ok", "x")]))
        .layer(Layer::gzip(vec![TarEntry::file("../../escape", "x")]))
        .write(&src, "v1")
        .unwrap();
    let err = convert(&options(layout(&src, "v1"), layout(&target, "x")))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("../../escape") && text.contains("#2/2"),
        "{text}"
    );
    assert!(!target.exists(), "nothing is written for a refused image");
    assert!(!tmp.path().join("escape").exists());

    let err = convert(&options(layout(&src, "nope"), layout(&target, "x")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no manifest tagged \"nope\""),
        "{err}"
    );
}

/// Rewrites a layout image's manifest with docker v2 media types.
fn as_docker_manifest(built: &BuiltImage) -> Digest {
    let mut manifest: Value = serde_json::from_slice(&built.manifest).unwrap();
    manifest["mediaType"] = json!("application/vnd.docker.distribution.manifest.v2+json");
    manifest["config"]["mediaType"] = json!("application/vnd.docker.container.image.v1+json");
    for layer in manifest["layers"].as_array_mut().unwrap() {
        layer["mediaType"] = json!("application/vnd.docker.image.rootfs.diff.tar.gzip");
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = Digest::of(&bytes);
    std::fs::write(blob_path(&built.layout_dir, &digest), &bytes).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": digest.to_string(),
            "size": bytes.len(),
        }],
    });
    std::fs::write(
        built.layout_dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_manifests_and_zstd_behind_a_gzip_media_type_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let built = OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![TarEntry::file("a", "gzip layer")]))
        .layer(Layer::zstd(vec![TarEntry::file("b", "zstd layer")]))
        .write(&src, "v1")
        .unwrap();
    let docker = as_docker_manifest(&built);
    let bootstrap_out = tmp.path().join("bootstrap");
    let mut opts = options(
        ImageLocation::Layout {
            dir: src,
            tag: None,
        },
        layout(&tmp.path().join("out"), "lode"),
    );
    opts.bootstrap_out = Some(bootstrap_out.clone());
    let outcome = convert(&opts).await.expect("convert");
    assert_eq!(outcome.source_manifest_digest, docker);
    let boot = Bootstrap::open(&bootstrap_out).unwrap();
    let got = read_back(&boot, &tmp.path().join("out"));
    assert_eq!(got[&b"a".to_vec()].data, b"gzip layer");
    assert_eq!(got[&b"b".to_vec()].data, b"zstd layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lode_image_is_not_converted_again() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![TarEntry::file("f", "x")]))
        .write(&src, "v1")
        .unwrap();
    let out = tmp.path().join("out");
    convert(&options(layout(&src, "v1"), layout(&out, "lode")))
        .await
        .unwrap();
    let err = convert(&options(layout(&out, "lode"), layout(&out, "again")))
        .await
        .unwrap_err();
    assert!(matches!(err, ConvertError::AlreadyLode { .. }), "{err}");
}
