//! `lodectl doctor`: checks a node's set-up for Lode and says what to change.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use lode_config::SnapshotterConfig;

use super::CtlError;
use crate::doctor::{self, Finding, Level};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// containerd's socket (default: the snapshotter config's
    /// `containerd_address`).
    #[arg(long)]
    pub containerd_address: Option<PathBuf>,
    /// lode-snapshotter's configuration file (its defaults if absent).
    #[arg(long, default_value = "/etc/lode/snapshotter.toml")]
    pub config: PathBuf,
}

/// Prints a line per finding (and its fix); fails if any check failed.
pub fn run(args: DoctorArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let findings = findings(&args);
    let io = |source| CtlError::Io {
        what: "write the findings".to_owned(),
        source,
    };
    for f in &findings {
        let level = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        writeln!(out, "{level} {}: {}", f.check, f.message).map_err(io)?;
        if let Some(fix) = &f.fix {
            for (i, line) in fix.lines().enumerate() {
                let lead = if i == 0 { "fix:" } else { "    " };
                writeln!(out, "     {lead} {line}").map_err(io)?;
            }
        }
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    if failed > 0 {
        return Err(CtlError::Doctor { failed });
    }
    Ok(())
}

fn findings(args: &DoctorArgs) -> Vec<Finding> {
    let mut findings = Vec::new();
    let config = if args.config.exists() {
        match SnapshotterConfig::load(&args.config) {
            Ok(config) => config,
            Err(e) => {
                findings.push(Finding::bad(
                    Level::Fail,
                    "snapshotter config",
                    e.to_string(),
                    "see misc/snapshotter.sample.toml".into(),
                ));
                SnapshotterConfig::default()
            }
        }
    } else {
        SnapshotterConfig::default()
    };
    match std::fs::read_to_string(&args.containerd_config) {
        Ok(text) => {
            findings.extend(doctor::containerd_config(
                &text,
                &args.containerd_config,
                &config.address,
            ));
            findings.extend(doctor::registry_hosts(
                &text,
                config.registry.config_path.as_deref(),
            ));
        }
        Err(e) => findings.push(Finding::bad(
            Level::Fail,
            "containerd config",
            format!("cannot read {}: {e}", args.containerd_config.display()),
            "pass --containerd-config with the file containerd runs with".into(),
        )),
    }
    findings.push(doctor::socket(
        "containerd: socket",
        args.containerd_address
            .as_ref()
            .unwrap_or(&config.containerd_address),
        false,
        "start containerd, or set containerd_address in the snapshotter config to its socket",
    ));
    findings.push(doctor::socket(
        "snapshotter: socket",
        &config.address,
        true,
        "start lode-snapshotter (misc/lode-snapshotter.service), or pass --config with its configuration",
    ));
    if let Some(proxy) = &config.cri.image_service_address {
        findings.push(doctor::socket(
            "snapshotter: CRI image service",
            proxy,
            true,
            "start lode-snapshotter; kubelet's --image-service-endpoint points at this socket",
        ));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    findings.extend(doctor::kernel(
        release.trim(),
        Path::new("/dev/fuse").exists(),
    ));
    findings
}
