//! Polling, skipping and locating workspace binaries.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::KitError;

/// Profile directories a workspace binary may be built into.
const PROFILES: [&str; 2] = ["debug", "release"];

/// Finds the workspace binary `name` (e.g. `lode-fsd`) next to the running
/// test executable (`target/<profile>/deps/<test>` → `target/<profile>/`),
/// falling back to the other profile's directory.
pub fn bin_path(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent()?
    } else {
        deps
    };
    let candidate = profile_dir.join(name);
    if is_executable(&candidate) {
        return Some(candidate);
    }
    let target_dir = profile_dir.parent()?;
    PROFILES
        .iter()
        .map(|profile| target_dir.join(profile).join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Polls `condition` (quickly at first, then every 50 ms) until it holds or
/// `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<(), KitError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KitError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Returns `condition`; when false, reports that the current test is skipped
/// and why. Written to the real stderr so it shows despite output capture.
pub fn skip_unless(condition: bool, reason: &str) -> bool {
    if !condition {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("test");
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    }
    condition
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `skip_unless(is_root(), ...)`.
pub fn require_root() -> bool {
    skip_unless(is_root(), "needs root")
}

/// Whether `/dev/fuse` exists and can be opened.
pub fn fuse_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), "third call", || {
            calls += 1;
            calls == 3
        })
        .unwrap();
        assert_eq!(calls, 3);
    }

    #[test]
    fn wait_until_times_out_naming_what_it_waited_for() {
        let start = Instant::now();
        let err = wait_until(Duration::from_millis(100), "nothing", || false).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(err.to_string().contains("nothing"), "{err}");
    }

    #[test]
    fn skip_unless_passes_the_condition_through() {
        assert!(skip_unless(true, "unused"));
        assert!(!skip_unless(
            false,
            "(not a real skip: unit test of skip_unless)"
        ));
    }

    #[test]
    fn bin_path_finds_only_executables() {
        assert_eq!(bin_path("lode-no-such-binary"), None);
        // The test executable's own directory layout is what bin_path relies on.
        let exe = std::env::current_exe().unwrap();
        assert!(exe.parent().unwrap().ends_with("deps"), "{}", exe.display());
    }
}
