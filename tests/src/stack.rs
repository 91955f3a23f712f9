//! The whole path of a lazy container start, for end-to-end tests: a
//! registry with Lode images built here, lode-snapshotter, containerd with
//! Lode as its proxy snapshotter, and containers that verify an image's
//! files in a loop. Torn down in reverse order of creation.

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lode_common::api::{ClientError, DaemonClient, DaemonInfo, InstanceAccess, InstanceInfo};
use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_common::format::Bootstrap;
use lode_common::image::LodeManifest;
use lode_common::registry::Reference;
use lode_common::Digest;
use sha2::{Digest as _, Sha256};

use crate::containerd::{
    containerd_available, push_busybox_image, push_pause_image, write_hosts_toml, Containerd,
    CriOptions,
};
use crate::lode::Run;
use crate::lode::{
    bounded, cache_durable, fetch_bootstrap, file_chunks, ChunkLocation, Lodectl, LODECTL,
};
use crate::mounts::mounts_below;
use crate::snapshotter::{Snapshotter, SnapshotterOptions};
use crate::{bin_path, pseudo_random_bytes, require_root, skip_unless, wait_until};
use crate::{Registry, TarEntry};

/// Size of the verified file of the stack's first image.
pub const BIG: u64 = 24 << 20;

/// A Lode image of busybox plus `/data/motd` and `/data/big` (random bytes
/// from a seed), with the plain image it was converted from.
#[derive(Clone, Debug)]
pub struct App {
    pub plain: Reference,
    pub lode: Reference,
    pub motd: String,
    pub big_seed: u64,
    pub big_size: u64,
}

impl App {
    pub fn big_sha256(&self) -> String {
        self.big_range_sha256(0, self.big_size)
    }

    /// The sha256 (hex) of `len` bytes of `/data/big` from `offset`.
    pub fn big_range_sha256(&self, offset: u64, len: u64) -> String {
        sha256_hex(&pseudo_random_bytes(self.big_seed, offset, len as usize))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A node: a registry, lode-snapshotter and containerd with Lode as its
/// proxy snapshotter. Torn down in reverse order of creation.
pub struct Node {
    pub lodectl: Lodectl,
    pub containerd: Containerd,
    pub snapshotter: Snapshotter,
    pub registry: Registry,
    /// The docker config `lodectl` reads the registry's credentials from,
    /// if it wants any.
    _docker_config: Option<tempfile::TempDir>,
    /// containerd's registry hosts directory, which Lode reads too (CRI
    /// nodes only).
    hosts_dir: Option<tempfile::TempDir>,
    /// Where containers of [`Node::run`] write their output (see there).
    run_output: tempfile::TempDir,
}

/// Starts a node, or prints why the test is skipped and returns `None`.
pub fn node(options: SnapshotterOptions) -> Option<Node> {
    start_node(options, false, None)
}

/// Starts a node whose containerd runs its CRI plugin with Lode as the
/// snapshotter, as kubelet's runtime (the registry holds the pods' pause
/// image, `pause:v1`), or prints why the test is skipped and returns `None`.
pub fn cri_node(options: SnapshotterOptions) -> Option<Node> {
    start_node(options, true, None)
}

/// [`cri_node`] whose registry wants `user` and `password` for everything;
/// `lodectl` has them (in a docker config of its own), the snapshotter and
/// its daemons only what CRI pulls give them.
pub fn private_cri_node(options: SnapshotterOptions, user: &str, password: &str) -> Option<Node> {
    start_node(options, true, Some((user, password)))
}

fn start_node(
    mut options: SnapshotterOptions,
    cri: bool,
    auth: Option<(&str, &str)>,
) -> Option<Node> {
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
    let mut lodectl = Lodectl::new(bin_path(LODECTL).expect("lodectl built"));
    let registry = match auth {
        Some((user, password)) => Registry::start_with_auth(user, password).unwrap(),
        None => Registry::start().unwrap(),
    };
    let docker_config = auth.map(|_| {
        let dir = tempfile::tempdir().unwrap();
        registry
            .write_docker_config(&dir.path().join("config.json"))
            .unwrap();
        lodectl
            .env
            .push(("DOCKER_CONFIG".into(), dir.path().as_os_str().to_owned()));
        dir
    });
    let hosts_dir = cri.then(|| {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        write_hosts_toml(dir.path(), &registry.host(), &[], &[]).unwrap();
        options.registry_config_path = Some(dir.path().to_owned());
        dir
    });
    let snapshotter = Snapshotter::start(&options).unwrap();
    let cri = hosts_dir.as_ref().map(|dir| CriOptions {
        sandbox_image: push_pause_image(&registry).unwrap().to_string(),
        hosts_dir: dir.path().to_owned(),
    });
    let containerd = Containerd::start_with(Some(&snapshotter.socket()), cri.as_ref()).unwrap();
    snapshotter.link_containerd(containerd.socket()).unwrap();
    Some(Node {
        lodectl,
        containerd,
        snapshotter,
        registry,
        _docker_config: docker_config,
        hosts_dir,
        run_output: tempfile::tempdir_in("/var/tmp").unwrap(),
    })
}

/// A node with a first image built, and a directory for container output.
pub struct Stack {
    pub node: Node,
    /// The first image: `/data/big` of [`BIG`] bytes, and 64 MiB under
    /// `/unused` that no test reads.
    pub app: App,
    /// Bound into reader containers at `/out`.
    pub out: tempfile::TempDir,
}

impl std::ops::Deref for Stack {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

/// Starts a stack, or prints why the test is skipped and returns `None`.
pub fn stack(options: SnapshotterOptions) -> Option<Stack> {
    let node = node(options)?;
    let unused = vec![
        TarEntry::dir("unused"),
        TarEntry::random_file("unused/a", 32 << 20, 8),
        TarEntry::random_file("unused/b", 32 << 20, 9),
    ];
    let app = build_app(
        &node.lodectl,
        &node.registry,
        "app",
        "hello from lode",
        BIG,
        7,
        unused,
    );
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    Some(Stack { node, app, out })
}

fn build_app(
    lodectl: &Lodectl,
    registry: &Registry,
    name: &str,
    motd: &str,
    big_size: u64,
    big_seed: u64,
    extra: Vec<TarEntry>,
) -> App {
    let mut entries = vec![
        TarEntry::dir("data"),
        TarEntry::file("data/motd", format!("{motd}\n")),
        TarEntry::random_file("data/big", big_size, big_seed),
    ];
    entries.extend(extra);
    let plain = push_busybox_image(registry, name, entries).unwrap();
    let lode = registry.reference(&format!("{name}:v1-lode"));
    lodectl.convert(&plain, &lode, None, None).unwrap();
    App {
        plain,
        lode,
        motd: motd.to_owned(),
        big_seed,
        big_size,
    }
}

impl Node {
    /// Makes containerd and Lode fetch the node registry's content from
    /// `mirrors` first (its `hosts.toml`, read at the next pull), sending
    /// them `headers`.
    pub fn use_mirrors(&self, mirrors: &[String], headers: &[(&str, &str)]) {
        let dir = self.hosts_dir.as_ref().expect("a CRI node");
        write_hosts_toml(dir.path(), &self.registry.host(), mirrors, headers).unwrap();
    }

    /// Builds, pushes and converts another image named `name`, whose
    /// `/data/big` has `big_size` bytes from `big_seed`.
    pub fn add_app(&self, name: &str, big_size: u64, big_seed: u64) -> App {
        let motd = format!("hello from {name}");
        build_app(
            &self.lodectl,
            &self.registry,
            name,
            &motd,
            big_size,
            big_seed,
            Vec::new(),
        )
    }

    /// Waits until containerd reaches a restarted snapshotter: it redials
    /// a proxy that went away with a back-off. `usage` reaches the
    /// snapshotter itself (`ls` would answer from containerd's database);
    /// its answer is the usage, or that a record of `corrupt` (keys) is.
    pub fn wait_for_containerd_to_reach_snapshotter(&self, namespace: &str, corrupt: &[&str]) {
        wait_until(
            Duration::from_secs(60),
            "containerd to reach the restarted snapshotter",
            || {
                self.containerd
                    .ctr(
                        namespace,
                        ["snapshots", "--snapshotter", SNAPSHOTTER, "usage"],
                    )
                    .is_ok_and(|r| {
                        r.success
                            || corrupt
                                .iter()
                                .any(|key| r.stderr.contains(&format!("corrupt record {key}")))
                    })
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// `lodectl pull` into the test namespace; returns its summary.
    pub fn pull_lazily(&self, namespace: &str, image: &Reference) -> String {
        let run = self.try_pull_lazily(namespace, image);
        assert!(
            run.success,
            "lodectl pull: {}\n{}",
            run.stderr,
            self.snapshotter.log()
        );
        run.stdout
    }

    /// `lodectl pull` into the test namespace, successful or not.
    pub fn try_pull_lazily(&self, namespace: &str, image: &Reference) -> Run {
        self.lodectl
            .run([
                "pull",
                "--plain-http",
                "--address",
                &self.containerd.socket().display().to_string(),
                "--namespace",
                &self.containerd.namespace(namespace),
                &image.to_string(),
            ])
            .unwrap()
    }

    /// `ctr run --rm` of `image`: the container's stdout, or a panic with
    /// the logs of the snapshotter and containerd.
    pub fn run(&self, namespace: &str, image: &Reference, id: &str, script: &str) -> String {
        let run = self.try_run(namespace, image, id, script);
        if !run.success {
            panic!(
                "container {id} of {image}: exit {:?}: {}{}\n{}",
                run.code,
                run.stdout,
                run.stderr.trim(),
                self.logs()
            );
        }
        run.stdout
    }

    /// Like [`Stack::run`], but returns the run whatever its outcome.
    ///
    /// The container writes its output to files in a directory bound into
    /// it, read once `ctr` returns: `ctr run --rm` sometimes loses the
    /// output of a container that exits at once (about one run in 150 here,
    /// with exit status 0).
    pub fn try_run(&self, namespace: &str, image: &Reference, id: &str, script: &str) -> Run {
        let image = image.to_string();
        let dir = self.run_output.path();
        let mount = format!(
            "type=bind,src={},dst=/lode-run,options=rbind:rw",
            dir.display()
        );
        let script = format!("exec >/lode-run/{id}.stdout 2>/lode-run/{id}.stderr; {script}");
        let mut args = vec!["run", "--mount", &mount];
        args.extend(&run_args(&image, id, &script)[1..]);
        let mut run = self.containerd.ctr(namespace, args).unwrap();
        for (name, text) in [("stdout", &mut run.stdout), ("stderr", &mut run.stderr)] {
            let path = dir.join(format!("{id}.{name}"));
            if let Ok(written) = std::fs::read_to_string(&path) {
                text.insert_str(0, &written);
                let _ = std::fs::remove_file(&path);
            }
        }
        run
    }

    /// The snapshotter's log and the last lines of containerd's.
    pub fn logs(&self) -> String {
        let containerd = self.containerd.log();
        let tail: Vec<&str> = containerd.lines().rev().take(15).collect();
        format!(
            "snapshotter log:\n{}\ncontainerd log (last lines, newest first):\n{}",
            self.snapshotter.log(),
            tail.join("\n")
        )
    }

    /// Converts `source` to `target` with the prefetch list `list` (its
    /// text); returns the bytes of the data blobs' fronts, which it checks
    /// are there.
    pub fn convert_listed(&self, source: &Reference, target: &Reference, list: &str) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefetch.list");
        std::fs::write(&path, list).unwrap();
        self.lodectl
            .convert(source, target, None, Some(&path))
            .unwrap();
        let fronts = self
            .lode_manifest(target)
            .fronts
            .iter()
            .map(|f| f.bytes)
            .sum();
        assert!(fronts > 0, "{target}: no prefetch front in its manifest");
        fronts
    }

    /// The Lode image's bootstrap and data blobs.
    pub fn lode_manifest(&self, image: &Reference) -> LodeManifest {
        let client = self.registry.client();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(lode_common::image::resolve(&client, image))
            .unwrap()
    }

    /// The image's data blobs.
    pub fn data_blobs(&self, image: &Reference) -> Vec<Digest> {
        self.lode_manifest(image).data_blobs
    }

    /// Bytes of the image's data blobs the registry served so far.
    pub fn data_bytes_served(&self, image: &Reference) -> u64 {
        self.data_blobs(image)
            .iter()
            .flat_map(|d| self.registry.requests_for(&d.to_string()))
            .filter(|r| r.method == "GET" && (r.status == 200 || r.status == 206))
            .map(|r| r.bytes)
            .sum()
    }

    /// `ctr image rm --sync`: containerd removes the image's snapshots
    /// before it returns.
    pub fn remove_image(&self, namespace: &str, image: &Reference) {
        self.containerd
            .ctr_ok(namespace, ["image", "rm", "--sync", &image.to_string()])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Drops the kernel's cached pages of `relative` (e.g. `data/big`) in
    /// every image served below the snapshotter's mounts, so that the next
    /// reads of it reach a daemon. Returns how many files it dropped. The
    /// mounts must be served.
    pub fn drop_cached_pages(&self, relative: &str) -> usize {
        let mut dropped = 0;
        for mount in mounts_below(&self.snapshotter.root().join("mnt")) {
            let instances = std::fs::read_dir(&mount)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path());
            for root in std::iter::once(mount.clone()).chain(instances) {
                if let Ok(file) = std::fs::File::open(root.join(relative)) {
                    // SAFETY: a valid descriptor; fadvise only drops clean cached pages.
                    unsafe {
                        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                    };
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// The chunks a reader of `app` reads each round (busybox, `/data/big`,
    /// `/data/motd`).
    pub fn reader_chunks(&self, app: &App) -> Vec<ChunkLocation> {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = fetch_bootstrap(&app.lode, dir.path()).unwrap();
        let bootstrap = Bootstrap::open(&path).unwrap();
        ["bin/busybox", "data/big", "data/motd"]
            .iter()
            .flat_map(|file| file_chunks(&bootstrap, file.as_bytes()).unwrap())
            .collect()
    }

    /// How many of `chunks` the snapshotter's chunk cache holds durably.
    pub fn durable_chunks(&self, chunks: &[ChunkLocation]) -> usize {
        let cache = self.snapshotter.root().join("cache");
        chunks.iter().filter(|c| cache_durable(&cache, c)).count()
    }

    /// Waits until the snapshotter serves no Lode image and its chunk cache
    /// and bootstraps are gone (after the last Lode image was removed): the
    /// next pull starts from nothing but the shared daemon, which runs with
    /// the snapshotter.
    pub fn wait_for_no_instances_or_cache(&self) {
        let root = self.snapshotter.root();
        let entries = |dir: &str| std::fs::read_dir(root.join(dir)).map_or(0, |d| d.count());
        wait_until(
            Duration::from_secs(30),
            "Lode's instances, cache and bootstraps to go",
            || {
                self.instance_mounts().is_empty()
                    && entries("cache") == 0
                    && entries("bootstraps") == 0
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.snapshotter.log()));
    }

    /// Where Lode serves images: the dedicated daemons' mounts and the
    /// shared daemon's instances (its own mount serves none by itself). A
    /// shared daemon that does not answer counts as serving.
    pub fn instance_mounts(&self) -> Vec<PathBuf> {
        let mut found = mounts_below(&self.snapshotter.root().join("mnt"));
        found.retain(|m| !m.ends_with("mnt/shared"));
        if self.shared_socket().exists() {
            match self.shared_daemon_info() {
                Ok(info) => found.extend(info.instances.into_iter().map(|i| i.mountpoint)),
                Err(_) => found.push(self.shared_socket()),
            }
        }
        found
    }

    /// Removes `image` (its containers are gone) and waits until the shared
    /// daemon no longer serves it.
    pub fn remove_image_instance(&self, namespace: &str, image: &Reference) {
        self.remove_image(namespace, image);
        wait_until(
            Duration::from_secs(30),
            "the removed image's instance to go",
            || self.instance_of(image).is_none(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.snapshotter.log()));
    }

    /// The shared daemon's API socket.
    pub fn shared_socket(&self) -> PathBuf {
        self.snapshotter.root().join("daemons/shared.sock")
    }

    /// What the shared daemon says about itself through its API.
    pub fn shared_daemon_info(&self) -> Result<DaemonInfo, ClientError> {
        let client = DaemonClient::new(self.shared_socket());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(client.daemon_info())
    }

    /// What the readers of the shared daemon's instance of `image` read.
    pub fn access_of(&self, image: &Reference) -> InstanceAccess {
        let instance = self
            .instance_of(image)
            .unwrap_or_else(|| panic!("no instance serves {image}"));
        let client = DaemonClient::new(self.shared_socket());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(client.access(Some(&instance.id))).unwrap()
    }

    /// The shared daemon's instance of `image`, if it serves one.
    pub fn instance_of(&self, image: &Reference) -> Option<InstanceInfo> {
        let wanted = image.to_string();
        self.shared_daemon_info()
            .ok()?
            .instances
            .into_iter()
            .find(|i| i.image_ref.as_deref() == Some(wanted.as_str()))
    }
}

impl Stack {
    /// Starts container `id` of `app` that verifies `/data/big` and
    /// `/data/motd` in a loop, appending "N OK" or "N ERR ..." to the
    /// returned log; returns once a round is done.
    pub fn start_reader(&self, namespace: &str, app: &App, id: &str) -> PathBuf {
        let script = format!(
            "i=0; while true; do s=$(sha256sum /data/big | head -c 64); m=$(cat /data/motd); \
             if [ \"$s\" = {sha} ] && [ \"$m\" = '{motd}' ]; then echo \"$i OK\"; \
             else echo \"$i ERR $s $m\"; fi >> /out/{id}.log; i=$((i+1)); done",
            sha = app.big_sha256(),
            motd = app.motd,
        );
        let mount = format!(
            "type=bind,src={},dst=/out,options=rbind:rw",
            self.out.path().display()
        );
        let image = app.lode.to_string();
        let mut args = vec!["run", "-d", "--mount", &mount];
        args.extend(&run_args(&image, id, &script)[2..]);
        self.containerd
            .ctr_ok(namespace, args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        let log = self.out.path().join(format!("{id}.log"));
        wait_for_rounds(&log, 1);
        log
    }
}

fn run_args<'a>(image: &'a str, id: &'a str, script: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        image,
        id,
        "/bin/sh",
        "-c",
        script,
    ]
}

/// The inode number of `path` on the host, bounded in time (an unserved
/// FUSE mount would block the caller).
pub fn inode_of(path: &Path) -> std::io::Result<u64> {
    let path = path.to_path_buf();
    bounded(Duration::from_secs(30), "stat", move || {
        std::fs::metadata(path).map(|m| m.ino())
    })
}

/// Rounds the reader logged, and the lines that are not "N OK".
pub fn rounds(log: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors = text
        .lines()
        .filter(|l| !l.ends_with(" OK"))
        .map(str::to_owned)
        .collect();
    (text.lines().count(), errors)
}

/// Waits until the reader has completed `more` rounds beyond now.
pub fn wait_for_rounds(log: &Path, more: usize) {
    wait_for_total_rounds(log, rounds(log).0 + more);
}

/// Waits until the reader has completed `total` rounds in all.
pub fn wait_for_total_rounds(log: &Path, total: usize) {
    wait_until(Duration::from_secs(60), "reader progress", || {
        rounds(log).0 >= total
    })
    .unwrap_or_else(|e| panic!("{e}: {}", log.display()));
}

/// The value of the per-image counter `name` for `image` (as its pull
/// named it) in a Prometheus scrape.
pub fn image_metric(metrics: &str, name: &str, image: &str) -> Option<u64> {
    let series = format!("{name}{{image=\"{image}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
}

/// `GET /metrics` over a plain TCP connection to the loopback endpoint.
pub fn scrape(url: &str) -> String {
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
