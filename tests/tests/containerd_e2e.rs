//! End to end with real components: docker-registry, containerd 1.6 with
//! lode-snapshotter as its proxy snapshotter, runc containers, lode-fsd
//! daemons. Root only (containers, FUSE, overlayfs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_common::registry::Reference;
use lode_tests::containerd::{containerd_available, push_busybox_image, Containerd};
use lode_tests::lode::{Lodectl, LODECTL};
use lode_tests::mounts::mounts_below;
use lode_tests::snapshotter::{Snapshotter, SnapshotterOptions};
use lode_tests::{
    bin_path, pseudo_random_bytes, require_root, skip_unless, wait_until, Registry, TarEntry,
};
use sha2::{Digest as _, Sha256};

const BIG: u64 = 24 << 20;

/// Everything a test needs, torn down in reverse order of creation.
struct Stack {
    lodectl: Lodectl,
    containerd: Containerd,
    snapshotter: Snapshotter,
    registry: Registry,
    plain: Reference,
    lode: Reference,
    out: tempfile::TempDir,
}

fn stack(options: SnapshotterOptions) -> Option<Stack> {
    if !require_root()
        || !skip_unless(containerd_available(), "containerd, ctr or runc missing")
        || !skip_unless(Registry::available(), "docker-registry missing")
        || !skip_unless(
            Snapshotter::available(),
            "lode-snapshotter/lode-fsd not built",
        )
        || !skip_unless(Path::new("/bin/busybox").exists(), "busybox-static missing")
    {
        return None;
    }
    let lodectl = Lodectl::new(bin_path(LODECTL).expect("lodectl built"));
    let registry = Registry::start().unwrap();
    let plain = push_busybox_image(
        &registry,
        "app",
        vec![
            TarEntry::dir("data"),
            TarEntry::file("data/motd", "hello from lode\n"),
            TarEntry::random_file("data/big", BIG, 7),
            // Never read by the tests: what a lazy image does not fetch.
            TarEntry::dir("unused"),
            TarEntry::random_file("unused/a", 32 << 20, 8),
            TarEntry::random_file("unused/b", 32 << 20, 9),
        ],
    )
    .unwrap();
    let lode = registry.reference("app:v1-lode");
    lodectl.convert(&plain, &lode, None).unwrap();
    let snapshotter = Snapshotter::start(&options).unwrap();
    let containerd = Containerd::start(Some(&snapshotter.socket())).unwrap();
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    Some(Stack {
        lodectl,
        containerd,
        snapshotter,
        registry,
        plain,
        lode,
        out,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Stack {
    fn pull_lazily(&self, namespace: &str, image: &Reference) -> String {
        let run = self
            .lodectl
            .run([
                "pull",
                "--plain-http",
                "--address",
                &self.containerd.socket().display().to_string(),
                "--namespace",
                &self.containerd.namespace(namespace),
                &image.to_string(),
            ])
            .unwrap();
        assert!(
            run.success,
            "lodectl pull: {}\n{}",
            run.stderr,
            self.snapshotter.log()
        );
        run.stdout
    }

    fn run(&self, namespace: &str, id: &str, script: &str) -> String {
        self.containerd
            .ctr_ok(
                namespace,
                [
                    "run",
                    "--rm",
                    "--snapshotter",
                    SNAPSHOTTER,
                    &self.lode.to_string(),
                    id,
                    "/bin/sh",
                    "-c",
                    script,
                ],
            )
            .unwrap_or_else(|e| {
                let containerd = self.containerd.log();
                let tail: Vec<&str> = containerd.lines().rev().take(15).collect();
                panic!(
                    "{e}\nsnapshotter log:\n{}\ncontainerd log (last lines, newest first):\n{}",
                    self.snapshotter.log(),
                    tail.join("\n")
                )
            })
    }

    /// The Lode image's data blobs.
    fn data_blobs(&self) -> Vec<lode_common::Digest> {
        let client = lode_common::registry::RegistryClient::new(Default::default()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(lode_common::image::resolve(&client, &self.lode))
            .unwrap()
            .data_blobs
    }

    /// Data-blob bytes the registry served so far.
    fn data_bytes_served(&self) -> u64 {
        self.data_blobs()
            .iter()
            .flat_map(|d| self.registry.requests_for(&d.to_string()))
            .filter(|r| r.method == "GET" && (r.status == 200 || r.status == 206))
            .map(|r| r.bytes)
            .sum()
    }

    /// Starts a container that reads the image in a loop, verifying the big
    /// file each round, and appends "N OK" or "N ERR ..." to `<out>/<id>.log`.
    fn start_reader(&self, namespace: &str, id: &str) -> PathBuf {
        let expected = sha256_hex(&pseudo_random_bytes(7, 0, BIG as usize));
        let script = format!(
            "i=0; while true; do s=$(sha256sum /data/big | head -c 64); \
             if [ \"$s\" = {expected} ] && cat /data/motd >/dev/null; then echo \"$i OK\"; \
             else echo \"$i ERR $s\"; fi >> /out/{id}.log; i=$((i+1)); done"
        );
        let mount = format!(
            "type=bind,src={},dst=/out,options=rbind:rw",
            self.out.path().display()
        );
        self.containerd
            .ctr_ok(
                namespace,
                [
                    "run",
                    "-d",
                    "--snapshotter",
                    SNAPSHOTTER,
                    "--mount",
                    &mount,
                    &self.lode.to_string(),
                    id,
                    "/bin/sh",
                    "-c",
                    &script,
                ],
            )
            .unwrap();
        let log = self.out.path().join(format!("{id}.log"));
        wait_for_rounds(&log, 1);
        log
    }
}

/// `GET /metrics` over a plain TCP connection to the loopback endpoint.
fn scrape(url: &str) -> String {
    use std::io::{Read as _, Write as _};
    let address = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: lode\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn rounds(log: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors = text
        .lines()
        .filter(|l| !l.ends_with(" OK"))
        .map(str::to_owned)
        .collect();
    (text.lines().count(), errors)
}

/// Waits until the reader has completed `more` rounds beyond now.
fn wait_for_rounds(log: &Path, more: usize) {
    let start = rounds(log).0;
    wait_until(Duration::from_secs(60), "reader progress", || {
        rounds(log).0 >= start + more
    })
    .unwrap();
}

#[test]
fn lode_image_runs_lazily_fetching_a_fraction_of_its_data() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let before_pull = s.data_bytes_served();
    let started = Instant::now();
    let pulled = s.pull_lazily("lazy", &s.lode);
    let pull_time = started.elapsed();
    assert!(pulled.contains(" 0 unpacked"), "{pulled}");
    assert_eq!(
        s.data_bytes_served(),
        0,
        "a lazy pull downloads no data blob: {:?}",
        s.data_blobs()
            .iter()
            .map(|d| s.registry.requests_for(&d.to_string()))
            .collect::<Vec<_>>()
    );
    let started = Instant::now();
    let out = s.run(
        "lazy",
        "c1",
        "cat /data/motd; head -c 65536 /data/big | sha256sum",
    );
    let run_time = started.elapsed();
    let expected = sha256_hex(&pseudo_random_bytes(7, 0, 65536));
    assert!(out.contains("hello from lode"), "{out}");
    assert!(out.contains(&expected), "{out}");
    let served = s.data_bytes_served() - before_pull;
    let total: u64 = s
        .data_blobs()
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
    let image = s.plain.to_string();
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
    let pulled = s.pull_lazily("plain2", &s.plain);
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
        s.snapshotter.daemon_pids().is_empty(),
        "plain images need no daemon"
    );
}

#[test]
fn snapshotter_kill_keeps_containers_reading_and_state_intact() {
    let Some(mut s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    s.pull_lazily("lazy", &s.lode);
    let log = s.start_reader("lazy", "reader");
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
    // containerd redials a proxy that went away with a back-off; `usage`
    // reaches the snapshotter itself (`ls` would answer from containerd's DB).
    wait_until(
        Duration::from_secs(60),
        "containerd to reach the restarted snapshotter",
        || {
            s.containerd
                .ctr("lazy", ["snapshots", "--snapshotter", SNAPSHOTTER, "usage"])
                .is_ok_and(|r| r.success)
        },
    )
    .unwrap();
    wait_for_rounds(&log, 2);
    let out = s.run("lazy", "after", "cat /data/motd");
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
/// files in a loop; the container must see no error.
fn failover_cycles(options: SnapshotterOptions, kills: usize) {
    let Some(s) = stack(options) else {
        return;
    };
    s.pull_lazily("lazy", &s.lode);
    let log = s.start_reader("lazy", "reader");
    for kill in 1..=kills {
        let pids = s.snapshotter.daemon_pids();
        assert_eq!(
            pids.len(),
            1,
            "kill {kill}: one daemon serves the image: {pids:?}\n{}",
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
            || s.snapshotter.log().matches("takeover=true").count() >= kill,
        )
        .unwrap();
        wait_for_rounds(&log, 1);
        let mounted = mounts_below(&s.snapshotter.root().join("mnt"));
        assert!(
            !mounted.is_empty(),
            "kill {kill}: the instance mount disappeared"
        );
    }
    let (total, errors) = rounds(&log);
    assert!(
        errors.is_empty(),
        "reader errors: {errors:?}\n{}",
        s.snapshotter.log()
    );
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
        metrics.contains(&format!(
            "lode_image_read_bytes_total{{image=\"{}\"}}",
            s.lode
        )) && metrics.contains("state=\"RUNNING\"} 1"),
        "{metrics}"
    );
    eprintln!("failover: {kills} kills, {total} verified reads, 0 errors");
}

#[test]
fn daemon_kill_with_restart_serves_new_reads() {
    let Some(s) = stack(SnapshotterOptions {
        recover_policy: "restart",
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    s.pull_lazily("lazy", &s.lode);
    assert!(s
        .run("lazy", "first", "cat /data/motd")
        .contains("hello from lode"));
    let pids = s.snapshotter.daemon_pids();
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "a restarted daemon", || {
        s.snapshotter.log().contains("takeover=false") && {
            let now = s.snapshotter.daemon_pids();
            now.len() == 1 && now[0] != pids[0]
        }
    })
    .unwrap();
    let out = s.run(
        "lazy",
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
fn removing_containers_and_images_leaves_no_mounts_daemons_or_cache() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    s.pull_lazily("lazy", &s.lode);
    s.run("lazy", "c1", "head -c 100000 /data/big > /dev/null");
    assert_eq!(s.snapshotter.daemon_pids().len(), 1);
    let cache = s.snapshotter.root().join("cache");
    let cached = || std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert!(cached() > 0, "reading fills the cache");
    s.containerd
        .ctr_ok("lazy", ["image", "rm", "--sync", &s.lode.to_string()])
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the image's instance and daemon to go",
        || s.snapshotter.daemon_pids().is_empty() && mounts_below(&s.snapshotter.root()).is_empty(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            mounts_below(&s.snapshotter.root()),
            s.snapshotter.log()
        )
    });
    assert_eq!(cached(), 0, "cache files of the removed image remain");
    let left = s
        .containerd
        .ctr_ok("lazy", ["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
        .unwrap();
    assert_eq!(left.lines().count(), 1, "snapshots left: {left}");
}
