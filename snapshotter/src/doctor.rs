//! Checks of a node's set-up for Lode (`lodectl doctor`): containerd's
//! configuration, the sockets, the kernel. Each finding says what is wrong
//! and what to change.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lode_common::contract::DEFAULT_SNAPSHOTTER_NAME;

/// containerd's CRI plugin, by the name its configuration uses.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// The first kernel whose FUSE can ask a daemon's successor to resend the
/// requests the dead daemon had read (FUSE_NOTIFY_RESEND).
const RESEND_KERNEL: (u32, u32) = (6, 9);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// What was checked, e.g. `containerd: proxy plugin`.
    pub check: &'static str,
    pub message: String,
    /// What to change, for warnings and failures.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Self {
            level: Level::Ok,
            check,
            message: message.into(),
            fix: None,
        }
    }

    pub fn bad(level: Level, check: &'static str, message: impl Into<String>, fix: String) -> Self {
        Self {
            level,
            check,
            message: message.into(),
            fix: Some(fix),
        }
    }
}

/// The proxy plugin block containerd needs for a snapshotter at `address`.
fn proxy_block(address: &Path) -> String {
    format!(
        "[proxy_plugins.{DEFAULT_SNAPSHOTTER_NAME}]\n  type = \"snapshot\"\n  address = \"{}\"",
        address.display()
    )
}

/// Checks containerd's configuration `text` (read from `path`) for a Lode
/// snapshotter listening on `address`.
pub fn containerd_config(text: &str, path: &Path, address: &Path) -> Vec<Finding> {
    const CHECK: &str = "containerd config";
    let config: toml::Table = match text.parse() {
        Ok(config) => config,
        Err(e) => {
            return vec![Finding::bad(
                Level::Fail,
                CHECK,
                format!("{} is not valid TOML: {e}", path.display()),
                "fix the file; containerd cannot start with it either".into(),
            )]
        }
    };
    let mut findings = Vec::new();
    if config.get("version").and_then(toml::Value::as_integer) != Some(2) {
        findings.push(Finding::bad(
            Level::Fail,
            CHECK,
            format!("{} is not a version 2 configuration", path.display()),
            "add `version = 2` at the top (containerd 1.6 reads the sections below only then)"
                .into(),
        ));
    }
    findings.push(proxy_plugin(&config, address));
    findings.extend(cri(&config));
    findings
}

fn proxy_plugin(config: &toml::Table, address: &Path) -> Finding {
    const CHECK: &str = "containerd: proxy plugin";
    let fix = || {
        format!(
            "add to containerd's config and restart containerd:\n{}",
            proxy_block(address)
        )
    };
    let Some(plugin) = config
        .get("proxy_plugins")
        .and_then(|p| p.get(DEFAULT_SNAPSHOTTER_NAME))
    else {
        return Finding::bad(
            Level::Fail,
            CHECK,
            format!("no [proxy_plugins.{DEFAULT_SNAPSHOTTER_NAME}]: containerd does not know the snapshotter"),
            fix(),
        );
    };
    let kind = plugin.get("type").and_then(toml::Value::as_str);
    let configured = plugin.get("address").and_then(toml::Value::as_str);
    if kind != Some("snapshot") {
        return Finding::bad(
            Level::Fail,
            CHECK,
            format!(
                "[proxy_plugins.{DEFAULT_SNAPSHOTTER_NAME}] has type {kind:?}, not \"snapshot\""
            ),
            fix(),
        );
    }
    if configured.map(Path::new) != Some(address) {
        return Finding::bad(
            Level::Fail,
            CHECK,
            format!(
                "[proxy_plugins.{DEFAULT_SNAPSHOTTER_NAME}] points at {configured:?}, the snapshotter listens on {}",
                address.display()
            ),
            fix(),
        );
    }
    Finding::ok(
        CHECK,
        format!(
            "snapshotter {DEFAULT_SNAPSHOTTER_NAME:?} at {}",
            address.display()
        ),
    )
}

/// The CRI plugin: disabled (fine without Kubernetes), or using Lode with
/// the image labels passed on.
fn cri(config: &toml::Table) -> Vec<Finding> {
    const CHECK: &str = "containerd: CRI (Kubernetes)";
    let disabled = config
        .get("disabled_plugins")
        .and_then(toml::Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .filter_map(toml::Value::as_str)
                .any(|p| p == CRI_PLUGIN || p == "cri")
        });
    if disabled {
        return vec![Finding::bad(
            Level::Warn,
            CHECK,
            "the CRI plugin is disabled: fine with ctr and lodectl pull, but kubelet cannot run pods",
            format!("remove \"{CRI_PLUGIN}\" from disabled_plugins for Kubernetes"),
        )];
    }
    let section = format!("[plugins.\"{CRI_PLUGIN}\".containerd]");
    let containerd = config
        .get("plugins")
        .and_then(|p| p.get(CRI_PLUGIN))
        .and_then(|c| c.get("containerd"));
    let setting = |key: &str| containerd.and_then(|c| c.get(key));
    let mut findings = Vec::new();
    match setting("snapshotter").and_then(toml::Value::as_str) {
        Some(DEFAULT_SNAPSHOTTER_NAME) => findings.push(Finding::ok(
            CHECK,
            format!("pods use the {DEFAULT_SNAPSHOTTER_NAME:?} snapshotter"),
        )),
        other => findings.push(Finding::bad(
            Level::Warn,
            CHECK,
            format!(
                "pods use the {} snapshotter, so Kubernetes does not start them with Lode",
                other.unwrap_or("default (overlayfs)")
            ),
            format!("set snapshotter = \"{DEFAULT_SNAPSHOTTER_NAME}\" under {section} and restart containerd"),
        )),
    }
    // containerd 1.6 leaves the annotations off unless told otherwise.
    match setting("disable_snapshot_annotations").and_then(toml::Value::as_bool) {
        Some(false) => findings.push(Finding::ok(
            CHECK,
            "image labels reach the snapshotter (disable_snapshot_annotations = false)",
        )),
        value => findings.push(Finding::bad(
            Level::Fail,
            CHECK,
            format!(
                "CRI does not pass image labels to snapshotters (disable_snapshot_annotations is {}): \
                 Lode cannot tell its layers, and pulling a Lode image fails with \"failed to get \
                 stream processor for application/vnd.oci.image.layer.v1.lode.blob\"",
                value.map_or("unset, and true by default in containerd 1.6".to_owned(), |v| v.to_string())
            ),
            format!("set disable_snapshot_annotations = false under {section} and restart containerd"),
        )),
    }
    findings
}

/// Whether Lode reads the registry hosts containerd's CRI plugin reads
/// (`registry.config_path`), so that mirrors are described once; `None`
/// when containerd names none (or its configuration does not parse, which
/// [`containerd_config`] reports).
pub fn registry_hosts(containerd: &str, lode: Option<&Path>) -> Option<Finding> {
    const CHECK: &str = "registry hosts";
    let config: toml::Table = containerd.parse().ok()?;
    let theirs = config
        .get("plugins")?
        .get(CRI_PLUGIN)?
        .get("registry")?
        .get("config_path")?
        .as_str()
        .filter(|p| !p.is_empty())?;
    let fix = format!(
        "set config_path = \"{theirs}\" under [registry] in the snapshotter's configuration"
    );
    Some(match lode {
        Some(ours) if ours == Path::new(theirs) => Finding::ok(
            CHECK,
            format!("containerd and Lode read the hosts.toml files under {theirs}"),
        ),
        Some(ours) => Finding::bad(
            Level::Warn,
            CHECK,
            format!(
                "containerd reads registry hosts under {theirs}, Lode under {}: their mirrors differ",
                ours.display()
            ),
            fix,
        ),
        None => Finding::bad(
            Level::Warn,
            CHECK,
            format!(
                "containerd reads registry hosts (mirrors) under {theirs}, Lode does not: \
                 Lode's reads go to each registry directly"
            ),
            fix,
        ),
    })
}

/// Whether a unix socket at `path` accepts connections; `private` also
/// wants it readable and writable by its owner only.
pub fn socket(check: &'static str, path: &Path, private: bool, fix: &str) -> Finding {
    if let Err(e) = std::os::unix::net::UnixStream::connect(path) {
        return Finding::bad(
            Level::Fail,
            check,
            format!("cannot connect to {}: {e}", path.display()),
            fix.to_owned(),
        );
    }
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
    match mode {
        Ok(mode) if private && mode & 0o077 != 0 => Finding::bad(
            Level::Warn,
            check,
            format!(
                "{} has mode {mode:o}: other users can reach it",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        ),
        _ => Finding::ok(check, format!("{} answers", path.display())),
    }
}

/// FUSE on this kernel: the device, and whether a daemon's successor can
/// have the requests it lost resent (`recover_policy = "failover"`).
pub fn kernel(release: &str, dev_fuse: bool) -> Vec<Finding> {
    const CHECK: &str = "kernel: FUSE";
    let mut findings = vec![if dev_fuse {
        Finding::ok(CHECK, "/dev/fuse present")
    } else {
        Finding::bad(
            Level::Fail,
            CHECK,
            "no /dev/fuse",
            "load the fuse module (modprobe fuse) or give the snapshotter's container /dev/fuse"
                .into(),
        )
    }];
    let version = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = {
        let mut parts = version.take(2);
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    };
    findings.push(if (major, minor) >= RESEND_KERNEL {
        Finding::ok(CHECK, format!("kernel {release} resends lost requests to a daemon's successor"))
    } else {
        Finding::bad(
            Level::Warn,
            CHECK,
            format!(
                "kernel {release} predates FUSE_NOTIFY_RESEND ({}.{}): with recover_policy = \"failover\", \
                 reads a daemon had taken when it died stay unanswered",
                RESEND_KERNEL.0, RESEND_KERNEL.1
            ),
            "use kernel 6.9 or later, or recover_policy = \"restart\"".into(),
        )
    });
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../misc/containerd-config.toml");

    fn levels(findings: &[Finding]) -> Vec<(Level, &str)> {
        findings.iter().map(|f| (f.level, f.check)).collect()
    }

    #[test]
    fn the_shipped_containerd_config_passes() {
        let found = containerd_config(
            SAMPLE,
            Path::new("c.toml"),
            Path::new("/run/lode/snapshotter.sock"),
        );
        assert!(found.iter().all(|f| f.level == Level::Ok), "{found:#?}");
        assert_eq!(found.len(), 3);
    }

    #[test]
    fn annotations_left_off_fail_and_name_the_fix() {
        for text in [
            SAMPLE.replace("disable_snapshot_annotations = false", ""),
            SAMPLE.replace(
                "disable_snapshot_annotations = false",
                "disable_snapshot_annotations = true",
            ),
        ] {
            let found = containerd_config(
                &text,
                Path::new("c.toml"),
                Path::new("/run/lode/snapshotter.sock"),
            );
            let fail: Vec<_> = found.iter().filter(|f| f.level == Level::Fail).collect();
            assert_eq!(fail.len(), 1, "{found:#?}");
            assert!(
                fail[0].message.contains("stream processor"),
                "{}",
                fail[0].message
            );
            assert!(
                fail[0].fix.as_deref().unwrap().contains(
                    "set disable_snapshot_annotations = false under [plugins.\"io.containerd.grpc.v1.cri\".containerd]"
                ),
                "{:?}",
                fail[0].fix
            );
        }
    }

    #[test]
    fn a_missing_or_misdirected_proxy_plugin_fails() {
        let address = Path::new("/run/lode/snapshotter.sock");
        let without = "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
        let found = containerd_config(without, Path::new("c.toml"), address);
        assert_eq!(
            levels(&found),
            [
                (Level::Fail, "containerd: proxy plugin"),
                (Level::Warn, "containerd: CRI (Kubernetes)")
            ]
        );
        assert!(found[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("address = \"/run/lode/snapshotter.sock\""));
        let elsewhere = containerd_config(SAMPLE, Path::new("c.toml"), Path::new("/other.sock"));
        assert_eq!(elsewhere[0].level, Level::Fail);
        assert!(
            elsewhere[0].message.contains("/other.sock"),
            "{}",
            elsewhere[0].message
        );
        let old = containerd_config(
            &SAMPLE.replace("version = 2", ""),
            Path::new("c.toml"),
            address,
        );
        assert_eq!(old[0].level, Level::Fail);
        let broken = containerd_config("[proxy_plugins", Path::new("c.toml"), address);
        assert_eq!(levels(&broken), [(Level::Fail, "containerd config")]);
    }

    #[test]
    fn pods_on_another_snapshotter_warn() {
        let text = SAMPLE.replace("snapshotter = \"lode\"", "snapshotter = \"overlayfs\"");
        let found = containerd_config(
            &text,
            Path::new("c.toml"),
            Path::new("/run/lode/snapshotter.sock"),
        );
        let warn: Vec<_> = found.iter().filter(|f| f.level == Level::Warn).collect();
        assert_eq!(warn.len(), 1, "{found:#?}");
        assert!(warn[0].message.contains("overlayfs"));
    }

    #[test]
    fn containerds_registry_hosts_should_be_lodes() {
        let with = format!(
            "{SAMPLE}\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"
        );
        assert!(
            registry_hosts(SAMPLE, None).is_none(),
            "containerd names none"
        );
        let same = registry_hosts(&with, Some(Path::new("/etc/containerd/certs.d"))).unwrap();
        assert_eq!(same.level, Level::Ok);
        for lode in [None, Some(Path::new("/elsewhere"))] {
            let found = registry_hosts(&with, lode).unwrap();
            assert_eq!(found.level, Level::Warn);
            assert!(
                found
                    .fix
                    .unwrap()
                    .contains("config_path = \"/etc/containerd/certs.d\""),
                "{lode:?}"
            );
        }
    }

    #[test]
    fn kernels_before_resend_warn_about_failover() {
        assert!(kernel("6.18.0-1-amd64", true)
            .iter()
            .all(|f| f.level == Level::Ok));
        let old = kernel("5.15.0-91-generic", true);
        assert_eq!(old[1].level, Level::Warn);
        assert!(old[1].fix.as_deref().unwrap().contains("restart"));
        assert_eq!(kernel("6.9", false)[0].level, Level::Fail);
    }

    #[test]
    fn sockets_that_do_not_answer_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(socket("sock", &path, true, "start it").level, Level::Fail);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(socket("sock", &path, true, "start it").level, Level::Warn);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(socket("sock", &path, true, "start it").level, Level::Ok);
    }
}
