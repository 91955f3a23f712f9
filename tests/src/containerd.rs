//! A throw-away containerd (own root, state and gRPC socket in a temp dir,
//! the CRI plugin off) with Lode registered as the proxy snapshotter `lode`.
//!
//! Traps of containerd 1.6 that tests must respect:
//! - `ctr snapshots ls` answers from containerd's own database, even while
//!   the proxy snapshotter is down; probe the snapshotter itself instead.
//! - Content is shared across namespaces: before a cold measurement remove
//!   the image in every namespace (`ctr image rm --sync`).
//! - `ctr image pull` downloads every layer before unpacking; lazy pulls go
//!   through `lodectl pull`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::lode::Run;
use crate::{wait_until, KitError};

pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
}

/// Whether containerd, ctr and runc are installed.
pub fn containerd_available() -> bool {
    ["containerd", "ctr", "runc"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

impl Containerd {
    /// Starts containerd; `lode_socket` registers the `lode` proxy snapshotter.
    pub fn start(lode_socket: Option<&Path>) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new()
            .prefix("lode-containerd-")
            .tempdir_in("/var/tmp")
            .map_err(KitError::io("containerd temp dir"))?;
        let socket = dir.path().join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{socket}\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            socket = socket.display(),
        );
        if let Some(lode) = lode_socket {
            config.push_str(&format!(
                "[proxy_plugins.lode]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                lode.display()
            ));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).map_err(KitError::io("write containerd config"))?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))
            .map_err(KitError::io("containerd log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(KitError::io("containerd log"))?)
            .stderr(log)
            .spawn()
            .map_err(KitError::io("start containerd"))?;
        let containerd = Self { dir, child, socket };
        wait_until(Duration::from_secs(30), "containerd to answer", || {
            containerd
                .ctr("default", ["version"])
                .is_ok_and(|r| r.success)
        })?;
        Ok(containerd)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ctr --address SOCK -n NAMESPACE ARGS`.
    pub fn ctr<I, S>(&self, namespace: &str, args: I) -> Result<Run, KitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(KitError::io("run ctr"))?;
        Ok(output.into())
    }

    /// Like [`Containerd::ctr`], failing on a non-zero exit; returns stdout.
    pub fn ctr_ok<I, S>(&self, namespace: &str, args: I) -> Result<String, KitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let run = self.ctr(namespace, &args)?;
        if !run.success {
            return Err(KitError::Command {
                what: format!("ctr {args:?}"),
                message: format!("exit {:?}: {}{}", run.code, run.stdout, run.stderr.trim()),
            });
        }
        Ok(run.stdout)
    }

    /// Kills every task of `namespace` and removes its containers.
    pub fn remove_containers(&self, namespace: &str) {
        let Ok(tasks) = self.ctr_ok(namespace, ["tasks", "ls", "-q"]) else {
            return;
        };
        for task in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = self.ctr(namespace, ["tasks", "kill", "-s", "KILL", task]);
            let _ = wait_until(Duration::from_secs(10), "task to stop", || {
                self.ctr(namespace, ["tasks", "rm", task])
                    .is_ok_and(|r| r.success)
                    || self
                        .ctr_ok(namespace, ["tasks", "ls", "-q"])
                        .is_ok_and(|t| !t.lines().any(|l| l == task))
            });
        }
        if let Ok(containers) = self.ctr_ok(namespace, ["containers", "ls", "-q"]) {
            for container in containers.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(namespace, ["containers", "rm", container]);
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for namespace in self
            .ctr_ok("default", ["namespaces", "ls", "-q"])
            .unwrap_or_default()
            .lines()
        {
            self.remove_containers(namespace);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // Shims and container mounts under our root outlive containerd.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("containerd-shim.*{}", self.socket.display()),
            ])
            .status();
        crate::mounts::detach_below(self.dir.path());
    }
}

/// Pushes a runnable image to `registry` as `<repository>:v1`: busybox (from
/// the host's static busybox) plus `extra` entries. Returns its reference.
pub fn push_busybox_image(
    registry: &crate::Registry,
    repository: &str,
    extra: Vec<crate::TarEntry>,
) -> Result<lode_common::registry::Reference, KitError> {
    let busybox = std::fs::read("/bin/busybox").map_err(KitError::io("read /bin/busybox"))?;
    let mut entries = vec![
        crate::TarEntry::dir("bin"),
        crate::TarEntry::dir("etc"),
        crate::TarEntry::dir("tmp").mode(0o1777),
        crate::TarEntry::file("bin/busybox", busybox).mode(0o755),
    ];
    for applet in [
        "sh",
        "cat",
        "ls",
        "sha256sum",
        "head",
        "wc",
        "sleep",
        "echo",
        "test",
    ] {
        entries.push(crate::TarEntry::symlink(format!("bin/{applet}"), "busybox"));
    }
    let layout = tempfile::tempdir().map_err(KitError::io("layout dir"))?;
    let image = crate::OciLayoutBuilder::new()
        .layer(crate::Layer::gzip(entries))
        .layer(crate::Layer::gzip(extra))
        .cmd(["/bin/sh"])
        .write(layout.path(), "v1")?;
    let reference = registry.reference(&format!("{repository}:v1"));
    crate::skopeo_copy(&image.layout_dir, "v1", &reference)?;
    Ok(reference)
}
