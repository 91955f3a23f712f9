//! The snapshots API of lode-snapshotter over its real gRPC socket, with the
//! cases of containerd's snapshotter test suite: kinds, parent chains, error
//! codes, labels, walks with filters, usage, cleanup, real overlay mounts,
//! and metadata that survives a kill -9. Root only (overlay mounts).

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CleanupRequest, CommitSnapshotRequest, Info,
    ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest, UpdateSnapshotRequest, UsageRequest, ViewSnapshotRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Code;
use containerd_client::types::Mount;
use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_tests::lode::cache_disk_bytes;
use lode_tests::snapshotter::{Snapshotter, SnapshotterOptions};
use lode_tests::{require_root, skip_unless};

struct Api {
    rt: tokio::runtime::Runtime,
    client: SnapshotsClient<Channel>,
}

impl Api {
    fn connect(snapshotter: &Snapshotter) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let channel = rt
            .block_on(containerd_client::connect(snapshotter.socket()))
            .unwrap();
        Self {
            rt,
            client: SnapshotsClient::new(channel),
        }
    }

    fn prepare(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Code> {
        self.prepare_labeled(key, parent, HashMap::new())
    }

    fn prepare_labeled(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Code> {
        let request = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        self.rt
            .block_on(self.client.prepare(request))
            .map(|r| r.into_inner().mounts)
            .map_err(|s| s.code())
    }

    fn view(&mut self, key: &str, parent: &str) -> Result<Vec<Mount>, Code> {
        let request = ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        self.rt
            .block_on(self.client.view(request))
            .map(|r| r.into_inner().mounts)
            .map_err(|s| s.code())
    }

    fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Code> {
        let request = MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.mounts(request))
            .map(|r| r.into_inner().mounts)
            .map_err(|s| s.code())
    }

    fn commit(&mut self, name: &str, key: &str) -> Result<(), Code> {
        let request = CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        };
        self.rt
            .block_on(self.client.commit(request))
            .map(|_| ())
            .map_err(|s| s.code())
    }

    fn remove(&mut self, key: &str) -> Result<(), Code> {
        let request = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.remove(request))
            .map(|_| ())
            .map_err(|s| s.code())
    }

    fn stat(&mut self, key: &str) -> Result<Info, Code> {
        let request = StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.stat(request))
            .map(|r| r.into_inner().info.unwrap())
            .map_err(|s| s.code())
    }

    fn list(&mut self, filters: &[&str]) -> Result<Vec<String>, Code> {
        let request = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        self.rt.block_on(async {
            let mut stream = self
                .client
                .list(request)
                .await
                .map_err(|s| s.code())?
                .into_inner();
            let mut names = Vec::new();
            while let Some(batch) = stream.message().await.map_err(|s| s.code())? {
                names.extend(batch.info.into_iter().map(|i| i.name));
            }
            names.sort();
            Ok(names)
        })
    }

    fn usage(&mut self, key: &str) -> Result<(i64, i64), Code> {
        let request = UsageRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.rt
            .block_on(self.client.usage(request))
            .map(|r| {
                let r = r.into_inner();
                (r.size, r.inodes)
            })
            .map_err(|s| s.code())
    }
}

/// Whether the machine can run these tests (root, binaries built); prints
/// why not.
fn may_run() -> bool {
    require_root()
        && skip_unless(
            Snapshotter::available(),
            "lode-snapshotter/lode-fsd not built",
        )
}

fn setup() -> Option<(Snapshotter, Api)> {
    if !may_run() {
        return None;
    }
    let snapshotter = Snapshotter::start(&SnapshotterOptions::default()).unwrap();
    let api = Api::connect(&snapshotter);
    Some((snapshotter, api))
}

/// Mounts what the snapshotter returned at `target`, as containerd would.
struct Mounted(std::path::PathBuf);

impl Mounted {
    fn new(mounts: &[Mount], target: &Path) -> Self {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(target).unwrap();
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        let read_only = m.options.iter().any(|o| o == "ro");
        if m.r#type == "bind" {
            mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .unwrap();
            if read_only {
                let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                mount(None::<&str>, target, None::<&str>, flags, None::<&str>).unwrap();
            }
        } else {
            let data: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "ro")
                .collect();
            let flags = if read_only {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                flags,
                Some(data.join(",").as_str()),
            )
            .unwrap_or_else(|e| panic!("overlay {data:?}: {e}"));
        }
        Self(target.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn layers_commit_view_and_whiteouts_like_containerd() {
    let Some((_snapshotter, mut api)) = setup() else {
        return;
    };
    let work = tempfile::tempdir_in("/var/tmp").unwrap();

    let mounts = api.prepare("base-active", "").unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    {
        let m = Mounted::new(&mounts, &work.path().join("m1"));
        std::fs::write(m.0.join("foo"), "foo\n").unwrap();
        std::fs::create_dir(m.0.join("dir")).unwrap();
        std::fs::write(m.0.join("dir/moved"), "moved\n").unwrap();
    }
    api.commit("base", "base-active").unwrap();

    let mounts = api.prepare("next-active", "base").unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    {
        let m = Mounted::new(&mounts, &work.path().join("m2"));
        assert_eq!(std::fs::read_to_string(m.0.join("foo")).unwrap(), "foo\n");
        std::fs::remove_file(m.0.join("foo")).unwrap();
        std::fs::rename(m.0.join("dir/moved"), m.0.join("moved")).unwrap();
        std::fs::write(m.0.join("bar"), "bar\n").unwrap();
    }
    api.commit("next", "next-active").unwrap();

    let mounts = api.view("next-view", "next").unwrap();
    let m = Mounted::new(&mounts, &work.path().join("m3"));
    assert!(!m.0.join("foo").exists(), "deleted in the child layer");
    assert!(
        !m.0.join("dir/moved").exists(),
        "moved away from the lower layer"
    );
    assert_eq!(
        std::fs::read_to_string(m.0.join("moved")).unwrap(),
        "moved\n"
    );
    assert_eq!(std::fs::read_to_string(m.0.join("bar")).unwrap(), "bar\n");
    let err = std::fs::write(m.0.join("nope"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "a view is read-only");
    drop(m);

    // A view of a single committed layer is a read-only bind of it.
    let mounts = api.view("base-view", "base").unwrap();
    assert_eq!(
        (
            mounts[0].r#type.as_str(),
            mounts[0].options.contains(&"ro".to_string())
        ),
        ("bind", true)
    );
}

#[test]
fn kinds_parents_and_error_codes() {
    let Some((_snapshotter, mut api)) = setup() else {
        return;
    };
    api.prepare("a", "").unwrap();
    assert_eq!(api.stat("a").unwrap().kind, 2, "active");
    assert_eq!(api.prepare("a", ""), Err(Code::AlreadyExists));
    assert_eq!(api.prepare("x", "missing").unwrap_err(), Code::NotFound);
    assert_eq!(
        api.prepare("x", "a").unwrap_err(),
        Code::FailedPrecondition,
        "parent must be committed"
    );
    api.commit("a-c", "a").unwrap();
    assert_eq!(
        api.stat("a").unwrap_err(),
        Code::NotFound,
        "the active key is gone after commit"
    );
    let info = api.stat("a-c").unwrap();
    assert_eq!((info.kind, info.parent.as_str()), (3, ""));
    assert_eq!(api.mounts("a-c").unwrap_err(), Code::FailedPrecondition);

    api.view("v", "a-c").unwrap();
    assert_eq!(api.stat("v").unwrap().kind, 1, "view");
    assert_eq!(
        api.commit("v-c", "v").unwrap_err(),
        Code::FailedPrecondition,
        "views cannot be committed"
    );
    api.prepare("b", "a-c").unwrap();
    assert_eq!(api.commit("a-c", "b").unwrap_err(), Code::AlreadyExists);
    assert_eq!(api.stat("b").unwrap().parent, "a-c");
    // Transitivity: b-c's parent chain reaches a-c.
    api.commit("b-c", "b").unwrap();
    api.prepare("c", "b-c").unwrap();
    assert_eq!(api.stat("c").unwrap().parent, "b-c");
    assert_eq!(api.stat("b-c").unwrap().parent, "a-c");

    assert_eq!(
        api.remove("a-c").unwrap_err(),
        Code::FailedPrecondition,
        "it has children"
    );
    assert_eq!(api.remove("missing").unwrap_err(), Code::NotFound);
    api.remove("v").unwrap();
    assert_eq!(
        api.remove("v").unwrap_err(),
        Code::NotFound,
        "removing twice"
    );
    api.remove("c").unwrap();
    api.remove("b-c").unwrap();
    api.remove("a-c").unwrap();
    assert!(api.list(&[]).unwrap().is_empty());
}

#[test]
fn labels_walk_filters_usage_and_cleanup() {
    let Some((snapshotter, mut api)) = setup() else {
        return;
    };
    let labels: HashMap<String, String> = [("team".to_string(), "blue".to_string())].into();
    let mounts = api.prepare_labeled("l1", "", labels).unwrap();
    {
        let work = tempfile::tempdir_in("/var/tmp").unwrap();
        let m = Mounted::new(&mounts, &work.path().join("m"));
        std::fs::write(m.0.join("data"), vec![7u8; 1 << 20]).unwrap();
    }
    let (size, inodes) = api.usage("l1").unwrap();
    assert!(size >= 1 << 20 && inodes >= 2, "{size} {inodes}");
    api.commit("l1-c", "l1").unwrap();
    assert_eq!(
        api.usage("l1-c").unwrap(),
        (size, inodes),
        "recorded at commit"
    );
    api.prepare("l2", "l1-c").unwrap();

    // Update: only labels, by field path.
    let mut info = api.stat("l2").unwrap();
    info.labels.insert("team".into(), "red".into());
    info.labels.insert("tier".into(), "x".into());
    let request = UpdateSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        info: Some(info.clone()),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels.team".into()],
        }),
    };
    let updated = api
        .rt
        .block_on(api.client.update(request))
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(updated.labels.get("team").map(String::as_str), Some("red"));
    assert!(
        !updated.labels.contains_key("tier"),
        "only the masked label changes"
    );
    let request = UpdateSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        info: Some(info),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["parent".into()],
        }),
    };
    let err = api.rt.block_on(api.client.update(request)).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(api.list(&["kind==committed"]).unwrap(), ["l1-c"]);
    assert_eq!(api.list(&["labels.team==red"]).unwrap(), ["l2"]);
    assert_eq!(
        api.list(&["labels.\"team\"==red", "kind==committed"])
            .unwrap(),
        ["l1-c", "l2"]
    );
    // Commit takes the labels it is given: l1's label did not carry over.
    assert_eq!(
        api.list(&["labels.team==blue"]).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        api.list(&["kind==active,labels.team==blue"]).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(api.list(&["name~=x"]).unwrap_err(), Code::InvalidArgument);

    // Cleanup removes directories no snapshot owns.
    let orphan = snapshotter.root().join("snapshots").join("999999");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    let request = CleanupRequest {
        snapshotter: SNAPSHOTTER.into(),
    };
    api.rt.block_on(api.client.cleanup(request)).unwrap();
    assert!(!orphan.exists());
    assert!(api.mounts("l2").is_ok(), "cleanup keeps what snapshots own");
}

#[test]
fn deep_chains_mount_and_metadata_survives_kill_9() {
    let Some((mut snapshotter, mut api)) = setup() else {
        return;
    };
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut parent = String::new();
    for layer in 0..32 {
        let key = format!("active-{layer}");
        let mounts = api.prepare(&key, &parent).unwrap();
        {
            let m = Mounted::new(&mounts, &work.path().join(format!("m{layer}")));
            std::fs::write(m.0.join(format!("layer-{layer}")), layer.to_string()).unwrap();
        }
        let name = format!("layer-{layer}");
        api.commit(&name, &key).unwrap();
        parent = name;
    }
    let mounts = api.view("top", &parent).unwrap();
    {
        let m = Mounted::new(&mounts, &work.path().join("top"));
        for layer in 0..32 {
            assert_eq!(
                std::fs::read_to_string(m.0.join(format!("layer-{layer}"))).unwrap(),
                layer.to_string()
            );
        }
    }
    let before = api.list(&[]).unwrap();
    assert_eq!(before.len(), 33);
    // A directory a crash left without a record goes at the next start.
    snapshotter.kill9();
    let orphan = snapshotter.root().join("snapshots").join("888888");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    snapshotter.restart().unwrap();
    assert!(!orphan.exists(), "orphaned snapshot directory kept");
    let mut api = Api::connect(&snapshotter);
    assert_eq!(api.list(&[]).unwrap(), before);
    assert_eq!(api.stat("layer-31").unwrap().parent, "layer-30");
    assert_eq!(
        api.mounts("top").unwrap(),
        mounts,
        "mounts are recomputed identically"
    );
}

#[test]
fn root_permission_directory_modes_and_intermediate_removal() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some((_snapshotter, mut api)) = setup() else {
        return;
    };
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;

    // An empty snapshot's root is 0755, whatever the umask.
    let mounts = api.prepare("root", "").unwrap();
    {
        let m = Mounted::new(&mounts, &work.path().join("root"));
        assert_eq!(mode(&m.0), 0o755);
        for (dir, bits) in [("a", 0o700), ("b", 0o1777), ("a/c", 0o750)] {
            std::fs::create_dir(m.0.join(dir)).unwrap();
            std::fs::set_permissions(m.0.join(dir), std::fs::Permissions::from_mode(bits)).unwrap();
        }
    }
    api.commit("modes", "root").unwrap();
    // Directory modes survive a commit and show through a child layer.
    let mounts = api.prepare("child", "modes").unwrap();
    {
        let m = Mounted::new(&mounts, &work.path().join("child"));
        assert_eq!(mode(&m.0.join("a")), 0o700);
        assert_eq!(mode(&m.0.join("b")), 0o1777);
        assert_eq!(mode(&m.0.join("a/c")), 0o750);
        std::fs::write(m.0.join("a/c/file"), "x").unwrap();
    }
    api.commit("child-c", "child").unwrap();
    api.prepare("top", "child-c").unwrap();
    // An intermediate layer cannot go while a layer above it exists.
    assert_eq!(api.remove("child-c").unwrap_err(), Code::FailedPrecondition);
    assert_eq!(api.remove("modes").unwrap_err(), Code::FailedPrecondition);
    api.remove("top").unwrap();
    api.remove("child-c").unwrap();
    api.remove("modes").unwrap();
}

/// Cleanup removes directories no record names; Prepare makes a directory,
/// then records it. Raced, a Cleanup must never take the directory of a
/// snapshot being prepared: every snapshot prepared meanwhile keeps its
/// directories, and only the planted orphans go.
#[test]
fn cleanup_racing_prepare_removes_only_orphans() {
    let Some((snapshotter, api)) = setup() else {
        return;
    };
    const PREPARERS: usize = 4;
    const EACH: usize = 60;
    let snapshots = snapshotter.root().join("snapshots");
    let orphans: Vec<_> = (0..20)
        .map(|i| snapshots.join(format!("{}", 900_000 + i)))
        .collect();
    for orphan in &orphans {
        std::fs::create_dir_all(orphan.join("fs")).unwrap();
    }
    let client = api.client.clone();
    let prepared: Vec<(String, Vec<Mount>)> = api.rt.block_on(async move {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cleaner = {
            let (mut client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                let mut rounds = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = CleanupRequest {
                        snapshotter: SNAPSHOTTER.into(),
                    };
                    client.cleanup(request).await.expect("cleanup");
                    rounds += 1;
                }
                rounds
            })
        };
        let preparers: Vec<_> = (0..PREPARERS)
            .map(|p| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut mounts = Vec::new();
                    for i in 0..EACH {
                        let key = format!("race-{p}-{i}");
                        let request = PrepareSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: key.clone(),
                            parent: String::new(),
                            labels: HashMap::new(),
                        };
                        let answer = client.prepare(request).await.expect("prepare");
                        mounts.push((key, answer.into_inner().mounts));
                    }
                    mounts
                })
            })
            .collect();
        let mut prepared = Vec::new();
        for preparer in preparers {
            prepared.extend(preparer.await.unwrap());
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = cleaner.await.unwrap();
        assert!(
            rounds >= 2,
            "cleanup ran {rounds} times during the prepares"
        );
        prepared
    });
    assert_eq!(prepared.len(), PREPARERS * EACH);
    let mut missing = Vec::new();
    for (key, mounts) in &prepared {
        let [mount] = mounts.as_slice() else {
            panic!("{key}: {mounts:?}")
        };
        assert_eq!(mount.r#type, "bind", "{key}: {mount:?}");
        let dir = Path::new(&mount.source);
        if !dir.is_dir() || !dir.parent().unwrap().join("work").is_dir() {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "cleanup removed the directories of {} prepared snapshots: {missing:?}",
        missing.len()
    );
    for orphan in &orphans {
        assert!(!orphan.exists(), "orphan {} kept", orphan.display());
    }
}

/// Writes `count` cached blobs of 1 MiB that no image uses.
fn unused_blobs(cache: &Path, first: u8, count: u8) {
    for i in first..first + count {
        let hex = format!("{i:02x}").repeat(32);
        std::fs::write(cache.join(&hex), vec![i; 1 << 20]).unwrap();
        std::fs::write(cache.join(format!("{hex}.map")), [i; 64]).unwrap();
    }
}

/// `cache.size_limit_bytes` holds at start (before the snapshotter serves)
/// and while it runs (every `check_interval_secs`), removing blobs no image
/// uses.
#[test]
fn cache_limit_is_applied_at_start_and_while_running() {
    if !may_run() {
        return;
    }
    const LIMIT: u64 = 1 << 20;
    let mut snapshotter = Snapshotter::start(&SnapshotterOptions {
        cache_size_limit_bytes: LIMIT,
        cache_check_interval_secs: Some(1),
        ..SnapshotterOptions::default()
    })
    .unwrap();
    let cache = snapshotter.root().join("cache");
    snapshotter.kill9();
    unused_blobs(&cache, 1, 4);
    assert!(cache_disk_bytes(&cache) > 4 * LIMIT);
    snapshotter.restart().unwrap();
    let at_start = cache_disk_bytes(&cache);
    assert!(
        at_start <= LIMIT,
        "{at_start} bytes cached when the snapshotter serves, limit {LIMIT}\n{}",
        snapshotter.log()
    );

    unused_blobs(&cache, 10, 3);
    lode_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the cache trimmed to its limit while running",
        || cache_disk_bytes(&cache) <= LIMIT,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} bytes\n{}",
            cache_disk_bytes(&cache),
            snapshotter.log()
        )
    });
}

/// Fills `path`'s filesystem with a file at `path`.
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5a; 64 << 10];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
}

/// The snapshotter's root (metadata store and snapshot directories) on a
/// disk that fills up: operations fail with a gRPC error that says so,
/// nothing recorded before is lost, and once space is back everything
/// works again, across a restart too.
#[test]
fn a_full_disk_fails_operations_clearly_and_loses_nothing() {
    if !may_run() {
        return;
    }
    let mut snapshotter = Snapshotter::start(&SnapshotterOptions {
        root_tmpfs_size: Some("16m"),
        ..SnapshotterOptions::default()
    })
    .unwrap();
    let mut api = Api::connect(&snapshotter);
    api.prepare("kept", "").unwrap();
    api.commit("kept-c", "kept").unwrap();
    api.prepare("kept-2", "kept-c").unwrap();
    let before = api.list(&[]).unwrap();

    let filler = snapshotter.root().join("filler");
    fill(&filler);
    // The store has room ahead in its file: prepare (with large labels)
    // until it must grow.
    let mut refused = Vec::new();
    let mut prepared = Vec::new();
    for i in 0..2000 {
        let request = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: format!("full-{i}"),
            parent: "kept-c".into(),
            labels: [("pad".to_string(), "x".repeat(3000))].into(),
        };
        match api.rt.block_on(api.client.prepare(request)) {
            Ok(_) => prepared.push(format!("full-{i}")),
            Err(status) => refused.push(status),
        }
        if refused.len() == 3 {
            break;
        }
    }
    eprintln!(
        "with the disk full: {} prepared, then {:?}",
        prepared.len(),
        refused
            .iter()
            .map(|s| (s.code(), s.message()))
            .collect::<Vec<_>>()
    );
    assert!(!refused.is_empty(), "no Prepare failed with the disk full");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("No space left on device"),
            "{status:?}"
        );
    }
    let listed = api
        .list(&[])
        .unwrap_or_else(|c| panic!("{c:?} {}", snapshotter.log()));
    for key in before.iter().chain(&prepared) {
        assert!(
            listed.contains(key),
            "{key} lost with the disk full: {listed:?}"
        );
    }
    assert!(api.mounts("kept-2").is_ok());

    std::fs::remove_file(&filler).unwrap();
    api.prepare("after", "kept-c")
        .unwrap_or_else(|code| panic!("Prepare with space again: {code:?}\n{}", snapshotter.log()));
    snapshotter.restart().unwrap();
    let mut api = Api::connect(&snapshotter);
    let listed = api.list(&[]).unwrap();
    for key in before
        .iter()
        .chain(&prepared)
        .chain(["after".to_string()].iter())
    {
        assert!(
            listed.contains(key),
            "{key} lost after a restart: {listed:?}"
        );
    }
    for key in listed.iter().filter(|k| k.starts_with("full-")) {
        assert!(api.mounts(key).is_ok(), "{key} recorded but unusable");
    }
}
