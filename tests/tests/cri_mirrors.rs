//! containerd's registry host configuration, shared by containerd and Lode:
//! a pull-through cache (`docker-registry` with `proxy.remoteurl`) in front
//! of the registry, named once in the registry's `hosts.toml`. Containers
//! run through containerd's CRI plugin. Root only.
//!
//! Such a cache answers a range request for a blob it has not cached yet
//! with the whole blob (200) while it fetches it, and with ranges once it
//! has: a first start behind a cold cache reads through it all the same.

use std::time::Duration;

use lode_common::registry::Reference;
use lode_common::Digest;
use lode_tests::cri::{host_network_pod, CriClient};
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::cri_node;
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

fn reads_go_through_the_mirror_and_on_to_the_registry_when_it_dies(mode: &'static str) {
    let Some(node) = cri_node(SnapshotterOptions {
        daemon_mode: mode,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let mirror = Registry::start_mirror_of(&node.registry).unwrap();
    node.use_mirrors(&[mirror.host()]);
    let app = node.add_app("mirrored", 24 << 20, 17);
    let manifest = node.lode_manifest(&app.lode);
    warm(&mirror, &app.lode, &manifest.data_blobs);
    let data = &manifest.data_blobs;
    let from = |registry: &Registry| {
        data.iter()
            .map(|d| lode_requests(registry, d))
            .sum::<usize>()
    };
    let warming = from(&node.registry);

    let logs = tempfile::tempdir_in("/var/tmp").unwrap();
    let cri = CriClient::connect(node.containerd.socket()).unwrap();
    let pod = host_network_pod("mirrored", logs.path());
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.logs()));
    let lode = app.lode.to_string();
    cri.pull(&lode, None, &pod)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
    assert!(
        lode_requests(&mirror, &manifest.bootstrap) > 0,
        "Lode fetched the bootstrap through the mirror"
    );

    let sleeper = cri
        .start_idle(&pod_id, "reader", &lode, &pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    let head = app.big_range_sha256(0, 65536);
    assert!(cri
        .sha256_of_range(&sleeper, "/data/big", 0, 65536)
        .unwrap()
        .contains(&head));
    assert!(from(&mirror) > 0, "the daemon read through the mirror");
    assert_eq!(
        from(&node.registry),
        warming,
        "and the mirror had the data: the registry served none"
    );

    // The mirror dies while the container runs: its reads go on from the
    // registry, without an error.
    mirror.stop();
    let tail = app.big_size - 65536;
    let expected = app.big_range_sha256(tail, 65536);
    assert!(cri
        .sha256_of_range(&sleeper, "/data/big", tail, 65536)
        .unwrap()
        .contains(&expected));
    let middle = app.big_size / 2;
    let expected = app.big_range_sha256(middle, 65536);
    assert!(cri
        .sha256_of_range(&sleeper, "/data/big", middle, 65536)
        .unwrap()
        .contains(&expected));
    assert!(
        from(&node.registry) > warming,
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

/// What `registry` answered Lode for `blobs`: (whole blobs, ranges).
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

fn a_first_start_reads_through_a_cold_mirror(mode: &'static str) {
    let Some(node) = cri_node(SnapshotterOptions {
        daemon_mode: mode,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let mirror = Registry::start_mirror_of(&node.registry).unwrap();
    node.use_mirrors(&[mirror.host()]);
    let app = node.add_app("cold-mirror", 24 << 20, 29);
    let data = node.lode_manifest(&app.lode).data_blobs;

    let logs = tempfile::tempdir_in("/var/tmp").unwrap();
    let cri = CriClient::connect(node.containerd.socket()).unwrap();
    let pod = host_network_pod("cold-mirror", logs.path());
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.logs()));
    let lode = app.lode.to_string();
    cri.pull(&lode, None, &pod)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
    let sleeper = cri
        .start_idle(&pod_id, "reader", &lode, &pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    // From the end first: the cold mirror's whole blob has all the rest
    // before the range.
    for offset in [app.big_size - 65536, 0, app.big_size / 2] {
        let expected = app.big_range_sha256(offset, 65536);
        let got = cri
            .sha256_of_range(&sleeper, "/data/big", offset, 65536)
            .unwrap_or_else(|e| panic!("read at {offset}: {e}\n{}", node.logs()));
        assert!(got.contains(&expected), "bytes at {offset}: {got}");
    }
    // The mirror logs a whole blob's answer once it has sent it all, which
    // is after Lode has taken its range and closed the connection.
    wait_until(
        Duration::from_secs(30),
        "the cold mirror to log a range request answered with a whole blob",
        || lode_answers(&mirror, &data).0 > 0,
    )
    .unwrap();
    // The registry served the mirror the blobs (with Lode's user agent,
    // whole) and Lode no range of its own.
    let (_, ranges) = lode_answers(&node.registry, &data);
    assert_eq!(ranges, 0, "Lode read past the mirror\n{}", node.logs());
}

#[test]
fn a_first_start_reads_through_a_cold_mirror_shared() {
    a_first_start_reads_through_a_cold_mirror("shared");
}

#[test]
fn a_first_start_reads_through_a_cold_mirror_dedicated() {
    a_first_start_reads_through_a_cold_mirror("dedicated");
}
