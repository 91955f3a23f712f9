//! A throw-away containerd (own root, state and gRPC socket in a temp dir)
//! with Lode registered as the proxy snapshotter `lode`; its CRI plugin is
//! off unless asked for ([`CriOptions`]), then with Lode as its snapshotter
//! as a Kubernetes node would run it.
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

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME;

use crate::lode::Run;
use crate::{wait_until, KitError};

pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
    /// Suffix of every namespace this instance's callers name: runc keeps
    /// container state under /run/containerd/runc/<namespace>/<id> whatever
    /// containerd's own state dir, so two instances must never share a
    /// namespace.
    suffix: String,
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

/// containerd's CRI plugin as kubelet's runtime: Lode as its snapshotter,
/// snapshot annotations on, no CNI (pods use the node's network).
#[derive(Clone, Debug)]
pub struct CriOptions {
    /// The pause image of every pod (`sandbox_image`).
    pub sandbox_image: String,
    /// The plugin's registry `config_path`: a `hosts.toml` per registry
    /// ([`write_hosts_toml`]), read at every pull.
    pub hosts_dir: PathBuf,
}

/// Writes `<hosts_dir>/<registry>/hosts.toml` as a node's administrator
/// would for a registry served over plain HTTP, with `mirrors` (`host:port`,
/// plain HTTP) tried before it, each sent `mirror_headers` (`header.NAME`).
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry: &str,
    mirrors: &[String],
    mirror_headers: &[(&str, &str)],
) -> Result<(), KitError> {
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).map_err(KitError::io(dir.display().to_string()))?;
    let mut hosts = format!("server = \"http://{registry}\"\n");
    for host in mirrors.iter().chain(std::iter::once(&registry.to_owned())) {
        hosts.push_str(&format!(
            "\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
        if host != registry {
            for (name, value) in mirror_headers {
                hosts.push_str(&format!("  header.{name} = {value:?}\n"));
            }
        }
    }
    let path = dir.join("hosts.toml");
    std::fs::write(&path, hosts).map_err(KitError::io(path.display().to_string()))
}

impl Containerd {
    /// Starts containerd without its CRI plugin; `lode_socket` registers
    /// the proxy snapshotter as [`DEFAULT_SNAPSHOTTER_NAME`].
    pub fn start(lode_socket: Option<&Path>) -> Result<Self, KitError> {
        Self::start_with(lode_socket, None)
    }

    /// Starts containerd; `lode_socket` registers the proxy snapshotter as
    /// [`DEFAULT_SNAPSHOTTER_NAME`], `cri` turns the CRI plugin on.
    pub fn start_with(
        lode_socket: Option<&Path>,
        cri: Option<&CriOptions>,
    ) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new()
            .prefix("lode-containerd-")
            .tempdir_in("/var/tmp")
            .map_err(KitError::io("containerd temp dir"))?;
        let socket = dir.path().join("containerd.sock");
        let disabled = if cri.is_some() {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\
             [grpc]\n  address = \"{socket}\"\n",
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            socket = socket.display(),
        );
        if let Some(cri) = cri {
            config.push_str(&cri_config(dir.path(), cri)?);
        }
        if let Some(lode) = lode_socket {
            config.push_str(&format!(
                "[proxy_plugins.{DEFAULT_SNAPSHOTTER_NAME}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
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
        let suffix = dir
            .path()
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "")
            })
            .unwrap_or_default()
            .to_lowercase();
        let containerd = Self {
            dir,
            child,
            socket,
            suffix,
        };
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

    /// The containerd namespace a test's `name` stands for (unique to this
    /// instance).
    pub fn namespace(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }

    /// `ctr --address SOCK -n NAMESPACE ARGS`, NAMESPACE being
    /// [`Containerd::namespace`] of `namespace`.
    pub fn ctr<I, S>(&self, namespace: &str, args: I) -> Result<Run, KitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.ctr_in(&self.namespace(namespace), args)
    }

    fn ctr_in<I, S>(&self, full_namespace: &str, args: I) -> Result<Run, KitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", full_namespace])
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

    /// Kills every task of the test namespace `name` and removes its containers.
    pub fn remove_containers(&self, name: &str) {
        self.remove_containers_in(&self.namespace(name));
    }

    /// Kills the task of container `id` in the test namespace `name` and
    /// removes the container.
    pub fn remove_container(&self, name: &str, id: &str) -> Result<(), KitError> {
        let namespace = self.namespace(name);
        self.remove_task_in(&namespace, id)?;
        let run = self.ctr_in(&namespace, ["containers", "rm", id])?;
        if !run.success {
            return Err(KitError::Command {
                what: format!("ctr containers rm {id}"),
                message: run.stderr.trim().to_owned(),
            });
        }
        Ok(())
    }

    fn remove_task_in(&self, namespace: &str, task: &str) -> Result<(), KitError> {
        let _ = self.ctr_in(namespace, ["tasks", "kill", "-s", "KILL", task]);
        wait_until(Duration::from_secs(10), "task to stop", || {
            self.ctr_in(namespace, ["tasks", "rm", task])
                .is_ok_and(|r| r.success)
                || self
                    .ctr_in(namespace, ["tasks", "ls", "-q"])
                    .is_ok_and(|r| r.success && !r.stdout.lines().any(|l| l == task))
        })
    }

    fn remove_containers_in(&self, namespace: &str) {
        let stdout = |args: &[&str]| {
            self.ctr_in(namespace, args)
                .ok()
                .filter(|r| r.success)
                .map(|r| r.stdout)
        };
        let Some(tasks) = stdout(&["tasks", "ls", "-q"]) else {
            return;
        };
        for task in tasks.lines().filter(|l| !l.is_empty()) {
            let _ = self.remove_task_in(namespace, task);
        }
        for container in stdout(&["containers", "ls", "-q"])
            .unwrap_or_default()
            .lines()
        {
            if !container.is_empty() {
                let _ = self.ctr_in(namespace, ["containers", "rm", container]);
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let namespaces = self
            .ctr_in("default", ["namespaces", "ls", "-q"])
            .map(|r| r.stdout)
            .unwrap_or_default();
        for namespace in namespaces.lines() {
            self.remove_containers_in(namespace);
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

/// The CRI plugin's section of containerd's configuration.
fn cri_config(dir: &Path, cri: &CriOptions) -> Result<String, KitError> {
    // An empty CNI configuration directory: pods use the node's network.
    let cni = dir.join("cni");
    std::fs::create_dir_all(&cni).map_err(KitError::io(cni.display().to_string()))?;
    let cri_plugin = "plugins.\"io.containerd.grpc.v1.cri\"";
    // restrict_oom_score_adj: these test machines refuse any negative
    // oom_score_adj, even to root, and CRI gives pause containers -998.
    Ok(format!(
        "[{cri_plugin}]\n  sandbox_image = \"{sandbox}\"\n  restrict_oom_score_adj = true\n\
         [{cri_plugin}.containerd]\n  snapshotter = \"{DEFAULT_SNAPSHOTTER_NAME}\"\n\
         \x20 disable_snapshot_annotations = false\n\
         [{cri_plugin}.cni]\n  conf_dir = \"{cni}\"\n\
         [{cri_plugin}.registry]\n  config_path = \"{hosts}\"\n",
        sandbox = cri.sandbox_image,
        cni = cni.display(),
        hosts = cri.hosts_dir.display(),
    ))
}

/// Pushes a runnable image to `registry` as `<repository>:v1`: busybox (from
/// the host's static busybox) plus `extra` entries. Returns its reference.
pub fn push_busybox_image(
    registry: &crate::Registry,
    repository: &str,
    extra: Vec<crate::TarEntry>,
) -> Result<lode_common::registry::Reference, KitError> {
    push_busybox(registry, repository, extra, ["/bin/sh"])
}

/// Pushes a pod's pause image to `registry` as `pause:v1`: busybox sleeping
/// until it is killed.
pub fn push_pause_image(
    registry: &crate::Registry,
) -> Result<lode_common::registry::Reference, KitError> {
    push_busybox(registry, "pause", Vec::new(), ["/bin/sleep", "2147483647"])
}

fn push_busybox<const N: usize>(
    registry: &crate::Registry,
    repository: &str,
    extra: Vec<crate::TarEntry>,
    cmd: [&str; N],
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
        .cmd(cmd)
        .write(layout.path(), "v1")?;
    let reference = registry.reference(&format!("{repository}:v1"));
    crate::skopeo_copy_with_creds(&image.layout_dir, "v1", &reference, registry.credentials())?;
    Ok(reference)
}
