//! A daemon that hangs (SIGSTOP: alive, holding its mount, answering
//! nothing) with real components (docker-registry, containerd 1.6,
//! lode-snapshotter, lode-fsd), in both daemon modes, with the default
//! deadlines: containers of another image start and run meanwhile, delayed
//! by at most the call deadline (shared mode, where both images have the
//! same daemon) or not at all (dedicated mode); the hung daemon is killed
//! and replaced, and the reader of its image goes on without an error.
//! Root only.

use std::time::{Duration, Instant};

use lode_tests::lode::process_alive;
use lode_tests::snapshotter::SnapshotterOptions;
use lode_tests::stack::{rounds, scrape, stack, wait_for_rounds};
use lode_tests::wait_until;

/// The snapshotter's default `daemon.call_timeout_secs`.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// The snapshotter's default `daemon.health_interval_secs`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// What a pull and a short container take here at most when nothing hangs,
/// with room for a slow machine.
const NORMAL_START: Duration = Duration::from_secs(4);

#[test]
fn hung_shared_daemon_is_replaced_and_other_images_start_meanwhile() {
    hung_daemon("shared");
}

#[test]
fn hung_dedicated_daemon_is_replaced_and_other_images_start_meanwhile() {
    hung_daemon("dedicated");
}

fn hung_daemon(mode: &'static str) {
    let Some(s) = stack(SnapshotterOptions {
        daemon_mode: mode,
        ..SnapshotterOptions::default()
    }) else {
        return;
    };
    let a = s.app.clone();
    let b = s.add_app("beside-hung", 2 << 20, 21);
    s.pull_lazily("lazy", &a.lode);
    let log_a = s.start_reader("lazy", &a, "reader-a");
    let [hung] = s.snapshotter.daemon_pids()[..] else {
        panic!("one daemon: {:?}", s.snapshotter.daemon_pids());
    };
    let stopped = Instant::now();
    signal(hung, nix::sys::signal::Signal::SIGSTOP);

    s.pull_lazily("lazy", &b.lode);
    let run = s.try_run(
        "lazy",
        &b.lode,
        "b-beside",
        "cat /data/motd; sha256sum /data/big",
    );
    let b_took = stopped.elapsed();
    assert!(run.success, "{mode}: {}\n{}", run.stderr, s.logs());
    assert!(
        run.stdout.contains(&b.motd) && run.stdout.contains(&b.big_sha256()),
        "{mode}: {}",
        run.stdout
    );
    let bound = match mode {
        // B's daemon is its own: the hung one is nothing to it.
        "dedicated" => NORMAL_START,
        // B's mount waits for the hung daemon's deadline, then for its
        // successor.
        _ => CALL_DEADLINE + NORMAL_START + Duration::from_secs(3),
    };
    eprintln!("{mode}: B pulled and ran in {b_took:?} next to a hung daemon (bound {bound:?})");
    assert!(
        b_took <= bound,
        "{mode}: B took {b_took:?} next to a hung daemon, more than {bound:?}\n{}",
        s.logs()
    );

    // Found by a call or by the health probe, killed, replaced.
    let replaced_within = HEALTH_INTERVAL + CALL_DEADLINE + Duration::from_secs(10);
    wait_until(
        replaced_within,
        "the hung daemon killed and replaced",
        || !process_alive(hung as i32) && s.snapshotter.log().contains("did not answer in time"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{mode}: {e} ({:?} after SIGSTOP)\n{}",
            stopped.elapsed(),
            s.logs()
        )
    });
    eprintln!(
        "{mode}: hung daemon gone {:?} after SIGSTOP",
        stopped.elapsed()
    );
    wait_for_rounds(&log_a, 2);
    let (total, errors) = rounds(&log_a);
    assert!(
        errors.is_empty(),
        "{mode}: A's reader: {errors:?}\n{}",
        s.logs()
    );
    eprintln!("{mode}: A's reader: {total} verified rounds, 0 errors");
    let pids = s.snapshotter.daemon_pids();
    let expected = if mode == "dedicated" { 2 } else { 1 };
    assert!(
        pids.len() == expected && !pids.contains(&hung),
        "{mode}: daemons {pids:?}, hung {hung}"
    );
    let metrics = scrape(&s.snapshotter.metrics_url().expect("metrics endpoint"));
    assert!(
        metrics.contains("lode_snapshotter_daemon_hangs_total 1")
            && metrics.contains("lode_snapshotter_daemon_recoveries_total{how=\"failover\"} 1"),
        "{mode}: {metrics}"
    );
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}
