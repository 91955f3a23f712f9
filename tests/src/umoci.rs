//! Unpacking OCI layouts with Debian's `umoci`: an independent
//! implementation of layer application (whiteouts, opaque directories, hard
//! links, ownership, xattrs) to compare Lode's view of an image against.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::KitError;

const UMOCI: &str = "umoci";

/// Whether `umoci` can be run.
pub fn umoci_available() -> bool {
    Command::new(UMOCI)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `umoci unpack --image LAYOUT:TAG BUNDLE`; returns `BUNDLE/rootfs`.
/// `bundle` must not exist yet. Run as root so that owners, devices and
/// `security.*` xattrs are restored.
pub fn umoci_unpack(layout_dir: &Path, tag: &str, bundle: &Path) -> Result<PathBuf, KitError> {
    let output = Command::new(UMOCI)
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout_dir.display()))
        .arg(bundle)
        .output()
        .map_err(KitError::io(format!("run {UMOCI} (apt-get install umoci)")))?;
    if !output.status.success() {
        return Err(KitError::Command {
            what: format!("umoci unpack {}:{tag}", layout_dir.display()),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(bundle.join("rootfs"))
}
