//! Soak, with real components (docker-registry, containerd 1.6,
//! lode-snapshotter, lode-fsd): containers of three Lode images verify
//! their files in a loop while a chaos loop SIGKILLs daemons and the
//! snapshotter, pulls, runs and removes a fourth image, and pauses the
//! registry. After every action each reader must complete a round. At the
//! end it prints rounds, errors, wrong bytes and what is left behind once
//! everything is removed (mounts, daemons, cached blobs, snapshot
//! directories), and requires zeros.
//!
//! CI runs it for `LODE_SOAK_SECS` (default 20) in each daemon mode;
//! `tests/bench/soak.sh` runs it longer. Root only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME as SNAPSHOTTER;
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{rounds, stack, wait_for_rounds, App, Stack};
use lode_tests::wait_until;

const NAMESPACE: &str = "soak";
/// How long the registry stays paused in a registry fault.
const REGISTRY_PAUSE: Duration = Duration::from_secs(1);

#[test]
fn soak_shared() {
    soak("shared");
}

#[test]
fn soak_dedicated() {
    soak("dedicated");
}

/// What the chaos loop did.
#[derive(Debug, Default)]
struct Chaos {
    daemon_kills: usize,
    snapshotter_kills: usize,
    image_cycles: usize,
    registry_pauses: usize,
}

/// What the readers saw.
#[derive(Debug, Default)]
struct Seen {
    rounds: usize,
    /// Rounds whose reads failed.
    errors: Vec<String>,
    /// Rounds that read other bytes than the file's.
    wrong: Vec<String>,
}

/// What is left once every container and image is gone.
#[derive(Debug, Default, PartialEq, Eq)]
struct Left {
    /// Images still served.
    instances: usize,
    daemons: usize,
    cached_files: usize,
    snapshot_dirs: usize,
}

fn soak(mode: &'static str) {
    let seconds: u64 = std::env::var("LODE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let Some(mut s) = stack(SnapshotterOptions {
        daemon_mode: mode,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let apps = [
        s.app.clone(),
        s.add_app("soak-b", 4 << 20, 31),
        s.add_app("soak-c", 4 << 20, 32),
    ];
    let cycled = s.add_app("soak-cycled", 1 << 20, 33);
    let mut logs = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        s.pull_lazily(NAMESPACE, &app.lode);
        logs.push(s.start_reader(NAMESPACE, app, &format!("reader-{i}")));
    }

    let started = Instant::now();
    let mut chaos = Chaos::default();
    let mut step = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        match step % 4 {
            0 => {
                let pids = s.snapshotter.daemon_pids();
                let pid = pids[step / 4 % pids.len()];
                kill9(pid);
                chaos.daemon_kills += 1;
                wait_until(Duration::from_secs(30), "a successor daemon", || {
                    !s.snapshotter.daemon_pids().contains(&pid)
                        && s.snapshotter.daemon_pids().len() == pids.len()
                })
                .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", s.logs()));
            }
            1 => {
                s.node
                    .snapshotter
                    .restart()
                    .expect("restart the snapshotter");
                chaos.snapshotter_kills += 1;
                // containerd redials a proxy that went away with a back-off.
                wait_until(
                    Duration::from_secs(60),
                    "containerd to reach the restarted snapshotter",
                    || {
                        s.containerd
                            .ctr(
                                NAMESPACE,
                                ["snapshots", "--snapshotter", SNAPSHOTTER, "usage"],
                            )
                            .is_ok_and(|r| r.success)
                    },
                )
                .unwrap_or_else(|e| panic!("[{mode}] {e}\n{}", s.logs()));
            }
            2 => {
                cycle_image(&s, &cycled, chaos.image_cycles);
                chaos.image_cycles += 1;
            }
            _ => {
                s.registry.pause().expect("pause docker-registry");
                std::thread::sleep(REGISTRY_PAUSE);
                s.registry.resume().expect("resume docker-registry");
                chaos.registry_pauses += 1;
                // The next rounds read through the daemons again.
                s.drop_cached_pages("data/big");
            }
        }
        for log in &logs {
            wait_for_rounds(log, 1);
        }
        step += 1;
    }
    let seen = seen(&logs, &apps);
    for i in 0..apps.len() {
        s.containerd
            .remove_container(NAMESPACE, &format!("reader-{i}"))
            .unwrap_or_else(|e| panic!("[{mode}] {e}"));
    }
    for app in &apps {
        s.remove_image(NAMESPACE, &app.lode);
    }
    // The shared daemon runs with the snapshotter, serving no image.
    let expected = Left {
        daemons: usize::from(mode == "shared"),
        ..Left::default()
    };
    let left = left_behind(&s, &expected);
    eprintln!(
        "[{mode}] soak of {:?}: {chaos:?}; readers: {} rounds, {} with errors, {} with wrong bytes; \
         left behind: {left:?}",
        started.elapsed(),
        seen.rounds,
        seen.errors.len(),
        seen.wrong.len()
    );
    assert!(
        seen.wrong.is_empty(),
        "[{mode}] wrong bytes: {:?}",
        seen.wrong
    );
    assert!(seen.errors.is_empty(), "[{mode}] errors: {:?}", seen.errors);
    assert_eq!(left, expected, "[{mode}] left behind\n{}", s.logs());
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Pulls the cycled image, runs a container of it that verifies its files,
/// and removes the image again.
fn cycle_image(s: &Stack, app: &App, n: usize) {
    s.pull_lazily(NAMESPACE, &app.lode);
    let run = s.try_run(
        NAMESPACE,
        &app.lode,
        &format!("cycled-{n}"),
        "cat /data/motd; sha256sum /data/big",
    );
    if !(run.stdout.contains(&app.motd) && run.stdout.contains(&app.big_sha256())) {
        let log = s.snapshotter.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "cycled image, run {n}: {:?} (exit {:?})\nstderr: {}\n\
             snapshotter log (newest first):\n{}\n{}",
            run.stdout,
            run.code,
            run.stderr,
            tail.join("\n"),
            s.snapshotter.daemon_problems(30),
        );
    }
    s.remove_image(NAMESPACE, &app.lode);
}

/// Rounds in the readers' logs, sorted into errors and wrong bytes: a
/// failed read leaves no digest, a wrong one another digest.
fn seen(logs: &[PathBuf], apps: &[App]) -> Seen {
    let mut seen = Seen::default();
    for (log, app) in logs.iter().zip(apps) {
        let (total, bad) = rounds(log);
        seen.rounds += total;
        for line in bad {
            let digest = line.split_whitespace().nth(2).unwrap_or("");
            let other_digest = digest.len() == 64 && digest != app.big_sha256();
            if other_digest {
                seen.wrong.push(line);
            } else {
                seen.errors.push(line);
            }
        }
    }
    seen
}

/// What the snapshotter still has once its images are gone, waiting a
/// while for it to get to `expected`.
fn left_behind(s: &Stack, expected: &Left) -> Left {
    let root = s.snapshotter.root();
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let measure = || Left {
        instances: s.instance_mounts().len(),
        daemons: s.snapshotter.daemon_pids().len(),
        cached_files: count(&root.join("cache")),
        snapshot_dirs: count(&root.join("snapshots")),
    };
    let _ = wait_until(Duration::from_secs(30), "the snapshotter to let go", || {
        measure() == *expected
    });
    measure()
}
