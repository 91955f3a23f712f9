//! Shared mode end to end with real components (docker-registry,
//! containerd 1.6, lode-snapshotter, one lode-fsd serving every Lode image
//! as an instance in a subdirectory of its mount): images that come and go
//! next to running ones, and recovery of a daemon that serves several
//! images or none. Root only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{inode_of, rounds, stack, wait_for_rounds, App, Stack};
use lode_tests::wait_until;

/// Bits of a shared daemon's inode numbers below an instance's sequence
/// number: an instance's inodes are `(seq << 40) | local inode`.
const LOCAL_INO_BITS: u32 = 40;

fn verify_script() -> &'static str {
    "cat /data/motd; sha256sum /data/big"
}

fn assert_verified(app: &App, out: &str) {
    assert!(
        out.contains(&app.motd) && out.contains(&app.big_sha256()),
        "{}: {out}",
        app.lode
    );
}

#[test]
fn image_removed_and_pulled_again_runs_next_to_one_that_kept_the_daemon() {
    let Some(s) = stack(SnapshotterOptions::default()) else {
        return;
    };
    let a = s.app.clone();
    let b = s.add_app("other", 4 << 20, 11);
    s.pull_lazily("lazy", &a.lode);
    s.pull_lazily("lazy", &b.lode);
    s.start_reader("lazy", &a, "reader-a");
    let log_b = s.start_reader("lazy", &b, "reader-b");
    let daemon = s.shared_daemon_info().unwrap();
    assert_eq!(daemon.instances.len(), 2, "{daemon:?}");
    let removed = s.instance_of(&a.lode).expect("an instance of A");

    s.containerd.remove_container("lazy", "reader-a").unwrap();
    s.remove_image_instance("lazy", &a.lode);
    assert_eq!(
        s.shared_daemon_info().map(|d| d.pid).ok(),
        Some(daemon.pid),
        "B's instance keeps the shared daemon running"
    );
    wait_for_rounds(&log_b, 1);

    s.pull_lazily("lazy", &a.lode);
    let again = s.try_run("lazy", &a.lode, "a-again", verify_script());
    let instance = s.instance_of(&a.lode).unwrap_or_else(|| {
        panic!(
            "A pulled again: the daemon serves no instance of it; ctr run: {}\n{}",
            again.stderr,
            s.logs()
        )
    });
    // The instance's name is the removed one's: the host must see the new
    // instance there, in the inode range of its own sequence number.
    let seq_of = |path: &Path| inode_of(path).map(|ino| ino >> LOCAL_INO_BITS);
    let seen = [
        seq_of(&instance.mountpoint),
        seq_of(&instance.mountpoint.join("data/motd")),
    ];
    assert!(
        seen.iter().all(|seq| seq
            .as_ref()
            .is_ok_and(|seq| *seq == u64::from(instance.seq))),
        "A pulled again: the shared daemon serves it as instance seq {} at {}, the \
         name its removed instance (seq {}) had, but on the host that directory and its \
         data/motd are in the inode ranges of seq {:?}: the kernel still holds the \
         removed instance's entries.\nctr run: {}",
        instance.seq,
        instance.mountpoint.display(),
        removed.seq,
        seen,
        again.stderr.trim()
    );
    assert!(again.success, "ctr run: {}\n{}", again.stderr, s.logs());
    assert_verified(&a, &again.stdout);
    wait_for_rounds(&log_b, 1);
    let (total, errors) = rounds(&log_b);
    assert!(errors.is_empty(), "B's reader: {errors:?}");
    eprintln!("B's reader: {total} verified rounds, 0 errors");
}

#[test]
fn failover_of_a_daemon_with_several_images_keeps_readers_and_inodes() {
    recovery_in_sequence_order("failover");
}

#[test]
fn restart_of_a_daemon_with_several_images_serves_them_with_their_inodes() {
    recovery_in_sequence_order("restart");
}

/// An instance as the host sees it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    seq: u32,
    root_ino: u64,
    file_ino: u64,
}

#[test]
fn failover_of_the_idle_shared_daemon_serves_the_next_pull() {
    idle_daemon_recovered("failover", "takeover=true");
}

#[test]
fn restart_of_the_idle_shared_daemon_serves_the_next_pull() {
    idle_daemon_recovered("restart", "takeover=false");
}

/// The shared daemon runs from the snapshotter's start, before any image;
/// killed while it serves none, it is recovered by the policy like one
/// that serves images, and the next pull's container reads from it.
fn idle_daemon_recovered(policy: &'static str, how: &str) {
    let Some(s) = stack(SnapshotterOptions {
        recover_policy: policy,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let idle = s.shared_daemon_info().expect("the shared daemon runs");
    assert!(idle.instances.is_empty(), "{idle:?}");
    let started = s.snapshotter.log().matches(how).count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(idle.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "a new shared daemon", || {
        s.snapshotter.log().matches(how).count() > started
            && s.shared_daemon_info().is_ok_and(|d| d.pid != idle.pid)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_eq!(s.snapshotter.daemon_pids().len(), 1);
    s.pull_lazily("lazy", &s.app.lode);
    let out = s.run("lazy", &s.app.lode, "after", verify_script());
    assert_verified(&s.app, &out);
}

/// Kills a shared daemon that serves three images whose sequence numbers
/// follow neither their pull order nor 1, 2, 3. With `failover` their
/// readers go on without an error; with `restart` new containers run. In
/// both every instance keeps the inode numbers its sequence number fixes.
fn recovery_in_sequence_order(policy: &'static str) {
    let Some(s) = stack(SnapshotterOptions {
        recover_policy: policy,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let with_readers = policy == "failover";
    let apps = instances_with_a_gap(&s, with_readers);
    let before = seen(&s, &apps);
    let old = s.shared_daemon_info().unwrap().pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The snapshotter says how it recovered: a successor taking over, or a
    // second fresh start after the first.
    let (how, times) = if with_readers {
        ("takeover=true", 1)
    } else {
        ("takeover=false", 2)
    };
    wait_until(
        Duration::from_secs(60),
        "a new daemon serving all three instances",
        || {
            s.snapshotter.log().matches(how).count() >= times
                && s.shared_daemon_info()
                    .is_ok_and(|d| d.pid != old && d.instances.len() == apps.len())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    for (app, log) in &apps {
        match log {
            Some(log) => {
                wait_for_rounds(log, 1);
                let (total, errors) = rounds(log);
                assert!(errors.is_empty(), "{}: {errors:?}\n{}", app.lode, s.logs());
                eprintln!("{}: {total} verified rounds, 0 errors", app.lode);
            }
            None => {
                let id = format!("after-{}", app.big_seed);
                assert_verified(app, &s.run("lazy", &app.lode, &id, verify_script()));
            }
        }
    }
    let after = seen(&s, &apps);
    eprintln!("{policy}: instances before {before:?}, after {after:?}");
    assert_eq!(before, after, "instances after the {policy}");
}

/// Pulls four images and mounts their instances in another order (a pull
/// mounts its image's instance), running a reader (or one container) of
/// each; the second instance mounted is removed again, so the three left
/// have sequence numbers with a gap. Returns them in sequence order with
/// their reader logs.
fn instances_with_a_gap(s: &Stack, with_readers: bool) -> Vec<(App, Option<PathBuf>)> {
    let apps = [
        s.app.clone(),
        s.add_app("second", 4 << 20, 12),
        s.add_app("third", 4 << 20, 13),
        s.add_app("gone", 1 << 20, 14),
    ];
    let [first, second, third, gone] = apps;
    let mut mounted = vec![mount(s, third, with_readers)];
    s.pull_lazily("lazy", &gone.lode);
    assert_verified(&gone, &s.run("lazy", &gone.lode, "gone", verify_script()));
    s.remove_image_instance("lazy", &gone.lode);
    mounted.push(mount(s, first, with_readers));
    mounted.push(mount(s, second, with_readers));
    let seqs: Vec<u32> = mounted
        .iter()
        .map(|(app, _)| s.instance_of(&app.lode).expect("an instance").seq)
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs.windows(2).any(|w| w[1] > w[0] + 1),
        "sequence numbers in mount order, with a gap: {seqs:?}"
    );
    mounted
}

/// Pulls the image and mounts its instance (the pull starts serving it),
/// then starts a reader of it, or runs one container.
fn mount(s: &Stack, app: App, with_reader: bool) -> (App, Option<PathBuf>) {
    s.pull_lazily("lazy", &app.lode);
    if with_reader {
        let log = s.start_reader("lazy", &app, &format!("reader-{}", app.big_seed));
        return (app, Some(log));
    }
    let id = format!("before-{}", app.big_seed);
    assert_verified(&app, &s.run("lazy", &app.lode, &id, verify_script()));
    (app, None)
}

/// Each instance's sequence number and the inode numbers of its root and of
/// `/data/motd` on the host, which must lie in the range the sequence
/// number fixes.
fn seen(s: &Stack, apps: &[(App, Option<PathBuf>)]) -> Vec<Seen> {
    apps.iter()
        .map(|(app, _)| {
            let instance = s.instance_of(&app.lode).expect("an instance");
            let root: &Path = &instance.mountpoint;
            let seen = Seen {
                seq: instance.seq,
                root_ino: inode_of(root).unwrap(),
                file_ino: inode_of(&root.join("data/motd")).unwrap(),
            };
            for ino in [seen.root_ino, seen.file_ino] {
                assert_eq!(
                    ino >> LOCAL_INO_BITS,
                    u64::from(seen.seq),
                    "inode {ino:#x} of {} is not in seq {}'s range",
                    app.lode,
                    seen.seq
                );
            }
            seen
        })
        .collect()
}
