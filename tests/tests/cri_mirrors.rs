//! containerd's registry host configuration, shared by containerd and Lode:
//! a pull-through cache (`docker-registry` with `proxy.remoteurl`) in front
//! of the registry, named once in the registry's `hosts.toml`. Containers
//! run through containerd's CRI plugin. Root only.
//!
//! Such a cache answers a range request for a blob it has not cached yet
//! with the whole blob (200) while it fetches it, and with ranges once it
//! has: a first start behind a cold cache reads through it all the same.
//!
//! A mirror that wants a header (a token, say) gets it from `hosts.toml`
//! with every request, and the value stays out of the snapshotter's
//! records and logs.

use std::time::Duration;

use lode_common::image::LodeManifest;
use lode_common::registry::Reference;
use lode_common::Digest;
use lode_tests::cri::{host_network_pod, CriClient};
use lode_tests::link::{Link, LinkProfile};
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{cri_node, App, Node};
use lode_tests::{wait_until, Registry};

/// Range and blob requests Lode sent to `registry` for `digest` (a mirror
/// forwards what it lacks with the client's user agent, so the registry
/// behind it counts those too).
fn lode_requests(registry: &Registry, digest: &Digest) -> usize {
    registry
        .requests_for(&digest.to_string())
        .iter()
        .filter(|e| e.user_agent.starts_with("lode/"))
        .count()
}

/// What `registry` answered Lode's reads of `blobs` with: (whole blobs,
/// ranges).
fn lode_answers(registry: &Registry, blobs: &[Digest]) -> (usize, usize) {
    let answers: Vec<u16> = blobs
        .iter()
        .flat_map(|d| registry.requests_for(&d.to_string()))
        .filter(|e| e.user_agent.starts_with("lode/") && e.method == "GET")
        .map(|e| e.status)
        .collect();
    let count = |status| answers.iter().filter(|s| **s == status).count();
    (count(200), count(206))
}

/// Pulls `blobs` of `image` through `mirror`, as other nodes would have:
/// the mirror then has them.
fn warm(mirror: &Registry, image: &Reference, blobs: &[Digest]) {
    let client = mirror.client();
    let through = Reference {
        registry: mirror.host(),
        ..image.clone()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for digest in blobs {
        rt.block_on(client.pull_blob(&through, digest)).unwrap();
    }
}

/// A container of a new image (`/data/big`: 24 MiB), pulled and started
/// through CRI with a pull-through mirror in `hosts.toml`.
struct Mirrored {
    node: Node,
    mirror: Registry,
    app: App,
    manifest: LodeManifest,
    cri: CriClient,
    container: String,
    /// What stands between the node and the mirror when `hosts.toml` gives
    /// the mirror a header: it keeps the requests' heads.
    link: Option<Link>,
    /// Lode's requests for the data blobs the registry had logged before
    /// the pull (the mirror's warming, forwarded with Lode's user agent).
    registry_before_pull: usize,
    _logs: tempfile::TempDir,
}

impl Mirrored {
    /// `None` when the node cannot run (printed why). `warm_mirror`: the
    /// mirror has the image's data blobs before the pull. `header`: the
    /// mirror's `hosts.toml` entry gives it this header, and the node
    /// reaches it through a link.
    fn start(
        mode: &'static str,
        name: &str,
        warm_mirror: bool,
        header: Option<(&str, &str)>,
    ) -> Option<Self> {
        let node = cri_node(SnapshotterOptions {
            daemon_mode: mode,
            ..SnapshotterOptions::default()
        })?;
        let mirror = Registry::start_mirror_of(&node.registry).unwrap();
        let link = header.map(|_| Link::start(mirror.addr(), LinkProfile::LAN).unwrap());
        let host = link.as_ref().map_or_else(|| mirror.host(), Link::host);
        node.use_mirrors(&[host], header.as_slice());
        let app = node.add_app(name, 24 << 20, 17);
        let manifest = node.lode_manifest(&app.lode);
        if warm_mirror {
            warm(&mirror, &app.lode, &manifest.data_blobs);
        }
        let registry_before_pull = data_requests(&node.registry, &manifest);
        let logs = tempfile::tempdir_in("/var/tmp").unwrap();
        let cri = CriClient::connect(node.containerd.socket()).unwrap();
        let pod = host_network_pod(name, logs.path());
        let pod_id = cri
            .run_pod(&pod)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.logs()));
        let image = app.lode.to_string();
        cri.pull(&image, None, &pod)
            .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
        let container = cri
            .start_idle(&pod_id, "reader", &image, &pod)
            .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
        Some(Self {
            node,
            mirror,
            app,
            manifest,
            cri,
            container,
            link,
            registry_before_pull,
            _logs: logs,
        })
    }

    /// Reads 64 KiB of `/data/big` at `offset` in the container, checking
    /// the bytes.
    fn check_big_at(&self, offset: u64) {
        let expected = self.app.big_range_sha256(offset, 65536);
        let got = self
            .cri
            .sha256_of_range(&self.container, "/data/big", offset, 65536)
            .unwrap_or_else(|e| panic!("read at {offset}: {e}\n{}", self.node.logs()));
        assert!(got.contains(&expected), "bytes at {offset}: {got}");
    }
}

/// Lode's requests for `manifest`'s data blobs that `registry` logged.
fn data_requests(registry: &Registry, manifest: &LodeManifest) -> usize {
    manifest
        .data_blobs
        .iter()
        .map(|d| lode_requests(registry, d))
        .sum()
}

fn reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies(mode: &'static str) {
    let Some(m) = Mirrored::start(mode, "mirrored", true, None) else {
        return;
    };
    assert!(
        lode_requests(&m.mirror, &m.manifest.bootstrap) > 0,
        "Lode fetched the bootstrap through the mirror"
    );
    let warming = m.registry_before_pull;
    m.check_big_at(0);
    assert!(
        data_requests(&m.mirror, &m.manifest) > 0,
        "the daemon read through the mirror"
    );
    assert_eq!(
        data_requests(&m.node.registry, &m.manifest),
        warming,
        "and the mirror had the data: the registry served none"
    );

    // The mirror dies while the container runs: its reads go on from the
    // registry, without an error.
    m.mirror.stop();
    m.check_big_at(m.app.big_size - 65536);
    m.check_big_at(m.app.big_size / 2);
    assert!(
        data_requests(&m.node.registry, &m.manifest) > warming,
        "the registry served what the mirror could not"
    );
}

#[test]
fn reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies_shared() {
    reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies("shared");
}

#[test]
fn reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies_dedicated() {
    reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies("dedicated");
}

fn a_first_start_reads_through_a_cold_mirror(mode: &'static str) {
    let Some(m) = Mirrored::start(mode, "cold-mirror", false, None) else {
        return;
    };
    // From the end first: the cold mirror's whole blob has all the rest
    // before the range.
    for offset in [m.app.big_size - 65536, 0, m.app.big_size / 2] {
        m.check_big_at(offset);
    }
    let data = &m.manifest.data_blobs;
    // The mirror logs a whole blob's answer once it has sent it all, which
    // is after Lode has taken its range and closed the connection.
    wait_until(
        Duration::from_secs(30),
        "the cold mirror to log a range request answered with a whole blob",
        || lode_answers(&m.mirror, data).0 > 0,
    )
    .unwrap();
    // The registry served the mirror the blobs (with Lode's user agent,
    // whole) and Lode no range of its own.
    let (_, ranges) = lode_answers(&m.node.registry, data);
    assert_eq!(ranges, 0, "Lode read past the mirror\n{}", m.node.logs());
}

#[test]
fn a_first_start_reads_through_a_cold_mirror_shared() {
    a_first_start_reads_through_a_cold_mirror("shared");
}

#[test]
fn a_first_start_reads_through_a_cold_mirror_dedicated() {
    a_first_start_reads_through_a_cold_mirror("dedicated");
}

/// A header as a mirror that wants a token would have it in `hosts.toml`.
const MIRROR_HEADER: (&str, &str) = ("x-mirror-token", "mirror-token-5d1e0c7a");

/// The value of header `name` in a request head, if it has one.
fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The files under `dir` on its own file system (the mounts under it are
/// not the snapshotter's records).
fn files_on_one_fs(dir: &std::path::Path, dev: u64, found: &mut Vec<std::path::PathBuf>) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            files_on_one_fs(&entry.path(), dev, found);
        } else if meta.is_file() {
            found.push(entry.path());
        }
    }
}

fn a_mirror_gets_the_header_its_hosts_toml_gives_it(mode: &'static str) {
    let Some(m) = Mirrored::start(mode, "header-mirror", true, Some(MIRROR_HEADER)) else {
        return;
    };
    m.check_big_at(0);
    m.check_big_at(m.app.big_size / 2);
    let (name, value) = MIRROR_HEADER;
    let heads = m.link.as_ref().unwrap().request_heads();
    let of = |agent: &str| -> Vec<&String> {
        heads
            .iter()
            .filter(|h| header_value(h, "user-agent").is_some_and(|a| a.starts_with(agent)))
            .collect()
    };
    let lode = of("lode/");
    let bootstrap = m.manifest.bootstrap.to_string();
    let data: Vec<String> = m
        .manifest
        .data_blobs
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert!(
        lode.iter()
            .any(|h| h.lines().next().unwrap().contains(&bootstrap)),
        "the snapshotter fetched the bootstrap through the mirror: {lode:#?}"
    );
    assert!(
        lode.iter().any(|h| header_value(h, "range").is_some()
            && data
                .iter()
                .any(|d| h.lines().next().unwrap().contains(d.as_str()))),
        "the daemon read data through the mirror: {lode:#?}"
    );
    for head in &lode {
        assert_eq!(
            header_value(head, name),
            Some(value),
            "Lode's request {head}"
        );
    }
    // The file is containerd's too: it sent the header as well.
    assert!(
        of("containerd/")
            .iter()
            .any(|h| header_value(h, name) == Some(value)),
        "containerd sent the header too: {heads:#?}"
    );

    // Neither recorded nor logged.
    let root = m.node.snapshotter.root();
    let dev = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&root).unwrap().dev()
    };
    let mut files = Vec::new();
    files_on_one_fs(&root, dev, &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("metadata.redb")),
        "the snapshotter's records are among {files:?}"
    );
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        assert!(
            !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
            "{} holds the mirror's header",
            file.display()
        );
    }
    assert!(
        !m.node.logs().contains(value),
        "a log holds the mirror's header"
    );
}

#[test]
fn a_mirror_gets_the_header_its_hosts_toml_gives_it_shared() {
    a_mirror_gets_the_header_its_hosts_toml_gives_it("shared");
}

#[test]
fn a_mirror_gets_the_header_its_hosts_toml_gives_it_dedicated() {
    a_mirror_gets_the_header_its_hosts_toml_gives_it("dedicated");
}
