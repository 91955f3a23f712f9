//! Cold container starts through containerd, side by side: containerd's own
//! pull onto overlayfs against `lodectl pull` onto Lode, with the registry
//! on loopback and behind emulated links ([`LinkProfile`]). Every
//! measurement starts cold: no image, content, snapshot or Lode cache, no
//! image served (the shared daemon runs with the snapshotter, idle), and
//! the page cache dropped. Prints pull, run, their sum, its
//! ratio to overlayfs, and the registry's requests and body bytes.
//!
//! By default (CI) a small busybox image is measured once on loopback and
//! on `region`. `tests/bench/start-bench.sh` builds real images and points
//! `LODE_START_BENCH` at a JSON description of them ([`Plan`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_common::registry::Reference;
use lode_tests::containerd::push_busybox_image;
use lode_tests::link::{Link, LinkProfile};
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{node, Node};
use lode_tests::{skopeo_copy, TarEntry};

const NAMESPACE: &str = "bench";

/// What to measure (the JSON `LODE_START_BENCH` names).
#[derive(serde::Deserialize)]
struct Plan {
    images: Vec<PlanImage>,
    /// `loopback` or a [`LinkProfile`] name.
    profiles: Vec<String>,
    rounds: usize,
}

#[derive(serde::Deserialize)]
struct PlanImage {
    name: String,
    /// An OCI layout directory and the tag of the image in it.
    layout: PathBuf,
    tag: String,
    workloads: Vec<Workload>,
}

#[derive(Clone, serde::Deserialize)]
struct Workload {
    name: String,
    /// The container's command.
    args: Vec<String>,
    /// Text its output must contain.
    expect: String,
    /// The Lode image converted with the prefetch list recorded from a run
    /// of this workload.
    #[serde(skip)]
    prefetched: Option<Reference>,
}

/// An image pushed as it is and converted to Lode.
struct Image {
    name: String,
    plain: Reference,
    lode: Reference,
    workloads: Vec<Workload>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// `ctr image pull` onto containerd's overlayfs snapshotter.
    Overlay,
    /// `lodectl pull` and `ctr run --snapshotter lode`.
    Lode,
    /// The same with the image converted with a prefetch list recorded
    /// from a run of the workload (`lodectl daemon record`).
    LodePrefetch,
}

const WAYS: [Way; 3] = [Way::Overlay, Way::Lode, Way::LodePrefetch];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Overlay => "overlayfs",
            Way::Lode => "Lode",
            Way::LodePrefetch => "Lode, prefetch list",
        }
    }

    fn lazy(self) -> bool {
        self != Way::Overlay
    }

    /// The image this way pulls.
    fn image<'a>(self, image: &'a Image, workload: &'a Workload) -> &'a Reference {
        match self {
            Way::Overlay => &image.plain,
            Way::Lode => &image.lode,
            Way::LodePrefetch => workload.prefetched.as_ref().expect("a recorded list"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    pull: Duration,
    run: Duration,
    requests: u64,
    bytes: u64,
    /// Lode only: the stored bytes of the chunks the run read, plus the
    /// bootstrap: what the start needed from the registry at the least.
    floor: Option<u64>,
    /// Lode only: a second run of the workload right after, everything in
    /// Lode's cache (the page cache dropped).
    warm_run: Option<Duration>,
}

impl Sample {
    fn total(&self) -> Duration {
        self.pull + self.run
    }
}

#[test]
fn cold_starts_side_by_side() {
    let options = SnapshotterOptions {
        fsd_config: std::env::var_os("LODE_START_BENCH_FSD_CONFIG").map(PathBuf::from),
        ..SnapshotterOptions::default()
    };
    let Some(node) = node(options) else {
        return;
    };
    let (images, profiles, rounds) = match std::env::var_os("LODE_START_BENCH") {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", PathBuf::from(&path).display()));
            let plan: Plan = serde_json::from_str(&text).expect("a start-bench plan");
            let images: Vec<Image> = plan.images.iter().map(|i| push_layout(&node, i)).collect();
            (images, plan.profiles, plan.rounds)
        }
        None => (
            vec![quick_image(&node)],
            vec!["loopback".to_owned(), "region".to_owned()],
            1,
        ),
    };
    let mut images = images;
    for image in &mut images {
        let recorded: Vec<Reference> = image
            .workloads
            .iter()
            .map(|w| record_prefetch_list(&node, image, w))
            .collect();
        for (workload, list) in image.workloads.iter_mut().zip(recorded) {
            workload.prefetched = Some(list);
        }
    }
    let registry_addr = node.registry.addr();
    let mut report = Vec::new();
    for profile in &profiles {
        let link = match profile.as_str() {
            "loopback" => None,
            name => {
                let profile = LinkProfile::named(name).unwrap_or_else(|| {
                    panic!("no link profile {name}: loopback, lan, region or far")
                });
                Some(Link::start(registry_addr, profile).unwrap())
            }
        };
        let host = link
            .as_ref()
            .map_or_else(|| node.registry.host(), |l| l.host());
        for image in &images {
            for workload in &image.workloads {
                let mut samples: Vec<(Way, Vec<Sample>)> =
                    WAYS.iter().map(|w| (*w, Vec::new())).collect();
                for round in 0..rounds {
                    // Alternate which way goes first.
                    for i in 0..WAYS.len() {
                        let (way, list) = &mut samples[(i + round) % WAYS.len()];
                        list.push(cold_start(&node, image, workload, *way, &host));
                    }
                }
                let medians: Vec<(Way, Sample)> = samples
                    .iter()
                    .map(|(way, list)| (*way, median(list)))
                    .collect();
                report.push((
                    profile.clone(),
                    image.name.clone(),
                    workload.clone(),
                    medians,
                ));
            }
        }
    }
    print_report(&report, rounds);

    for (profile, image, workload, medians) in &report {
        let bytes = |way| medians.iter().find(|(w, _)| *w == way).unwrap().1.bytes;
        for way in [Way::Lode, Way::LodePrefetch] {
            assert!(
                bytes(way) * 2 < bytes(Way::Overlay),
                "{profile}, {image} {}: {} fetched {} bytes, overlayfs {}: a lazy start \
                 should fetch well under half",
                workload.name,
                way.name(),
                bytes(way),
                bytes(Way::Overlay)
            );
        }
    }
}

/// Runs `workload` once on Lode from cold, writes what it read with
/// `lodectl daemon record`, and converts the image again with that list;
/// returns the new image.
fn record_prefetch_list(node: &Node, image: &Image, workload: &Workload) -> Reference {
    make_cold(node);
    node.pull_lazily(NAMESPACE, &image.lode);
    run_workload(node, &image.lode, workload, Way::Lode);
    let instance = node
        .instance_of(&image.lode)
        .unwrap_or_else(|| panic!("no instance serves {}", image.lode));
    let socket = node.shared_socket().display().to_string();
    let run = node
        .lodectl
        .run(["daemon", "record", &socket, "--id", &instance.id])
        .unwrap();
    assert!(run.success, "lodectl daemon record: {}", run.stderr);
    // Every line names the bytes read of a file, and the quick image's
    // workload, which reads 1 MiB of data/big (8 MiB), lists only a part.
    for line in run.stdout.lines().filter(|l| !l.starts_with('#')) {
        let (path, range) = line
            .rsplit_once('\t')
            .unwrap_or_else(|| panic!("{line:?} names no byte range:\n{}", run.stdout));
        let end: u64 = range
            .split_once('-')
            .and_then(|(_, end)| end.parse().ok())
            .unwrap_or_else(|| panic!("{line:?}: no START-END"));
        if image.name == "quick" && path == "data/big" {
            assert!(end < 8 << 20, "{line:?}: more than the start read");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("prefetch.list");
    std::fs::write(&list, &run.stdout).unwrap();
    let target = image.lode.with_tag(format!("lode-{}", workload.name));
    node.lodectl
        .convert(&image.plain, &target, None, Some(&list))
        .unwrap_or_else(|e| panic!("lodectl convert --prefetch-paths: {e}"));
    target
}

/// `ctr run --rm` of `workload`, checking its output; returns how long it took.
fn run_workload(node: &Node, reference: &Reference, workload: &Workload, way: Way) -> Duration {
    let name = reference.to_string();
    let mut args = vec!["run", "--rm"];
    if way.lazy() {
        args.extend(["--snapshotter", SNAPSHOTTER]);
    }
    args.extend([name.as_str(), "start"]);
    args.extend(workload.args.iter().map(String::as_str));
    let start = Instant::now();
    let out = node
        .containerd
        .ctr_ok(NAMESPACE, args)
        .unwrap_or_else(|e| panic!("{} {}: {e}\n{}", way.name(), workload.name, node.logs()));
    let run = start.elapsed();
    assert!(
        out.contains(&workload.expect),
        "{} {}: the output lacks {:?}:\n{out}",
        way.name(),
        workload.name,
        workload.expect
    );
    run
}

/// Busybox plus 64 MiB, of which the workload reads one 1 MiB prefix.
fn quick_image(node: &Node) -> Image {
    let entries = vec![
        TarEntry::dir("data"),
        TarEntry::file("data/motd", "hello from a cold start\n"),
        TarEntry::random_file("data/big", 8 << 20, 1),
        TarEntry::random_file("data/unused", 56 << 20, 2),
    ];
    let plain = push_busybox_image(&node.registry, "quick", entries).unwrap();
    convert(
        node,
        "quick",
        plain,
        vec![Workload {
            name: "read".into(),
            args: [
                "/bin/sh",
                "-c",
                "cat /data/motd; head -c 1048576 /data/big | wc -c",
            ]
            .map(String::from)
            .to_vec(),
            expect: "hello from a cold start\n1048576".into(),
            prefetched: None,
        }],
    )
}

fn push_layout(node: &Node, image: &PlanImage) -> Image {
    let plain = node.registry.reference(&format!("{}:plain", image.name));
    skopeo_copy(&image.layout, &image.tag, &plain).unwrap();
    convert(node, &image.name, plain, image.workloads.clone())
}

fn convert(node: &Node, name: &str, plain: Reference, workloads: Vec<Workload>) -> Image {
    let lode = plain.with_tag("lode");
    node.lodectl.convert(&plain, &lode, None, None).unwrap();
    Image {
        name: name.to_owned(),
        plain,
        lode,
        workloads,
    }
}

/// `reference` with its registry replaced by `host`.
fn via(reference: &Reference, host: &str) -> Reference {
    Reference {
        registry: host.to_owned(),
        ..reference.clone()
    }
}

/// Pulls and runs `workload` from nothing; returns the times and what the
/// registry served.
fn cold_start(node: &Node, image: &Image, workload: &Workload, way: Way, host: &str) -> Sample {
    make_cold(node);
    let before = node.registry.requests();
    let reference = via(way.image(image, workload), host);
    let start = Instant::now();
    if way.lazy() {
        node.pull_lazily(NAMESPACE, &reference);
    } else {
        let name = reference.to_string();
        node.containerd
            .ctr_ok(NAMESPACE, ["image", "pull", "--plain-http", &name])
            .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    }
    let pull = start.elapsed();
    let run = run_workload(node, &reference, workload, way);
    let served = &node.registry.requests()[before.len()..];
    if std::env::var_os("LODE_START_BENCH_REQUESTS").is_some() {
        let sizes: Vec<String> = served
            .iter()
            .map(|r| format!("{} {}", r.bytes, r.path.rsplit('/').next().unwrap_or("")))
            .collect();
        eprintln!("{} {host} {}: {sizes:#?}", way.name(), workload.name);
    }
    let floor = way.lazy().then(|| {
        let bootstrap = node
            .lode_manifest(way.image(image, workload))
            .bootstrap
            .to_string();
        let bootstrap_bytes: u64 = served
            .iter()
            .filter(|r| r.path.contains(&bootstrap))
            .map(|r| r.bytes)
            .sum();
        node.access_of(&reference).chunk_bytes + bootstrap_bytes
    });
    let warm_run = way.lazy().then(|| {
        drop_page_cache();
        run_workload(node, &reference, workload, way)
    });
    Sample {
        pull,
        run,
        requests: served.len() as u64,
        bytes: served.iter().map(|r| r.bytes).sum(),
        floor,
        warm_run,
    }
}

/// Removes every image and its content, waits until Lode has no mount or
/// cache left, and drops the page cache.
fn make_cold(node: &Node) {
    let c = &node.containerd;
    let listed = |what: &str| -> Vec<String> {
        c.ctr_ok(NAMESPACE, [what, "ls", "-q"])
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    for image in listed("images") {
        c.ctr_ok(NAMESPACE, ["images", "rm", "--sync", &image])
            .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    }
    for digest in listed("content") {
        c.ctr_ok(NAMESPACE, ["content", "rm", &digest]).unwrap();
    }
    node.wait_for_no_instances_or_cache();
    drop_page_cache();
}

fn drop_page_cache() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// The sample with the median total, and its figures.
fn median(samples: &[Sample]) -> Sample {
    let mut sorted = samples.to_vec();
    sorted.sort_by_key(Sample::total);
    sorted[sorted.len() / 2]
}

type Row = (String, String, Workload, Vec<(Way, Sample)>);

fn print_report(report: &[Row], rounds: usize) {
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    let mut out = format!(
        "\ncold starts, median of {rounds} round(s)\n\
         | link | image | workload | snapshotter | pull | run | pull + run | x overlayfs | registry bytes | requests | floor | x floor | warm run | run / warm |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (profile, image, workload, medians) in report {
        let overlay = medians[0].1.total().as_secs_f64();
        for (way, s) in medians {
            let (floor, over_floor) = match s.floor {
                Some(f) => (
                    format!("{:.1} MB", f as f64 / 1e6),
                    format!("{:.1}", s.bytes as f64 / f as f64),
                ),
                None => ("".into(), "".into()),
            };
            let (warm, over_warm) = match s.warm_run {
                Some(w) => (
                    ms(w),
                    format!("{:.2}", s.run.as_secs_f64() / w.as_secs_f64()),
                ),
                None => ("".into(), "".into()),
            };
            out.push_str(&format!(
                "| {profile} | {image} | {} | {} | {} | {} | {} | {:.2} | {:.1} MB | {} | {floor} | {over_floor} | {warm} | {over_warm} |\n",
                workload.name,
                way.name(),
                ms(s.pull),
                ms(s.run),
                ms(s.total()),
                s.total().as_secs_f64() / overlay,
                s.bytes as f64 / 1e6,
                s.requests
            ));
        }
    }
    eprintln!("{out}");
}
