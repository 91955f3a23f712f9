//! The Kubernetes path: containerd's CRI plugin with Lode as its snapshotter
//! (annotations on), driven through the CRI gRPC API in kubelet's order.
//! Pods use the node's network (no CNI). Root only (containers, FUSE).

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::AuthConfig;
use lode_tests::cri::{container, host_network_pod, CriClient};
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{cri_node, image_metric, private_cri_node, scrape, App, Node};
use lode_tests::wait_until;

const TIMEOUT: Duration = Duration::from_secs(60);

/// What a container wrote to its CRI log (`<time> <stream> <tag> <line>`).
fn logged(log_dir: &Path, name: &str) -> String {
    let path = log_dir.join(format!("{name}.log"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a one-shot container of `image` in the pod and returns its log,
/// after checking that it exited with 0.
fn run_to_exit(
    cri: &CriClient,
    node: &Node,
    pod: (&str, &k8s_cri::v1::PodSandboxConfig, &Path),
    name: &str,
    image: &str,
    script: &str,
) -> (String, String) {
    let (pod_id, pod, log_dir) = pod;
    let id = cri
        .start_container(pod_id, container(name, image, &["sh", "-c", script]), pod)
        .unwrap_or_else(|e| panic!("start {name}: {e}\n{}", node.logs()));
    let status = cri.wait_exited(&id, TIMEOUT).unwrap();
    let log = logged(log_dir, name);
    assert_eq!(
        status.exit_code,
        0,
        "{name} exited with {}: {log}\n{}",
        status.exit_code,
        node.logs()
    );
    (id, log)
}

fn pod_runs_lode_and_plain_images_as_kubelet_drives_cri(options: SnapshotterOptions) {
    let Some(node) = cri_node(options) else {
        return;
    };
    let app: App = node.add_app("app", 24 << 20, 5);
    let lode = app.lode.to_string();
    let plain = app.plain.to_string();
    let logs = tempfile::tempdir_in("/var/tmp").unwrap();
    let cri = CriClient::connect(node.containerd.socket()).unwrap();

    // kubelet: the pod's sandbox first (its pause image pulled by
    // containerd), then PullImage with the pod's config, then the containers.
    let pod = host_network_pod("lazy", logs.path());
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.logs()));
    let requests_before = node.registry.requests().len();
    let image_ref = cri
        .pull(&lode, None, &pod)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
    // containerd stored the manifest before preparing the layers: Lode
    // read it from there and fetched only the bootstrap.
    let from_lode: Vec<String> = node.registry.requests()[requests_before..]
        .iter()
        .filter(|r| r.user_agent.starts_with("lode/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        from_lode.len() == 1 && from_lode[0].contains("/blobs/"),
        "Lode's requests during PullImage: {from_lode:#?}"
    );
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(cri.has_image(&lode).unwrap());
    assert_eq!(
        node.data_bytes_served(&app.lode),
        0,
        "PullImage of a Lode image fetches no data blob"
    );

    let in_pod = (pod_id.as_str(), &pod, logs.path());
    let (reader, log) = run_to_exit(
        &cri,
        &node,
        in_pod,
        "reader",
        &lode,
        "cat /data/motd; head -c 65536 /data/big | sha256sum",
    );
    assert!(log.contains(&app.motd), "{log}");
    let expected = app.big_range_sha256(0, 65536);
    assert!(log.contains(&expected), "{log}");
    let served = node.data_bytes_served(&app.lode);
    assert!(
        served > 0 && served < app.big_size / 3,
        "the container read 64 KiB of a {} byte file; the registry served {served} bytes of data",
        app.big_size
    );

    // ExecSync into a running container of the image.
    let sleeper = cri.start_idle(&pod_id, "sleeper", &lode, &pod).unwrap();
    let exec = cri
        .exec_sync(
            &sleeper,
            &["sh", "-c", "cat /data/motd; head -c 4096 /data/big | wc -c"],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&exec.stdout);
    assert_eq!(
        exec.exit_code,
        0,
        "{stdout} {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(stdout, format!("{}\n4096\n", app.motd));

    // A plain OCI image in the same pod: Lode unpacks it as overlayfs would,
    // so its pull downloads its layers whole.
    let before = node.registry.bytes_served_for("/v2/app/blobs/");
    cri.pull(&plain, None, &pod).unwrap();
    let pulled = node.registry.bytes_served_for("/v2/app/blobs/") - before;
    assert!(
        pulled >= app.big_size,
        "a plain image is downloaded whole: {pulled} bytes for a {} byte file",
        app.big_size
    );
    let (plain_reader, log) = run_to_exit(&cri, &node, in_pod, "plain", &plain, "cat /data/motd");
    assert_eq!(log, app.motd);

    let (listed, listed_reader) =
        listed_image_takes_its_list_from_pull_image(&cri, &node, &app, in_pod);

    // kubelet tears the pod down, then its image garbage collection
    // removes the images; Lode lets go of the Lode image's instance.
    for id in [&sleeper, &reader, &plain_reader, &listed_reader] {
        cri.remove_container(id).unwrap();
    }
    cri.remove_pod(&pod_id).unwrap();
    for image in [&lode, &plain, &listed] {
        cri.remove_image(image).unwrap();
        assert!(!cri.has_image(image).unwrap(), "{image} still there");
    }
    wait_until(TIMEOUT, "Lode to unmount the removed image", || {
        node.instance_mounts().is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", node.instance_mounts(), node.logs()));
}

/// An image converted with a prefetch list, pulled as kubelet pulls it:
/// the fronts of its data blobs (the listed chunks) are fetched while
/// PullImage goes on, and the mounted image takes its list from them, so
/// the registry sends those bytes once. Returns the image and its
/// container.
fn listed_image_takes_its_list_from_pull_image(
    cri: &CriClient,
    node: &Node,
    app: &App,
    pod: (&str, &k8s_cri::v1::PodSandboxConfig, &Path),
) -> (String, String) {
    // Out of the files' order, so that the image's data layer is not the
    // one pulled before (its layers would all be there, nothing to fetch
    // ahead of the mount).
    let list = "/data/big\t1048576-2097152\n/data/motd\n";
    let listed = node.registry.reference("app:listed");
    let fronts = node.convert_listed(&app.plain, &listed, list);
    let before = node.data_bytes_served(&listed);
    let image = listed.to_string();
    cri.pull(&image, None, pod.1)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
    let url = node.snapshotter.metrics_url().expect("metrics endpoint");
    let counter = |name| image_metric(&scrape(&url), name, &image);
    wait_until(TIMEOUT, "the list taken from the fronts", || {
        counter("lode_image_ahead_bytes_total") == Some(fronts)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} of {fronts}\n{}",
            counter("lode_image_ahead_bytes_total"),
            node.logs()
        )
    });
    let (id, log) = run_to_exit(
        cri,
        node,
        pod,
        "listed",
        &image,
        "cat /data/motd; dd if=/data/big bs=1048576 skip=1 count=1 2>/dev/null | sha256sum",
    );
    assert!(log.contains(&app.motd), "{log}");
    assert!(
        log.contains(&app.big_range_sha256(1 << 20, 1 << 20)),
        "{log}"
    );
    assert_eq!(
        Some(node.data_bytes_served(&listed) - before),
        counter("lode_image_fetched_bytes_total"),
        "the registry sent each byte the image fetched once"
    );
    (image, id)
}

#[test]
fn pod_runs_lode_and_plain_images_as_kubelet_drives_cri_shared() {
    pod_runs_lode_and_plain_images_as_kubelet_drives_cri(SnapshotterOptions::default());
}

#[test]
fn pod_runs_lode_and_plain_images_as_kubelet_drives_cri_dedicated() {
    pod_runs_lode_and_plain_images_as_kubelet_drives_cri(SnapshotterOptions {
        daemon_mode: "dedicated",
        ..SnapshotterOptions::default()
    });
}

const USER: &str = "kube";
const PASSWORD: &str = "pull-secret-7f3a9c";

fn auth(password: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        username: USER.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    })
}

/// A private Lode image through Lode's CRI image service proxy: the
/// snapshotter and its daemons have no credentials but those of the pull.
fn private_image_reads_with_the_credentials_of_its_pull(mode: &'static str) {
    let options = SnapshotterOptions {
        daemon_mode: mode,
        cri_proxy: true,
        ..SnapshotterOptions::default()
    };
    let Some(mut node) = private_cri_node(options, USER, PASSWORD) else {
        return;
    };
    let app = node.add_app("private", 24 << 20, 11);
    let lode = app.lode.to_string();
    let logs = tempfile::tempdir_in("/var/tmp").unwrap();
    let images = node.snapshotter.cri_socket();
    let cri = CriClient::connect_split(node.containerd.socket(), &images).unwrap();
    let pod = host_network_pod("private", logs.path());
    // The pause image is in the same private registry: pulled first, as a
    // node pre-pulls it.
    let pause = node.registry.reference("pause:v1").to_string();
    cri.pull(&pause, auth(PASSWORD), &pod)
        .unwrap_or_else(|e| panic!("pull the pause image: {e}\n{}", node.logs()));
    let pod_id = cri.run_pod(&pod).unwrap();

    let refused = cri.pull(&lode, auth("wrong"), &pod).unwrap_err();
    assert!(
        refused.message().to_lowercase().contains("unauthorized"),
        "the registry's answer: {refused:?}"
    );
    assert!(!cri.has_image(&lode).unwrap());
    cri.pull(&lode, auth(PASSWORD), &pod)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", node.logs()));
    assert_eq!(node.data_bytes_served(&app.lode), 0, "the pull stays lazy");

    let sleeper = cri
        .start_idle(&pod_id, "reader", &lode, &pod)
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    let head = app.big_range_sha256(0, 65536);
    assert!(cri
        .sha256_of_range(&sleeper, "/data/big", 0, 65536)
        .unwrap()
        .contains(&head));
    let served = node.data_bytes_served(&app.lode);
    assert!(served > 0, "the daemon fetched with the pull's credentials");

    // Never on disk: not in the store, records, bootstraps, configs, logs.
    for file in node.snapshotter.files() {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "the password is in {}",
            file.display()
        );
    }

    // The snapshotter restarts and forgets; the daemons keep theirs, so the
    // running container reads on from the registry without an error.
    node.snapshotter.restart().unwrap();
    let tail = app.big_size - 65536;
    let expected = app.big_range_sha256(tail, 65536);
    assert!(cri
        .sha256_of_range(&sleeper, "/data/big", tail, 65536)
        .unwrap()
        .contains(&expected));
    assert!(
        node.data_bytes_served(&app.lode) > served,
        "the tail was fetched after the restart"
    );
    // The next pull hands the credentials on again (retried as kubelet
    // does while containerd reconnects to the restarted snapshotter).
    let cri = CriClient::connect_split(node.containerd.socket(), &images).unwrap();
    wait_until(TIMEOUT, "a pull after the restart", || {
        cri.pull(&lode, auth(PASSWORD), &pod).is_ok()
    })
    .unwrap();
    assert!(
        node.snapshotter
            .log()
            .contains("credentials handed to the daemon"),
        "{}",
        node.snapshotter.log()
    );
}

#[test]
fn private_image_reads_with_the_credentials_of_its_pull_shared() {
    private_image_reads_with_the_credentials_of_its_pull("shared");
}

#[test]
fn private_image_reads_with_the_credentials_of_its_pull_dedicated() {
    private_image_reads_with_the_credentials_of_its_pull("dedicated");
}
