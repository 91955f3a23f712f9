//! `lodectl convert` between registry references (a throw-away
//! docker-registry): the Lode image reads back through the registry client,
//! and converting the same source from a layout gives the same manifest.

use lode_common::format::{Bootstrap, Ino};
use lode_common::image;
use lode_common::registry::{RegistryClient, RegistryOptions};
use lode_snapshotter::convert::{convert, ConvertOptions, ImageLocation};
use lode_tests::{
    pseudo_random_bytes, skip_unless, skopeo_available, skopeo_copy, Layer, OciLayoutBuilder,
    Registry, TarEntry,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_to_registry_round_trip() {
    if !skip_unless(
        Registry::available() && skopeo_available(),
        "needs docker-registry and skopeo",
    ) {
        return;
    }
    let registry = Registry::start().expect("start registry");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let content = pseudo_random_bytes(9, 0, 200_000);
    OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![
            TarEntry::file("data/big", content.clone()),
            TarEntry::file("data/gone", "x"),
        ]))
        .layer(Layer::zstd(vec![
            TarEntry::whiteout("data/gone"),
            TarEntry::symlink("link", "data/big"),
        ]))
        .write(&src, "v1")
        .unwrap();
    let source = registry.reference("app:v1");
    skopeo_copy(&src, "v1", &source).expect("push source");
    let target = registry.reference("app:lode");

    let mut options = ConvertOptions::new(
        ImageLocation::Registry(source),
        ImageLocation::Registry(target.clone()),
    );
    options.chunk_size = 64 * 1024;
    options.threads = 2;
    let outcome = convert(&options).await.expect("convert");

    let client = RegistryClient::new(RegistryOptions::default()).unwrap();
    let lode = image::resolve(&client, &target)
        .await
        .expect("a Lode image");
    assert_eq!(lode.manifest_digest, outcome.manifest_digest);
    assert_eq!(lode.data_blobs.len(), 1, "layer 2 has no file data");
    let path = image::fetch_bootstrap(&client, &target, &lode, &tmp.path().join("boot"))
        .await
        .unwrap();
    let boot = Bootstrap::open(&path).unwrap();
    boot.verify_all().unwrap();
    let data = boot.lookup(Ino::ROOT, b"data").unwrap().unwrap();
    assert!(boot.lookup(data.ino, b"gone").unwrap().is_none());
    let big = boot.lookup(data.ino, b"big").unwrap().unwrap();
    let mut read = Vec::new();
    for i in 0..boot.file_chunk_count(big.ino).unwrap() {
        let chunk = boot.chunk(boot.file_chunk(big.ino, i).unwrap()).unwrap();
        let blob = boot.blob(chunk.blob).unwrap();
        let stored = client
            .pull_blob_range(
                &target,
                &blob.digest,
                chunk.compressed_offset,
                u64::from(chunk.compressed_size),
            )
            .await
            .unwrap();
        read.extend(if chunk.compressed {
            zstd::bulk::decompress(&stored, chunk.uncompressed_size as usize).unwrap()
        } else {
            stored.to_vec()
        });
    }
    assert_eq!(read, content);

    // The same source from the layout converts to the very same manifest.
    let mut options = ConvertOptions::new(
        ImageLocation::Layout {
            dir: src,
            tag: Some("v1".into()),
        },
        ImageLocation::Layout {
            dir: tmp.path().join("out"),
            tag: None,
        },
    );
    options.chunk_size = 64 * 1024;
    let from_layout = convert(&options).await.unwrap();
    assert_eq!(from_layout.manifest_digest, outcome.manifest_digest);
}
