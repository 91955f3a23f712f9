//! Starting `lode-snapshotter` for tests: its own root, socket and config in
//! a temp dir; killed (-9) and restarted on demand; on drop it and the
//! daemons it started are stopped and their mounts detached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::lode::LODE_FSD;
use crate::{bin_path, wait_until, KitError};

pub const LODE_SNAPSHOTTER: &str = "lode-snapshotter";
const CRI_SOCKET: &str = "cri.sock";
const CONTAINERD_LINK: &str = "containerd.sock";

/// Settings that vary between tests.
#[derive(Clone, Debug)]
pub struct SnapshotterOptions {
    /// `shared` or `dedicated`.
    pub daemon_mode: &'static str,
    /// `none`, `restart` or `failover`.
    pub recover_policy: &'static str,
    /// A lode-fsd configuration file for every daemon (`[daemon] config`).
    pub fsd_config: Option<PathBuf>,
    /// Serve the CRI image service proxy on [`Snapshotter::cri_socket`],
    /// forwarding to containerd ([`Snapshotter::link_containerd`]).
    pub cri_proxy: bool,
    /// containerd's registry hosts directory (`[registry] config_path`).
    pub registry_config_path: Option<PathBuf>,
    /// `[cache] size_limit_bytes` (0: unbounded) and `check_interval_secs`
    /// (`None`: the default).
    pub cache_size_limit_bytes: u64,
    pub cache_check_interval_secs: Option<u64>,
    /// Puts the root on a tmpfs of this size (`8m`), so that a test can
    /// fill its disk.
    pub root_tmpfs_size: Option<&'static str>,
    /// `[daemon] ahead_wait_secs` (`None`: the default).
    pub ahead_wait_secs: Option<u64>,
}

impl Default for SnapshotterOptions {
    fn default() -> Self {
        Self {
            daemon_mode: "shared",
            recover_policy: "failover",
            fsd_config: None,
            cri_proxy: false,
            registry_config_path: None,
            cache_size_limit_bytes: 0,
            cache_check_interval_secs: None,
            root_tmpfs_size: None,
            ahead_wait_secs: None,
        }
    }
}

pub struct Snapshotter {
    dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Snapshotter {
    /// Whether the snapshotter and fsd binaries are built.
    pub fn available() -> bool {
        bin_path(LODE_SNAPSHOTTER).is_some() && bin_path(LODE_FSD).is_some()
    }

    pub fn start(options: &SnapshotterOptions) -> Result<Self, KitError> {
        let binary = bin_path(LODE_SNAPSHOTTER)
            .ok_or_else(|| KitError::Invalid("lode-snapshotter is not built".into()))?;
        let fsd =
            bin_path(LODE_FSD).ok_or_else(|| KitError::Invalid("lode-fsd is not built".into()))?;
        let dir = tempfile::Builder::new()
            .prefix("lode-snapshotter-")
            .tempdir_in("/var/tmp")
            .map_err(KitError::io("snapshotter temp dir"))?;
        if let Some(size) = options.root_tmpfs_size {
            let root = dir.path().join("root");
            std::fs::create_dir(&root).map_err(KitError::io("snapshotter root"))?;
            nix::mount::mount(
                Some("tmpfs"),
                &root,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={size},mode=0700").as_str()),
            )
            .map_err(|e| KitError::Invalid(format!("mount a tmpfs at {}: {e}", root.display())))?;
        }
        let mut fsd_config = options
            .fsd_config
            .as_ref()
            .map(|c| format!("config = \"{}\"\n", c.display()))
            .unwrap_or_default();
        if let Some(wait) = options.ahead_wait_secs {
            fsd_config.push_str(&format!("ahead_wait_secs = {wait}\n"));
        }
        let hosts = options
            .registry_config_path
            .as_ref()
            .map(|dir| format!("[registry]\nconfig_path = \"{}\"\n", dir.display()))
            .unwrap_or_default();
        let cri = if options.cri_proxy {
            format!(
                "[cri]\nimage_service_address = \"{}\"\n",
                dir.path().join(CRI_SOCKET).display(),
            )
        } else {
            String::new()
        };
        let mut cache = format!(
            "[cache]\nsize_limit_bytes = {}\n",
            options.cache_size_limit_bytes
        );
        if let Some(interval) = options.cache_check_interval_secs {
            cache.push_str(&format!("check_interval_secs = {interval}\n"));
        }
        let config = format!(
            "root = \"{root}\"\naddress = \"{socket}\"\ncontainerd_address = \"{containerd}\"\n\
             daemon_mode = \"{mode}\"\nrecover_policy = \"{policy}\"\n[daemon]\nbinary = \"{fsd}\"\n{fsd_config}\
             [metrics]\naddress = \"127.0.0.1:0\"\n{cri}{hosts}{cache}",
            root = dir.path().join("root").display(),
            socket = dir.path().join("lode.sock").display(),
            containerd = dir.path().join(CONTAINERD_LINK).display(),
            mode = options.daemon_mode,
            policy = options.recover_policy,
            fsd = fsd.display(),
        );
        std::fs::write(dir.path().join("config.toml"), config)
            .map_err(KitError::io("write snapshotter config"))?;
        let mut snapshotter = Self {
            dir,
            binary,
            child: None,
            starts: 0,
        };
        snapshotter.launch()?;
        Ok(snapshotter)
    }

    fn launch(&mut self) -> Result<(), KitError> {
        let _ = std::fs::remove_file(self.socket());
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(KitError::io("snapshotter log"))?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(self.config_path())
            .arg("--stop-daemons-on-exit")
            .env("RUST_LOG", "info,h2=warn,tower=warn,hyper=warn")
            // No docker config: registry credentials come only from what
            // a test configures (never the machine's own).
            .env("DOCKER_CONFIG", self.dir.path().join("no-docker-config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(KitError::io("snapshotter log"))?)
            .stderr(log)
            .spawn()
            .map_err(KitError::io("start lode-snapshotter"))?;
        self.child = Some(child);
        let socket = self.socket();
        let starts = self.starts;
        let log_path = self.log_path();
        wait_until(Duration::from_secs(30), "lode-snapshotter to serve", || {
            socket.exists()
                && std::fs::read_to_string(&log_path)
                    .is_ok_and(|log| log.matches("lode-snapshotter serving").count() >= starts)
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lode.sock")
    }

    /// The configuration file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The snapshotter's `root` (store, snapshots, mounts, daemons).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("snapshotter.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The Prometheus endpoint of the running process.
    pub fn metrics_url(&self) -> Option<String> {
        let log = self.log();
        let start = log.rfind("Prometheus metrics at ")? + "Prometheus metrics at ".len();
        log[start..].split_whitespace().next().map(str::to_owned)
    }

    /// The CRI image service proxy's socket ([`SnapshotterOptions::cri_proxy`]).
    pub fn cri_socket(&self) -> PathBuf {
        self.dir.path().join(CRI_SOCKET)
    }

    /// Points the snapshotter's `containerd_address` at containerd's socket
    /// (started after the snapshotter, so its path is known only then); the
    /// snapshotter connects at its first use.
    pub fn link_containerd(&self, containerd_socket: &Path) -> Result<(), KitError> {
        std::os::unix::fs::symlink(containerd_socket, self.dir.path().join(CONTAINERD_LINK))
            .map_err(KitError::io("link containerd's socket"))
    }

    /// Every file under the snapshotter's directory (config, store,
    /// bootstraps, daemon records and logs, its own log), sockets aside.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => dirs.push(entry.path()),
                    Ok(t) if t.is_file() => found.push(entry.path()),
                    _ => {}
                }
            }
        }
        found
    }

    /// Overwrites the first record of every table of the stopped
    /// snapshotter's metadata store that holds records (snapshots, images,
    /// daemons, instances) with bytes that do not decode; returns each
    /// table and key.
    pub fn damage_one_record_per_table(&self) -> Result<Vec<(String, String)>, KitError> {
        use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition, TableHandle as _};
        let path = self.root().join("metadata.redb");
        let failed = |e: &dyn std::fmt::Display| KitError::Command {
            what: format!("damage {}", path.display()),
            message: e.to_string(),
        };
        let db = redb::Database::open(&path).map_err(|e| failed(&e))?;
        let names: Vec<String> = db
            .begin_read()
            .map_err(|e| failed(&e))?
            .list_tables()
            .map_err(|e| failed(&e))?
            .map(|t| t.name().to_owned())
            .collect();
        let txn = db.begin_write().map_err(|e| failed(&e))?;
        let mut damaged = Vec::new();
        for name in names {
            // Counters (u64 values) do not open as records: skipped.
            let Ok(mut table) = txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) else {
                continue;
            };
            let first = table
                .iter()
                .map_err(|e| failed(&e))?
                .next()
                .transpose()
                .map_err(|e| failed(&e))?
                .map(|(key, _)| key.value().to_owned());
            if let Some(key) = first {
                table
                    .insert(key.as_str(), &b"\xff\x00 damaged"[..])
                    .map_err(|e| failed(&e))?;
                damaged.push((name, key));
            }
        }
        txn.commit().map_err(|e| failed(&e))?;
        Ok(damaged)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash: daemons keep running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the snapshotter again on the same root.
    pub fn restart(&mut self) -> Result<(), KitError> {
        self.kill9();
        self.launch()
    }

    /// Pids of live `lode-fsd` processes serving below this root.
    pub fn daemon_pids(&self) -> Vec<u32> {
        daemon_pids_under(&self.root())
    }

    /// Where a daemon's log is.
    pub fn daemon_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.root().join("daemons").join(format!("{id}.log")))
            .unwrap_or_default()
    }

    /// The warnings and errors of every daemon's log, the last `lines` of
    /// each, for a failure message.
    pub fn daemon_problems(&self, lines: usize) -> String {
        let mut out = String::new();
        let dir = self.root().join("daemons");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let problems: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let tail = &problems[problems.len().saturating_sub(lines)..];
            out.push_str(&format!("== {}\n{}\n", path.display(), tail.join("\n")));
        }
        out
    }
}

/// Live `lode-fsd` processes whose command line names `root`.
pub fn daemon_pids_under(root: &Path) -> Vec<u32> {
    let needle = root.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            crate::lode::process_alive(*pid as i32)
                && cmdline.contains("lode-fsd")
                && cmdline.contains(&needle)
        })
        .collect()
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A clean stop stops the daemons and unmounts their images.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        for pid in self.daemon_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        crate::mounts::detach_below(self.dir.path());
    }
}
