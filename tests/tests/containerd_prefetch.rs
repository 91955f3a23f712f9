//! A pull of an image converted with a prefetch list, end to end with real
//! components (docker-registry, containerd 1.6 with lode-snapshotter, runc,
//! lode-fsd): the list's chunks are fetched while the pull goes on. Root
//! only (containers, FUSE, overlayfs).

use std::time::Duration;

use lode_common::registry::Reference;
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{image_metric, scrape, stack};
use lode_tests::wait_until;

/// The sum of a Prometheus counter over its images.
fn image_counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// An image converted with a prefetch list has its data blobs begin with
/// the listed chunks, and its manifest says how far: a pull has the
/// image's daemon fetch those fronts while the bootstrap is on its way, and
/// the image takes its prefetch list from them, so the registry sends them
/// once, also when the image's first layer is another's, already there.
/// A pull that fails after its first layer leaves no daemon behind but
/// the shared one, which runs with the snapshotter.
#[test]
fn a_pull_fetches_the_prefetch_list_ahead_and_a_failed_one_leaves_no_new_daemon_shared() {
    a_pull_fetches_the_prefetch_list_ahead("shared");
}

#[test]
fn a_pull_fetches_the_prefetch_list_ahead_and_a_failed_one_leaves_no_new_daemon_dedicated() {
    a_pull_fetches_the_prefetch_list_ahead("dedicated");
}

fn a_pull_fetches_the_prefetch_list_ahead(daemon_mode: &'static str) {
    let options = SnapshotterOptions {
        daemon_mode,
        ahead_wait_secs: Some(2),
        ..SnapshotterOptions::default()
    };
    let Some(s) = stack(options) else {
        return;
    };
    let idle = s.snapshotter.daemon_pids();
    let convert = |tag: &str, list: &str| {
        let image = s.registry.reference(&format!("app:{tag}"));
        let fronts = s.convert_listed(&s.app.plain, &image, list);
        (image, fronts)
    };
    let (listed, fronts) = convert("listed", "/data/motd\n/data/big\t0-1048576\n");
    s.pull_lazily("ahead", &listed);
    wait_until(Duration::from_secs(30), "the fronts fetched", || {
        s.data_bytes_served(&listed) == fronts
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} of {fronts}\n{}",
            s.data_bytes_served(&listed),
            s.logs()
        )
    });
    let url = s.snapshotter.metrics_url().expect("metrics endpoint");
    wait_until(
        Duration::from_secs(30),
        "the list taken from the fronts",
        || image_counter(&scrape(&url), "lode_image_ahead_bytes_total") == fronts,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&url)));
    let out = s.run(
        "ahead",
        &listed,
        "c1",
        "cat /data/motd; head -c 1048576 /data/big | sha256sum",
    );
    assert!(out.contains("hello from lode"), "{out}");
    assert!(out.contains(&s.app.big_range_sha256(0, 1 << 20)), "{out}");
    let metrics = scrape(&url);
    assert_eq!(
        s.data_bytes_served(&listed),
        image_counter(&metrics, "lode_image_fetched_bytes_total"),
        "the registry sent each byte the image fetched once: {metrics}"
    );

    // A second image shares its first data blob (busybox's layer, where
    // no file is listed) with the first, already there: its pull skips
    // that layer, and the first layer it prepares starts its fronts.
    let (sibling, sibling_fronts) = convert("sibling", "/data/big\t1048576-2097152\n");
    let blobs = |image| s.lode_manifest(image).data_blobs;
    let (ours, theirs) = (blobs(&listed), blobs(&sibling));
    assert_eq!(
        ours[0], theirs[0],
        "the two images share their first data blob"
    );
    assert_ne!(ours[1..], theirs[1..], "their lists differ");
    s.pull_lazily("ahead", &sibling);
    let taken_ahead = |image: &Reference| {
        image_metric(
            &scrape(&url),
            "lode_image_ahead_bytes_total",
            &image.to_string(),
        )
    };
    wait_until(
        Duration::from_secs(30),
        "the second image's list taken from its fronts",
        || taken_ahead(&sibling) == Some(sibling_fronts),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", taken_ahead(&sibling), s.logs()));

    // A bootstrap file no image names (a pull that failed after fetching
    // it, say), old enough to be past any pull, goes with containerd's
    // next Cleanup (after the sibling's removal); the mounted image's
    // file, made as old, stays.
    let bootstraps = s.snapshotter.root().join("bootstraps");
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let age = |path: &std::path::Path| {
        std::fs::File::options()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|f| f.set_modified(hour_ago))
            .unwrap()
    };
    let named: Vec<_> = std::fs::read_dir(&bootstraps)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    named.iter().for_each(|p| age(p));
    let stray = bootstraps.join("0123abcd.stray");
    age(&stray);
    s.remove_image("ahead", &sibling);
    wait_until(
        Duration::from_secs(30),
        "the stray bootstrap file to go",
        || !stray.exists(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.snapshotter.log()));
    let listed_file = format!("{}.", s.lode_manifest(&listed).bootstrap.hex());
    assert!(
        named.iter().any(|p| p.exists()
            && p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&listed_file)),
        "the mounted image's bootstrap file is gone: {named:?}"
    );

    s.remove_image("ahead", &listed);
    s.wait_for_no_instances_or_cache();
    wait_until(
        Duration::from_secs(30),
        "no daemon but the shared one",
        || s.snapshotter.daemon_pids() == idle,
    )
    .unwrap();
    let (broken, fronts) = convert("broken", "/data/big\t2097152-3145728\n");
    let bootstrap = s.lode_manifest(&broken).bootstrap;
    std::fs::remove_file(s.registry.blob_path(&bootstrap)).unwrap();
    // Its first data blob (busybox's layer) may be the listed image's.
    let before = s.data_bytes_served(&broken);
    let pull = s.try_pull_lazily("ahead", &broken);
    assert!(!pull.success, "a pull without its bootstrap fails");
    wait_until(Duration::from_secs(30), "the fronts fetched", || {
        s.data_bytes_served(&broken) - before == fronts
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    wait_until(
        Duration::from_secs(30),
        "a daemon started for the failed pull to stop",
        || s.snapshotter.daemon_pids() == idle && s.instance_mounts().is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.snapshotter.log()));
    if daemon_mode == "dedicated" {
        assert!(
            s.snapshotter
                .log()
                .contains("daemon stopped: the pull it was started for mounted no image"),
            "{}",
            s.snapshotter.log()
        );
    }
}
