//! End to end with real components: docker-registry, containerd 1.6 with
//! lode-snapshotter as its proxy snapshotter, runc containers, lode-fsd
//! daemons. Root only (containers, FUSE, overlayfs).

use std::time::{Duration, Instant};

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_tests::mounts::mounts_below;
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{
    image_metric, rounds, scrape, sha256_hex, stack, wait_for_rounds, wait_for_total_rounds, Stack,
};
use lode_tests::{pseudo_random_bytes, wait_until};

#[test]
fn lode_image_runs_lazily_fetching_a_fraction_of_its_data() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let before_pull = s.data_bytes_served(&s.app.lode);
    let bootstrap = s.lode_manifest(&s.app.lode).bootstrap.to_string();
    let requests_before = s.registry.requests().len();
    let started = Instant::now();
    let pulled = s.pull_lazily("lazy", &s.app.lode);
    let pull_time = started.elapsed();
    assert!(pulled.contains(" 0 unpacked"), "{pulled}");
    // lodectl fetched the manifest once; the snapshotter read it from
    // containerd's content store and fetched the bootstrap.
    let pull_requests: Vec<String> = s.registry.requests()[requests_before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let count = |needle: &str| pull_requests.iter().filter(|r| r.contains(needle)).count();
    assert_eq!(
        (count("/manifests/"), count(&bootstrap)),
        (1, 1),
        "manifest and bootstrap requests of the pull: {pull_requests:#?}"
    );
    assert_eq!(
        s.data_bytes_served(&s.app.lode),
        0,
        "a lazy pull downloads no data blob: {:?}",
        s.data_blobs(&s.app.lode)
            .iter()
            .map(|d| s.registry.requests_for(&d.to_string()))
            .collect::<Vec<_>>()
    );
    // The pull already started serving the image: its first container
    // finds the instance mounted.
    wait_until(
        Duration::from_secs(30),
        "the image served after its pull",
        || !s.instance_mounts().is_empty(),
    )
    .unwrap();
    let started = Instant::now();
    let out = s.run(
        "lazy",
        &s.app.lode,
        "c1",
        "cat /data/motd; head -c 65536 /data/big | sha256sum",
    );
    let run_time = started.elapsed();
    let expected = sha256_hex(&pseudo_random_bytes(7, 0, 65536));
    assert!(out.contains("hello from lode"), "{out}");
    assert!(out.contains(&expected), "{out}");
    let served = s.data_bytes_served(&s.app.lode) - before_pull;
    let total: u64 = s
        .data_blobs(&s.app.lode)
        .iter()
        .map(|d| {
            std::fs::metadata(s.registry.blob_path(d))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    eprintln!(
        "lazy: pull {pull_time:?}, run {run_time:?}, fetched {served} of {total} data-blob bytes ({:.1}%)",
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served > 0 && served * 2 < total,
        "fetched {served} of {total}"
    );
}

#[test]
fn plain_images_fall_back_to_overlay_snapshots() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let image = s.app.plain.to_string();
    s.containerd
        .ctr_ok(
            "plain",
            [
                "image",
                "pull",
                "--plain-http",
                "--snapshotter",
                SNAPSHOTTER,
                &image,
            ],
        )
        .unwrap();
    let out = s
        .containerd
        .ctr_ok(
            "plain",
            [
                "run",
                "--rm",
                "--snapshotter",
                SNAPSHOTTER,
                &image,
                "p1",
                "/bin/sh",
                "-c",
                "cat /data/motd; echo w > /tmp/x; cat /tmp/x",
            ],
        )
        .unwrap();
    assert!(
        out.contains("hello from lode") && out.contains('w'),
        "{out}"
    );
    // lodectl pull unpacks plain layers through containerd's diff service.
    let pulled = s.pull_lazily("plain2", &s.app.plain);
    assert!(pulled.contains("0 layer(s) lazy, 2 unpacked"), "{pulled}");
    let out = s
        .containerd
        .ctr_ok(
            "plain2",
            [
                "run",
                "--rm",
                "--snapshotter",
                SNAPSHOTTER,
                &image,
                "p2",
                "/bin/cat",
                "/data/motd",
            ],
        )
        .unwrap();
    assert!(out.contains("hello from lode"), "{out}");
    assert!(
        s.instance_mounts().is_empty(),
        "plain images need no instance"
    );
}

#[test]
fn snapshotter_kill_keeps_containers_reading_and_state_intact() {
    let Some(mut s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    s.pull_lazily("lazy", &s.app.lode);
    let log = s.start_reader("lazy", &s.app, "reader");
    let before = s
        .containerd
        .ctr_ok("lazy", ["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
        .unwrap();
    let daemons = s.snapshotter.daemon_pids();
    s.snapshotter.kill9();
    wait_for_rounds(&log, 2);
    s.snapshotter.restart().unwrap();
    assert_eq!(
        s.snapshotter.daemon_pids(),
        daemons,
        "the daemon outlives the snapshotter"
    );
    assert!(s
        .snapshotter
        .log()
        .contains("re-attached to running daemon"));
    s.wait_for_containerd_to_reach_snapshotter("lazy", &[]);
    wait_for_rounds(&log, 2);
    let out = s.run("lazy", &s.app.lode, "after", "cat /data/motd");
    assert!(out.contains("hello from lode"), "{out}");
    let after = s
        .containerd
        .ctr_ok("lazy", ["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
        .unwrap();
    assert_eq!(before, after);
    let (_, errors) = rounds(&log);
    assert!(errors.is_empty(), "reader errors: {errors:?}");
}

#[test]
fn daemon_kill_with_failover_is_only_a_pause_for_readers() {
    failover_cycles(SnapshotterOptions::default(), 5);
}

#[test]
fn dedicated_daemon_kill_with_failover_is_only_a_pause_for_readers() {
    failover_cycles(
        SnapshotterOptions {
            daemon_mode: "dedicated",
            ..SnapshotterOptions::default()
        },
        3,
    );
}

/// Kills the image's daemon `kills` times while a container verifies its
/// files in a loop: the container must see no error, and the registry must
/// serve no more of the image's data blobs than to the same reader running
/// as many rounds from a cold cache without kills (10% slack). Before each
/// kill the daemon has time to make the chunks read durable in its cache;
/// after it (or its place in the run without kills) the kernel's cached
/// pages of the file are dropped, so that the reader's next rounds reach
/// the daemon.
fn failover_cycles(options: SnapshotterOptions, kills: usize) {
    let Some(s) = stack(options) else {
        return;
    };
    let chunks = s.reader_chunks(&s.app);
    let before = s.data_bytes_served(&s.app.lode);
    s.pull_lazily("lazy", &s.app.lode);
    let log = s.start_reader("lazy", &s.app, "reader");
    let not_durable = reader_cycles(&s, &log, kills, Some(&chunks));
    check_recoveries(&s, kills);
    s.containerd.remove_container("lazy", "reader").unwrap();
    let (total, errors) = rounds(&log);
    assert!(
        errors.is_empty(),
        "reader errors: {errors:?}\n{}",
        s.snapshotter.log()
    );
    remove_image_and_its_cache(&s);
    let with_kills = s.data_bytes_served(&s.app.lode) - before;
    let without_kills = bytes_served_without_kills(&s, kills, total);
    eprintln!(
        "failover: {kills} kills, {total} verified reads, 0 errors; data-blob bytes \
         served: {with_kills} with kills, {without_kills} for {total} rounds without kills \
         ({:.2}x)",
        with_kills as f64 / without_kills as f64
    );
    assert!(
        with_kills * 10 <= without_kills * 11,
        "successors fetched again what their predecessors had fetched: the registry \
         served {with_kills} data-blob bytes to a reader whose daemon was killed {kills} \
         times, {without_kills} to the same reader for as many rounds ({total}) without \
         kills; chunks not durable when killed: {not_durable:?}"
    );
}

/// How long a daemon may take to make the chunks read durable: three of
/// lode-fsd's default flush intervals.
const DURABLE_WITHIN: Duration = Duration::from_secs(3);

/// `cycles` times: when `kill_after` names the chunks the reader reads, wait
/// until they are durable and kill the daemon, then wait for its successor;
/// drop the file's cached pages, and wait for two more rounds of the reader
/// (the second one reads only through the daemon). Returns, per kill whose
/// chunks were not all durable in time, how many were.
fn reader_cycles(
    s: &Stack,
    log: &std::path::Path,
    cycles: usize,
    kill_after: Option<&[lode_tests::lode::ChunkLocation]>,
) -> Vec<String> {
    let mut not_durable = Vec::new();
    for cycle in 1..=cycles {
        if let Some(chunks) = kill_after {
            let durable = wait_until(DURABLE_WITHIN, "the chunks read to be durable", || {
                s.durable_chunks(chunks) == chunks.len()
            });
            if durable.is_err() {
                not_durable.push(format!(
                    "kill {cycle}: {} of {} after {DURABLE_WITHIN:?}",
                    s.durable_chunks(chunks),
                    chunks.len()
                ));
            }
            kill_daemon(s, cycle);
        }
        assert!(
            s.drop_cached_pages("data/big") > 0,
            "cycle {cycle}: no data/big below {}",
            s.snapshotter.root().display()
        );
        wait_for_rounds(log, 2);
    }
    not_durable
}

/// The `nth` kill of the image's daemon; returns once a successor serves.
fn kill_daemon(s: &Stack, nth: usize) {
    let pids = s.snapshotter.daemon_pids();
    assert_eq!(
        pids.len(),
        1,
        "kill {nth}: one daemon serves the image: {pids:?}\n{}",
        s.snapshotter.log()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Reads of cached pages never reach the daemon: wait until the
    // successor says it serves, not only for reader progress.
    wait_until(
        Duration::from_secs(30),
        "a successor daemon serving",
        || s.snapshotter.log().matches("takeover=true").count() >= nth,
    )
    .unwrap();
    assert!(
        !s.instance_mounts().is_empty(),
        "kill {nth}: the instance mount disappeared"
    );
}

/// Every kill was recovered by a successor, as the log and the metrics say.
fn check_recoveries(s: &Stack, kills: usize) {
    let log_text = s.snapshotter.log();
    assert_eq!(
        log_text.matches("takeover=true").count(),
        kills,
        "{log_text}"
    );
    let metrics = scrape(
        &s.snapshotter
            .metrics_url()
            .expect("metrics endpoint in the log"),
    );
    assert!(
        metrics.contains(&format!(
            "lode_snapshotter_daemon_recoveries_total{{how=\"failover\"}} {kills}"
        )),
        "{metrics}"
    );
    // Figures scraped from the live daemon (its counters start afresh
    // with each successor), labelled with the image the successor took over.
    assert!(
        image_metric(
            &metrics,
            "lode_image_read_bytes_total",
            &s.app.lode.to_string()
        )
        .is_some()
            && metrics.contains("state=\"RUNNING\"} 1"),
        "{metrics}"
    );
}

/// Removes the image (its containers are gone) and waits until its mount
/// and its cached chunks are gone too: the next pull starts cold.
fn remove_image_and_its_cache(s: &Stack) {
    s.remove_image("lazy", &s.app.lode);
    s.wait_for_no_instances_or_cache();
}

/// Data-blob bytes the registry serves to a reader of the image that runs
/// `total` rounds from a cold cache, `cycles` of them as in
/// [`reader_cycles`] with no kill.
fn bytes_served_without_kills(s: &Stack, cycles: usize, total: usize) -> u64 {
    let before = s.data_bytes_served(&s.app.lode);
    s.pull_lazily("lazy", &s.app.lode);
    let log = s.start_reader("lazy", &s.app, "unkilled");
    reader_cycles(s, &log, cycles, None);
    wait_for_total_rounds(&log, total);
    s.containerd.remove_container("lazy", "unkilled").unwrap();
    let (_, errors) = rounds(&log);
    assert!(errors.is_empty(), "reader errors without kills: {errors:?}");
    remove_image_and_its_cache(s);
    s.data_bytes_served(&s.app.lode) - before
}

#[test]
fn daemon_kill_with_restart_serves_new_reads() {
    let Some(s) = stack(SnapshotterOptions {
        recover_policy: "restart",
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    s.pull_lazily("lazy", &s.app.lode);
    assert!(s
        .run("lazy", &s.app.lode, "first", "cat /data/motd")
        .contains("hello from lode"));
    let pids = s.snapshotter.daemon_pids();
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The first fresh start was the snapshotter's own.
    wait_until(Duration::from_secs(30), "a restarted daemon", || {
        s.snapshotter.log().matches("takeover=false").count() == 2 && {
            let now = s.snapshotter.daemon_pids();
            now.len() == 1 && now[0] != pids[0]
        }
    })
    .unwrap();
    let out = s.run(
        "lazy",
        &s.app.lode,
        "second",
        "cat /data/motd; head -c 4096 /data/big | sha256sum",
    );
    assert!(
        out.contains("hello from lode")
            && out.contains(&sha256_hex(&pseudo_random_bytes(7, 0, 4096))),
        "{out}\nsnapshotter log:\n{}\ndaemon log:\n{}",
        s.snapshotter.log(),
        s.snapshotter.daemon_log("shared")
    );
}

#[test]
fn removing_containers_and_images_leaves_no_instances_or_cache_shared() {
    removing_containers_and_images_leaves_no_instances_or_cache(SnapshotterOptions::default());
}

#[test]
fn removing_containers_and_images_leaves_no_instances_or_cache_dedicated() {
    removing_containers_and_images_leaves_no_instances_or_cache(SnapshotterOptions {
        daemon_mode: "dedicated",
        ..SnapshotterOptions::default()
    });
}

/// Removing an image's containers and the image unmounts its instance and
/// removes its cached blobs and bootstrap. A dedicated daemon stops with
/// its image; the shared daemon, started with the snapshotter before any
/// image, runs on (the same process) to serve the next pull.
fn removing_containers_and_images_leaves_no_instances_or_cache(options: SnapshotterOptions) {
    let shared = options.daemon_mode == "shared";
    let Some(s) = stack(options) else {
        return;
    };
    let idle = s.snapshotter.daemon_pids();
    assert_eq!(
        idle.len(),
        usize::from(shared),
        "daemons before any Lode image: {idle:?}"
    );
    s.pull_lazily("lazy", &s.app.lode);
    s.run(
        "lazy",
        &s.app.lode,
        "c1",
        "head -c 100000 /data/big > /dev/null",
    );
    let serving = s.snapshotter.daemon_pids();
    assert_eq!(serving.len(), 1);
    if shared {
        assert_eq!(serving, idle, "the shared daemon serves the image");
    }
    let count =
        |dir: &str| std::fs::read_dir(s.snapshotter.root().join(dir)).map_or(0, |d| d.count());
    let cached = || count("cache");
    assert!(cached() > 0, "reading fills the cache");
    assert_eq!(count("bootstraps"), 1, "the pull fetched the bootstrap");
    s.remove_image("lazy", &s.app.lode);
    wait_until(
        Duration::from_secs(30),
        "the image's instance, cached blobs and bootstrap to go",
        || s.instance_mounts().is_empty() && cached() == 0 && count("bootstraps") == 0,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: instances {:?}, cache files {}, bootstraps {}\n{}",
            s.instance_mounts(),
            cached(),
            count("bootstraps"),
            s.snapshotter.log()
        )
    });
    assert_eq!(s.snapshotter.daemon_pids(), idle, "daemons left");
    let mounts = mounts_below(&s.snapshotter.root());
    assert_eq!(mounts.len(), usize::from(shared), "mounts left: {mounts:?}");
    let left = s
        .containerd
        .ctr_ok("lazy", ["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
        .unwrap();
    assert_eq!(left.lines().count(), 1, "snapshots left: {left}");
    // Pulled again, the image is whole: its bootstrap is fetched anew.
    s.pull_lazily("lazy", &s.app.lode);
    assert!(s
        .run("lazy", &s.app.lode, "c2", "cat /data/motd")
        .contains("hello from lode"));
    assert_eq!(count("bootstraps"), 1);
}

/// A pull prepares a Lode image's layers from the diff_ids its manifest's
/// layers are annotated with, while the config arrives; a manifest whose
/// annotations the config contradicts is refused, and leaves no image.
#[test]
fn layer_annotations_that_contradict_the_config_fail_the_pull() {
    use lode_common::oci::ANNOTATION_UNCOMPRESSED;
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let tampered = s.app.lode.with_tag("tampered");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = s.registry.client();
        let raw = client.pull_manifest(&s.app.lode).await.unwrap();
        let mut manifest: serde_json::Value = serde_json::from_slice(&raw.bytes).unwrap();
        let first = &mut manifest["layers"][0]["annotations"][ANNOTATION_UNCOMPRESSED];
        assert!(
            first.is_string(),
            "the converter annotates layers: {manifest}"
        );
        *first = lode_common::Digest::of(b"another layer").to_string().into();
        client
            .push_manifest(
                &tampered,
                serde_json::to_vec(&manifest).unwrap(),
                &raw.media_type,
            )
            .await
            .unwrap_or_else(|e| panic!("push {tampered}: {e}"));
    });
    let run = s.try_pull_lazily("lazy", &tampered);
    assert!(!run.success, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("containerd.io/uncompressed annotations disagree with the config's diff_ids"),
        "{}",
        run.stderr
    );
    let images = s.containerd.ctr_ok("lazy", ["images", "ls", "-q"]).unwrap();
    assert!(!images.contains("tampered"), "{images}");
    // The image as converted pulls and runs.
    s.pull_lazily("lazy", &s.app.lode);
    assert!(s
        .run("lazy", &s.app.lode, "c1", "cat /data/motd")
        .contains("hello from lode"));
}

#[test]
fn doctor_checks_the_node_and_names_the_fixes() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let doctor = |containerd_config: &std::path::Path| {
        s.lodectl
            .run([
                "doctor".to_owned(),
                "--containerd-config".to_owned(),
                containerd_config.display().to_string(),
                // containerd's socket: the snapshotter config's.
                "--config".to_owned(),
                s.snapshotter.config_path().display().to_string(),
            ])
            .unwrap()
    };
    // The test node: Lode registered and answering, CRI off (a warning).
    let kit_config = s.containerd.dir().join("config.toml");
    let run = doctor(&kit_config);
    assert!(run.success, "{}\n{}", run.stdout, run.stderr);
    for line in [
        "ok   containerd: proxy plugin",
        "ok   containerd: socket",
        "ok   snapshotter: socket",
        "WARN containerd: CRI (Kubernetes): the CRI plugin is disabled",
    ] {
        assert!(
            run.stdout.contains(line),
            "{line:?} missing:\n{}",
            run.stdout
        );
    }
    // CRI on, with pods on Lode but the annotations left at containerd
    // 1.6's default: the failure says what to change.
    let cri_on = std::fs::read_to_string(&kit_config)
        .unwrap()
        .replace("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n", "")
        + "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lode\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cri_on).unwrap();
    let run = doctor(&path);
    assert!(!run.success, "{}", run.stdout);
    assert!(
        run.stdout.contains("FAIL containerd: CRI (Kubernetes): CRI does not pass image labels")
            && run.stdout.contains(
                "fix: set disable_snapshot_annotations = false under [plugins.\"io.containerd.grpc.v1.cri\".containerd]"
            ),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("1 check(s) failed"), "{}", run.stderr);
}

/// A record of every table of the metadata store damaged while the
/// snapshotter is down: it starts again, names them, detaches nothing and
/// stops no daemon, the running container reads on, and another image
/// runs beside it.
fn damaged_records_leave_running_containers_alone(options: SnapshotterOptions) {
    let shared = options.daemon_mode == "shared";
    let Some(mut s) = stack(options) else {
        return;
    };
    s.pull_lazily("lazy", &s.app.lode);
    let log = s.start_reader("lazy", &s.app, "reader");
    wait_for_rounds(&log, 1);
    let daemons = s.snapshotter.daemon_pids();
    let mounts = mounts_below(&s.snapshotter.root());
    assert!(!mounts.is_empty());
    s.snapshotter.kill9();
    let damaged = s.snapshotter.damage_one_record_per_table().unwrap();
    let tables: Vec<&str> = damaged.iter().map(|(t, _)| t.as_str()).collect();
    for table in ["snapshots", "lode_images", "daemons", "instances"] {
        assert!(tables.contains(&table), "{table} not damaged: {damaged:?}");
    }
    // It starts (serves its socket) despite them.
    s.snapshotter.restart().unwrap();
    assert_eq!(s.snapshotter.daemon_pids(), daemons, "no daemon stopped");
    assert_eq!(
        mounts_below(&s.snapshotter.root()),
        mounts,
        "nothing detached"
    );
    wait_for_rounds(&log, 2);
    let (_, errors) = rounds(&log);
    assert!(errors.is_empty(), "reader errors: {errors:?}");
    let said = s.snapshotter.log();
    for (table, key) in &damaged {
        assert!(
            said.contains(key.as_str()),
            "{table} record {key} not named:\n{said}"
        );
    }
    // Another image runs next to it; the shared daemon whose record was
    // damaged serves it (recorded again), not a second daemon on its
    // socket and mount.
    let other = s.add_app("after-damage", 1 << 20, 31);
    let keys: Vec<&str> = damaged.iter().map(|(_, key)| key.as_str()).collect();
    s.wait_for_containerd_to_reach_snapshotter("lazy", &keys);
    s.pull_lazily("lazy", &other.lode);
    let out = s.run("lazy", &other.lode, "other", "cat /data/motd");
    assert!(out.contains(&other.motd), "{out}\n{}", s.logs());
    let now = s.snapshotter.daemon_pids();
    if shared {
        assert_eq!(now, daemons, "one shared daemon\n{}", s.snapshotter.log());
        assert!(
            s.snapshotter.log().contains("recorded again"),
            "{}",
            s.snapshotter.log()
        );
    } else {
        assert!(
            now.len() == 2 && daemons.iter().all(|d| now.contains(d)),
            "the image's own daemon next to the first: {now:?} {daemons:?}"
        );
    }
    wait_for_rounds(&log, 1);
    let (_, errors) = rounds(&log);
    assert!(errors.is_empty(), "reader errors: {errors:?}");
}

#[test]
fn damaged_records_leave_running_containers_alone_shared() {
    damaged_records_leave_running_containers_alone(SnapshotterOptions::default());
}

#[test]
fn damaged_records_leave_running_containers_alone_dedicated() {
    damaged_records_leave_running_containers_alone(SnapshotterOptions {
        daemon_mode: "dedicated",
        ..SnapshotterOptions::default()
    });
}
