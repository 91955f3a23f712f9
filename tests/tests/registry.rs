//! The registry client against a real `docker-registry`, and the test kit's
//! layout builder and skopeo push against the same registry.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_common::oci::MEDIA_TYPE_OCI_MANIFEST;
use lode_common::registry::{RegistryClient, RegistryError, RegistryOptions};
use lode_common::Digest;
use lode_tests::{
    pseudo_random_bytes, skip_unless, skopeo_available, skopeo_copy, skopeo_copy_with_creds,
    write_docker_config, Layer, OciLayoutBuilder, Registry, TarEntry,
};

fn registry() -> Option<Registry> {
    if !skip_unless(Registry::available(), "docker-registry is not installed") {
        return None;
    }
    Some(Registry::start().expect("start docker-registry"))
}

/// A client reading credentials from `docker_config` only (never the
/// user's own `~/.docker/config.json`).
fn client_with(docker_config: &Path, timeout: Duration, max_retries: u32) -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        plain_http: false,
        request_timeout: timeout,
        max_retries,
        docker_config: Some(docker_config.to_path_buf()),
        ..RegistryOptions::default()
    })
    .expect("client")
}

fn anonymous_client(dir: &Path) -> RegistryClient {
    let config = dir.join("empty-docker-config.json");
    std::fs::write(&config, "{}").unwrap();
    client_with(&config, Duration::from_secs(10), 2)
}

fn blob(seed: u64, len: usize) -> (Bytes, Digest) {
    let data = Bytes::from(pseudo_random_bytes(seed, 0, len));
    let digest = Digest::of(&data);
    (data, digest)
}

#[tokio::test]
async fn push_from_memory_then_exists_and_pull() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/memory:v1");
    let (data, digest) = blob(1, 300_000);

    assert!(!client.blob_exists(&reference, &digest).await.unwrap());
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();
    assert!(client.blob_exists(&reference, &digest).await.unwrap());
    assert_eq!(client.pull_blob(&reference, &digest).await.unwrap(), data);

    let uploads_before = registry.requests_for("/blobs/uploads/").len();
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();
    assert_eq!(
        registry.requests_for("/blobs/uploads/").len(),
        uploads_before,
        "a blob the registry has is not uploaded again"
    );
}

#[tokio::test]
async fn push_file_in_chunks_and_pull_to_file() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/file");
    // Three PATCH requests of at most 8 MiB.
    let (data, digest) = blob(2, 20 * 1024 * 1024 + 123);
    let source = dir.path().join("source");
    std::fs::write(&source, &data).unwrap();

    client
        .push_blob_file(&reference, &digest, &source)
        .await
        .unwrap();
    let patches = registry
        .requests_for("/blobs/uploads/")
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 3);

    let target = dir.path().join("copy");
    let size = client
        .pull_blob_to_file(&reference, &digest, &target)
        .await
        .unwrap();
    assert_eq!(size, data.len() as u64);
    assert!(
        std::fs::read(&target).unwrap() == data,
        "downloaded file differs"
    );
}

#[tokio::test]
async fn ranges_are_exact_and_out_of_range_is_an_error() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/ranges");
    let (data, digest) = blob(3, 1 << 20);
    let size = data.len() as u64;
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();

    for (offset, len) in [
        (0, 100),
        (500_000, 4096),
        (size - 10, 10),
        (0, size),
        (7, 1),
    ] {
        let got = client
            .pull_blob_range(&reference, &digest, offset, len)
            .await
            .unwrap();
        assert_eq!(got.len() as u64, len);
        assert!(
            got[..] == data[offset as usize..(offset + len) as usize],
            "range {offset}+{len} differs"
        );
    }

    let err = client
        .pull_blob_range(&reference, &digest, size - 5, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::ShortRange {
                expected: 10,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = client
        .pull_blob_range(&reference, &digest, size + 10, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Request { .. }), "{err}");
    assert!(err.to_string().contains(&digest.to_string()), "{err}");

    let missing = Digest::of(b"never pushed");
    let err = client
        .pull_blob_range(&reference, &missing, 0, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn access_log_counts_the_bytes_of_a_range_request() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/log");
    let (data, digest) = blob(4, 2 << 20);
    client.push_blob(&reference, &digest, data).await.unwrap();
    let before = registry.bytes_served_for(&digest.to_string());

    client
        .pull_blob_range(&reference, &digest, 123_456, 65_536)
        .await
        .unwrap();

    // The registry logs a request once its handler returns, which can be
    // after the client has the body (and after the kit's log marker).
    let gets = || -> Vec<_> {
        registry
            .requests_for(&digest.to_string())
            .into_iter()
            .filter(|r| r.method == "GET")
            .collect()
    };
    lode_tests::wait_until(
        Duration::from_secs(10),
        "the range GET in the access log",
        || !gets().is_empty(),
    )
    .unwrap();
    let gets = gets();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].status, 206);
    assert_eq!(
        registry.bytes_served_for(&digest.to_string()) - before,
        65_536
    );
}

/// A manifest referencing `config` and `layer` (the registry checks that
/// referenced blobs exist).
fn manifest_for(config: (&[u8], Digest), layer: (&[u8], Digest)) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.1.to_string(),
            "size": config.0.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer.1.to_string(),
            "size": layer.0.len(),
        }],
    }))
    .unwrap()
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/manifest:v1");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = Digest::of(config);
    let (layer, layer_digest) = blob(5, 1000);
    client
        .push_blob(&reference, &config_digest, Bytes::from_static(config))
        .await
        .unwrap();
    client
        .push_blob(&reference, &layer_digest, layer.clone())
        .await
        .unwrap();
    let manifest = manifest_for((config, config_digest), (&layer, layer_digest));

    let digest = client
        .push_manifest(&reference, manifest.clone(), MEDIA_TYPE_OCI_MANIFEST)
        .await
        .unwrap();
    assert_eq!(digest, Digest::of(&manifest));

    let by_tag = client.pull_manifest(&reference).await.unwrap();
    assert_eq!(by_tag.bytes, manifest);
    assert_eq!(by_tag.media_type, MEDIA_TYPE_OCI_MANIFEST);
    assert_eq!(by_tag.digest, digest);
    let by_digest = client
        .pull_manifest(&reference.with_digest(digest))
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, manifest);

    // Pushing by digest alone works too.
    let untagged = registry.reference("lode/manifest").with_digest(digest);
    assert_eq!(
        client
            .push_manifest(&untagged, manifest, MEDIA_TYPE_OCI_MANIFEST)
            .await
            .unwrap(),
        digest
    );

    let err = client
        .pull_manifest(&registry.reference("lode/manifest:missing"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("lode/manifest:missing"), "{err}");
}

#[tokio::test]
async fn corrupted_blob_on_disk_is_a_digest_mismatch() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let client = anonymous_client(dir.path());
    let reference = registry.reference("lode/corrupt");
    let (data, digest) = blob(6, 50_000);
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();

    let path = registry.blob_path(&digest);
    let mut stored = std::fs::read(&path).expect("blob in registry storage");
    assert!(stored == data);
    stored[25_000] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let err = client.pull_blob(&reference, &digest).await.unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            digest: d, actual, ..
        } => {
            assert_eq!(*d, digest);
            assert_eq!(*actual, Digest::of(&stored));
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    let err = client
        .pull_blob_to_file(&reference, &digest, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn stopped_registry_fails_fast_and_restart_recovers() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let client = client_with(&config, Duration::from_secs(2), 2);
    let reference = registry.reference("lode/restart");
    let (data, digest) = blob(7, 10_000);
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();
    client
        .pull_blob_range(&reference, &digest, 0, 10)
        .await
        .unwrap();

    registry.stop();
    let start = Instant::now();
    let err = client
        .pull_blob_range(&reference, &digest, 0, 10)
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, RegistryError::Request { .. }), "{err}");
    assert!(err.to_string().contains(&reference.to_string()), "{err}");
    // Connection refused three times, with 100 + 200 ms of backoff.
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");

    registry.restart().unwrap();
    let got = client
        .pull_blob_range(&reference, &digest, 100, 50)
        .await
        .unwrap();
    assert!(got[..] == data[100..150]);
}

#[tokio::test]
async fn frozen_registry_times_out_within_the_deadline() {
    let Some(registry) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let timeout = Duration::from_millis(500);
    let client = client_with(&config, timeout, 1);
    let reference = registry.reference("lode/frozen");
    let (data, digest) = blob(8, 10_000);
    client.push_blob(&reference, &digest, data).await.unwrap();

    registry.pause().unwrap();
    let start = Instant::now();
    let err = client
        .pull_blob_range(&reference, &digest, 0, 10)
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    registry.resume().unwrap();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    // Two attempts of 500 ms and 100 ms of backoff.
    assert!(elapsed >= 2 * timeout, "took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    client
        .pull_blob_range(&reference, &digest, 0, 10)
        .await
        .unwrap();
}

#[tokio::test]
async fn basic_auth_credentials_from_docker_config() {
    if !skip_unless(Registry::available(), "docker-registry is not installed") {
        return;
    }
    let registry = Registry::start_with_auth("alice", "wonderland").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    registry.write_docker_config(&good).unwrap();
    let bad = dir.path().join("bad.json");
    write_docker_config(&bad, &registry.host(), "alice", "looking-glass").unwrap();

    let reference = registry.reference("lode/private:v1");
    let (data, digest) = blob(9, 4096);
    let client = client_with(&good, Duration::from_secs(10), 1);
    client
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();
    assert_eq!(client.pull_blob(&reference, &digest).await.unwrap(), data);
    assert_eq!(
        client
            .pull_blob_range(&reference, &digest, 1, 2)
            .await
            .unwrap()[..],
        data[1..3]
    );

    // The registry's 401 said to use basic credentials: the client sent
    // them without asking /v2/ for the challenge first.
    let pings: Vec<_> = registry
        .requests()
        .into_iter()
        .filter(|e| e.path == "/v2/" && e.user_agent.starts_with("lode/"))
        .collect();
    assert!(pings.is_empty(), "{pings:?}");

    let wrong = client_with(&bad, Duration::from_secs(10), 1);
    let err = wrong.pull_blob(&reference, &digest).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(!format!("{err} {err:?} {wrong:?}").contains("looking-glass"));

    let anonymous = anonymous_client(dir.path());
    let err = anonymous
        .blob_exists(&reference, &digest)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");

    if skip_unless(skopeo_available(), "skopeo is not installed") {
        let layout = dir.path().join("layout");
        let image = OciLayoutBuilder::new()
            .layer(Layer::gzip(vec![TarEntry::file("secret", "s")]))
            .write(&layout, "v1")
            .unwrap();
        skopeo_copy_with_creds(&layout, "v1", &reference, registry.credentials()).unwrap();
        assert_eq!(
            client.pull_manifest(&reference).await.unwrap().digest,
            image.manifest_digest
        );
    }
}

#[tokio::test]
async fn layout_pushed_with_skopeo_reads_back_unchanged() {
    let Some(registry) = registry() else { return };
    if !skip_unless(skopeo_available(), "skopeo is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let long_name = format!("deep/{}/file", "n".repeat(120));
    let image = OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![
            TarEntry::dir("etc"),
            TarEntry::file("etc/os-release", "ID=lode\n")
                .mode(0o644)
                .owner(0, 0),
            TarEntry::symlink("etc/link", "os-release"),
            TarEntry::hardlink("etc/hard", "etc/os-release"),
            TarEntry::char_device("dev/null", 1, 3),
            TarEntry::fifo("run/fifo"),
            TarEntry::random_file("data/big", 3 << 20, 11),
        ]))
        .layer(Layer::zstd(vec![
            TarEntry::whiteout("etc/link"),
            TarEntry::opaque("data"),
            TarEntry::file(b"bin/\xffname", "non-utf8").xattr("user.lode", "1"),
        ]))
        .layer(Layer::gzip(vec![TarEntry::file(&long_name, "long")]).pax())
        .cmd(["/bin/true"])
        .write(&layout, "v1")
        .unwrap();
    let reference = registry.reference("lode/layout:v1");
    skopeo_copy(&layout, "v1", &reference).unwrap();

    let client = anonymous_client(dir.path());
    let manifest = client.pull_manifest(&reference).await.unwrap();
    assert_eq!(
        manifest.digest, image.manifest_digest,
        "skopeo kept the manifest"
    );
    assert_eq!(manifest.bytes, image.manifest);
    let config = client
        .pull_blob(&reference, &image.config_digest)
        .await
        .unwrap();
    assert_eq!(config, image.config);
    for layer in &image.layers {
        let pulled = client.pull_blob(&reference, &layer.digest).await.unwrap();
        assert!(pulled[..] == std::fs::read(image.blob_path(&layer.digest)).unwrap()[..]);
        assert_eq!(pulled.len() as u64, layer.size);
    }
    assert_eq!(
        image
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>(),
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ]
    );
}

/// `lodectl convert` of a private image with credentials only from a docker
/// credential helper (`credHelpers`, then `credsStore`): a script on the
/// process's PATH answering as docker-credential-helpers do.
#[test]
fn lodectl_reads_and_writes_a_private_registry_through_a_credential_helper() {
    let Some(lodectl) = lode_tests::Lodectl::find() else {
        skip_unless(false, "lodectl is not built");
        return;
    };
    if !skip_unless(Registry::available(), "docker-registry is not installed")
        || !skip_unless(skopeo_available(), "skopeo is not installed")
    {
        return;
    }
    let registry = Registry::start_with_auth("helped", "from-the-helper").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    OciLayoutBuilder::new()
        .layer(Layer::gzip(vec![TarEntry::file("secret", "s")]))
        .write(&layout, "v1")
        .unwrap();
    let source = registry.reference("lode/helped:v1");
    skopeo_copy_with_creds(&layout, "v1", &source, registry.credentials()).unwrap();

    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = dir.path().join("asked");
    let helper = bin.join("docker-credential-lodetest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" >> {asked}\n\
             [ \"$server\" = \"{host}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             echo '{{\"ServerURL\":\"{host}\",\"Username\":\"helped\",\"Secret\":\"from-the-helper\"}}'\n",
            asked = asked.display(),
            host = registry.host(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (n, config) in [
        format!(
            r#"{{"credHelpers": {{"{}": "lodetest"}}}}"#,
            registry.host()
        ),
        r#"{"credsStore": "lodetest"}"#.to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let config_dir = dir.path().join(format!("docker{n}"));
        std::fs::create_dir(&config_dir).unwrap();
        std::fs::write(config_dir.join("config.json"), config).unwrap();
        let mut helped = lodectl.clone();
        helped.env.push(("PATH".into(), path.clone().into()));
        helped
            .env
            .push(("DOCKER_CONFIG".into(), config_dir.into_os_string()));
        let target = registry.reference(&format!("lode/helped:lode{n}"));
        helped
            .convert(&source, &target, None, None)
            .unwrap_or_else(|e| panic!("{config}: {e}"));
        let asked = std::fs::read_to_string(&asked).unwrap();
        assert!(asked.lines().all(|l| l == registry.host()), "{asked}");
    }
    // Without the helper the registry refuses.
    let mut anonymous = lodectl.clone();
    anonymous.env.push((
        "DOCKER_CONFIG".into(),
        dir.path().join("none").into_os_string(),
    ));
    let run = anonymous
        .convert_run(&source, &registry.reference("lode/helped:none"), None, None)
        .unwrap();
    assert!(!run.success);
    assert!(
        run.stderr.to_lowercase().contains("denied") || run.stderr.contains("401"),
        "{}",
        run.stderr
    );
}

/// A registry served over HTTPS with a certificate of its own making,
/// named in a containerd `hosts.toml`: trusted through the file's `ca`, or
/// with `skip_verify`, and refused without either.
#[tokio::test]
async fn a_tls_registry_is_trusted_through_its_hosts_toml() {
    use lode_common::registry::{hosts_for, Capability, HostClients, TlsOptions};
    if !skip_unless(Registry::available(), "docker-registry is not installed") {
        return;
    }
    let registry = Registry::start_with_tls().unwrap();
    let reference = registry.reference("lode/tls:v1");
    let (data, digest) = blob(21, 4096);
    let trusting = RegistryClient::new(RegistryOptions {
        tls: TlsOptions {
            ca: vec![registry.ca_path()],
            required: true,
            ..TlsOptions::default()
        },
        ..RegistryOptions::default()
    })
    .unwrap();
    trusting
        .push_blob(&reference, &digest, data.clone())
        .await
        .unwrap();

    let certs = tempfile::tempdir().unwrap();
    let host_dir = certs.path().join(registry.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(registry.ca_path(), host_dir.join("registry.pem")).unwrap();
    let url = format!("https://{}", registry.host());
    for (settings, trusted) in [
        ("ca = \"registry.pem\"", true),
        ("skip_verify = true", true),
        ("", false),
    ] {
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"{url}\"\n[host.\"{url}\"]\n{settings}\n"),
        )
        .unwrap();
        let hosts = hosts_for(certs.path(), &registry.host(), true).unwrap();
        assert!(hosts.iter().all(|h| h.https), "{hosts:?}");
        let clients =
            HostClients::new(vec![hosts[0].clone()], &RegistryOptions::default()).unwrap();
        let attempt = &clients.attempts(&reference, Capability::Pull)[0];
        let pulled = attempt.client.pull_blob(&attempt.reference, &digest).await;
        match (trusted, pulled) {
            (true, Ok(bytes)) => assert_eq!(bytes, data, "{settings}"),
            (false, Err(e)) => assert!(
                e.to_string().to_lowercase().contains("certificate"),
                "refused for its certificate: {e}"
            ),
            (_, other) => panic!("{settings}: {other:?}"),
        }
    }
}
