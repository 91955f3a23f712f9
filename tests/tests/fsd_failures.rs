//! How Lode fails, with real components: a data blob corrupted in the
//! registry's storage, a registry that goes away or stops answering while an
//! image is mounted, and hostile source layers given to `lodectl convert`.
//!
//! Each test has its own registry and small image, since each breaks its
//! registry in its own way.

use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lode_common::registry::Reference;
use lode_tests::lode::{counter, fetch_bootstrap, file_chunks, timed_read};
use lode_tests::{
    lode_prerequisites, pseudo_random_bytes, skopeo_copy, Layer, LodeBinaries, OciLayoutBuilder,
    Registry, TarEntry,
};

const TAG: &str = "v1";
/// The smallest chunk size, so that small files span several chunks.
const CHUNK: u32 = 64 * 1024;
/// Longest a read that must fail may take beyond the configured deadline.
const SLACK: Duration = Duration::from_secs(5);

/// Builds an image from `layers`, pushes it as `repo:v1` and converts it to
/// `repo-lode:v1` with 64 KiB chunks. Returns the Lode reference.
fn push_and_convert(
    bins: &LodeBinaries,
    registry: &Registry,
    repo: &str,
    layers: Vec<Layer>,
) -> (Reference, tempfile::TempDir) {
    let layout = tempfile::tempdir().unwrap();
    let mut builder = OciLayoutBuilder::new();
    for layer in layers {
        builder = builder.layer(layer);
    }
    builder.write(layout.path(), TAG).expect("write OCI layout");
    let source = registry.reference(&format!("{repo}:{TAG}"));
    skopeo_copy(layout.path(), TAG, &source).expect("skopeo copy");
    let lode = registry.reference(&format!("{repo}-lode:{TAG}"));
    bins.lodectl
        .convert(&source, &lode, Some(CHUNK), None)
        .expect("lodectl convert");
    (lode, layout)
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    pseudo_random_bytes(seed, 0, len)
}

fn assert_eio(result: std::io::Result<Vec<u8>>, what: &str) {
    match result {
        Ok(data) => panic!("{what}: read {} bytes, expected EIO", data.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    }
}

/// XORs `len` bytes at `offset` of `path` with 0xff (twice restores them).
fn flip(path: &Path, offset: u64, len: usize) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    file.write_all_at(&buf, offset).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn corrupted_chunk_gives_eio_and_is_never_cached() {
    let Some(bins) = lode_prerequisites() else {
        return;
    };
    let registry = Registry::start().expect("start docker-registry");
    let victim = random(4 * CHUNK as usize, 11);
    let neighbour = random(100_000, 12);
    let (lode, _layout) = push_and_convert(
        &bins,
        &registry,
        "corrupt",
        vec![Layer::gzip(vec![
            TarEntry::file("victim", victim.clone()),
            TarEntry::file("neighbour", neighbour.clone()),
            TarEntry::file("text", "a small compressible file\n".repeat(100)),
        ])],
    );
    let work = tempfile::tempdir().unwrap();
    let (_, bootstrap) = fetch_bootstrap(&lode, work.path()).unwrap();
    let bootstrap = lode_common::format::Bootstrap::open(&bootstrap).unwrap();
    let chunks = file_chunks(&bootstrap, b"victim").unwrap();
    assert_eq!(chunks.len(), 4);
    // Random data is stored raw, so the flipped bytes reach the digest check
    // rather than failing zstd decoding.
    let bad = chunks[2];
    assert!(!bad.compressed, "{bad:?}");
    let blob_file = registry.blob_path(&bad.blob);
    let middle = bad.offset + u64::from(bad.stored_size) / 2;
    flip(&blob_file, middle, 16);

    let mount = bins
        .lodectl
        .mount(&lode, &work.path().join("cache"), &[])
        .expect("lodectl mount");
    let victim_path = mount.join("victim");
    let (result, _) = timed_read(victim_path.clone());
    assert_eio(result, "reading the file with the corrupted chunk");
    let errors_first = counter(&mount.metrics().unwrap(), "digest_errors");
    assert!(errors_first >= 1, "digest_errors {errors_first}");

    // The intact chunks around it, of the same file and of another file in
    // the same blob, read correctly.
    let file = std::fs::File::open(&victim_path).unwrap();
    let mut first = vec![0u8; CHUNK as usize];
    file.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, victim[..CHUNK as usize]);
    let mut last = vec![0u8; CHUNK as usize];
    file.read_exact_at(&mut last, 3 * u64::from(CHUNK)).unwrap();
    assert_eq!(last, victim[3 * CHUNK as usize..]);
    assert_eq!(std::fs::read(mount.join("neighbour")).unwrap(), neighbour);
    let mut middle_chunk = vec![0u8; 100];
    let err = file
        .read_exact_at(&mut middle_chunk, 2 * u64::from(CHUNK) + 10)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(file);

    // Not cached: a second read fetches and rejects the chunk again.
    let (result, _) = timed_read(victim_path.clone());
    assert_eio(result, "reading the corrupted file again");
    let errors_second = counter(&mount.metrics().unwrap(), "digest_errors");
    assert!(
        errors_second > errors_first,
        "digest_errors {errors_first} → {errors_second}: the bad chunk was not fetched again"
    );

    // Nor is the failure remembered: repaired in the registry, it reads.
    flip(&blob_file, middle, 16);
    let (result, _) = timed_read(victim_path);
    assert_eq!(result.expect("read after repair"), victim);
    let metrics = mount.metrics().unwrap();
    assert_eq!(
        counter(&metrics, "digest_errors"),
        errors_second,
        "{metrics}"
    );
    mount.umount().expect("lodectl umount");
}

/// An fsd configuration with a short fetch deadline and no readahead (so
/// that each read fetches only its own chunks).
fn short_deadline_config(dir: &Path, deadline_secs: u64) -> PathBuf {
    let path = dir.join("fsd.toml");
    std::fs::write(
        &path,
        format!(
            "[fetch]\n\
             deadline_secs = {deadline_secs}\n\
             readahead_bytes = 0\n\
             merge_limit_bytes = {CHUNK}\n\
             [registry]\n\
             request_timeout_secs = 2\n\
             max_retries = 1\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn reads_fail_within_the_deadline_while_the_registry_is_down_then_recover() {
    let Some(bins) = lode_prerequisites() else {
        return;
    };
    let registry = Registry::start().expect("start docker-registry");
    let files: Vec<Vec<u8>> = (0..3).map(|i| random(3 * CHUNK as usize, 20 + i)).collect();
    let (lode, _layout) = push_and_convert(
        &bins,
        &registry,
        "down",
        vec![Layer::gzip(
            files
                .iter()
                .enumerate()
                .map(|(i, data)| TarEntry::file(format!("f{i}"), data.clone()))
                .collect(),
        )],
    );
    let work = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(3);
    let config = short_deadline_config(work.path(), deadline.as_secs());
    let fsd = bins
        .lodectl
        .mount(
            &lode,
            &work.path().join("cache"),
            &["--fsd-config".into(), config.into()],
        )
        .expect("lodectl mount");

    // Refused connections.
    registry.stop();
    let (result, took) = timed_read(fsd.join("f0"));
    eprintln!("read with the registry stopped failed after {took:?}");
    assert_eio(result, "reading while the registry is stopped");
    assert!(took < deadline + SLACK, "failed after {took:?}");
    registry.restart().expect("restart docker-registry");
    let (result, _) = timed_read(fsd.join("f0"));
    assert_eq!(result.expect("read after restart"), files[0]);

    // A registry that accepts connections but never answers: only the
    // deadline ends the read.
    registry.pause().expect("pause docker-registry");
    let (result, took) = timed_read(fsd.join("f1"));
    let resumed = registry.resume();
    eprintln!("read with the registry paused failed after {took:?}");
    assert_eio(result, "reading while the registry hangs");
    // The deadline bounds each FUSE read request. The kernel sends two for
    // this read(2): its readahead request, and, once that fails, a
    // synchronous retry of the page the caller waits for (filemap_read →
    // filemap_update_page → read_folio); each waits the full deadline.
    assert!(
        took >= deadline - Duration::from_millis(100) && took < 2 * deadline + SLACK,
        "a hung registry failed the read after {took:?} (deadline {deadline:?})"
    );
    resumed.expect("resume docker-registry");
    let (result, _) = timed_read(fsd.join("f1"));
    assert_eq!(result.expect("read after resume"), files[1]);
    assert_eq!(std::fs::read(fsd.join("f2")).unwrap(), files[2]);

    let metrics = fsd.metrics().unwrap();
    assert!(counter(&metrics, "fetch_timeouts") >= 1, "{metrics}");
    assert!(counter(&metrics, "backend_errors") >= 1, "{metrics}");
    fsd.umount().expect("lodectl umount");
}

/// A file `token` names uniquely, so that finding it anywhere means the
/// converter wrote it.
fn unique_token() -> String {
    format!("lode-escape-{:016x}", rand::random::<u64>())
}

/// Every path below `dir` whose name contains `token`.
fn find_named(dir: &Path, token: &str, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in listing.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains(token) {
            found.push(path.clone());
        }
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && depth > 0 {
            found.extend(find_named(&path, token, depth - 1));
        }
    }
    found
}

#[test]
fn hostile_layers_are_refused_naming_the_entry_and_write_nothing_outside() {
    let Some(bins) = lode_prerequisites() else {
        return;
    };
    let registry = Registry::start().expect("start docker-registry");
    let work = tempfile::tempdir().unwrap();
    // lodectl runs with its own temporary directory and working directory
    // two levels below `work`, so that a `..` escape lands inside `work`.
    let tmp = work.path().join("a/tmp");
    let cwd = work.path().join("a/cwd");
    let sentinel = work.path().join("sentinel");
    for dir in [&tmp, &cwd, &sentinel] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut lodectl = bins.lodectl.clone();
    lodectl.env.push(("TMPDIR".into(), tmp.clone().into()));
    lodectl.cwd = Some(cwd.clone());
    let token = unique_token();
    let passwd = std::fs::symlink_metadata("/etc/passwd").ok();

    let cases: Vec<(&str, Vec<TarEntry>, String)> = vec![
        (
            "dotdot",
            vec![TarEntry::file(format!("../{token}"), "escaped\n")],
            format!("../{token}"),
        ),
        (
            "nested-dotdot",
            vec![
                TarEntry::dir("a"),
                TarEntry::file(format!("a/../../../{token}"), "escaped\n"),
            ],
            format!("a/../../../{token}"),
        ),
        (
            "hardlink-absolute",
            vec![
                TarEntry::file("ok", "fine\n"),
                TarEntry::hardlink(format!("{token}-passwd"), "/etc/passwd"),
            ],
            format!("{token}-passwd"),
        ),
        (
            "hardlink-dotdot",
            vec![TarEntry::hardlink(
                format!("{token}-up"),
                "../../../../../../etc/passwd",
            )],
            format!("{token}-up"),
        ),
        (
            "through-symlink",
            vec![
                TarEntry::symlink("out", sentinel.as_os_str().as_encoded_bytes()),
                TarEntry::file(format!("out/{token}"), "escaped\n"),
            ],
            format!("out/{token}"),
        ),
    ];
    for (name, entries, entry) in cases {
        let layout = work.path().join(format!("layout-{name}"));
        OciLayoutBuilder::new()
            .layer(Layer::gzip(entries))
            .write(&layout, TAG)
            .unwrap();
        let source = registry.reference(&format!("hostile/{name}:{TAG}"));
        skopeo_copy(&layout, TAG, &source).expect("skopeo copy");
        let target = registry.reference(&format!("hostile/{name}-lode:{TAG}"));
        let run = lodectl.convert_run(&source, &target, None, None).unwrap();
        assert!(!run.success, "{name}: converted: {run:?}");
        eprintln!(
            "{name}: {}",
            run.stderr
                .lines()
                .find(|l| l.starts_with("Error"))
                .unwrap_or_default()
        );
        assert_ne!(run.code, Some(0), "{name}");
        assert!(
            run.stderr.contains(&entry),
            "{name}: the error does not name entry {entry:?}: {}",
            run.stderr
        );
        let pushed: Vec<_> = registry
            .requests_for(&format!("/v2/hostile/{name}-lode/manifests/"))
            .into_iter()
            .filter(|r| r.method == "PUT")
            .collect();
        assert!(
            pushed.is_empty(),
            "{name}: a manifest was pushed: {pushed:?}"
        );
    }

    // Layout blobs are named by digest, so any name with the token is a
    // file some conversion wrote.
    let mut escaped = find_named(work.path(), &token, 6);
    for dir in [
        std::env::temp_dir(),
        PathBuf::from("/tmp"),
        PathBuf::from("/"),
        PathBuf::from("/etc"),
        work.path().parent().unwrap().to_path_buf(),
    ] {
        escaped.extend(find_named(&dir, &token, 0));
    }
    assert!(escaped.is_empty(), "written outside: {escaped:?}");
    assert_eq!(std::fs::read_dir(&sentinel).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "lodectl wrote into its working directory"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    if let (Some(before), Ok(after)) = (passwd, std::fs::symlink_metadata("/etc/passwd")) {
        assert_eq!(
            (before.ino(), before.nlink(), before.mtime(), before.size()),
            (after.ino(), after.nlink(), after.mtime(), after.size()),
            "/etc/passwd changed"
        );
    }
}
