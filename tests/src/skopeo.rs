//! Pushing OCI layouts to a registry with Debian's `skopeo`.

use std::path::Path;
use std::process::Command;

use lode_common::registry::Reference;

use crate::KitError;

const SKOPEO: &str = "skopeo";

/// Whether `skopeo` can be run.
pub fn skopeo_available() -> bool {
    Command::new(SKOPEO)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies image `tag` of the OCI layout `layout_dir` to `dest` (plain HTTP
/// allowed), keeping manifest and blob digests unchanged.
pub fn skopeo_copy(layout_dir: &Path, tag: &str, dest: &Reference) -> Result<(), KitError> {
    skopeo_copy_with_creds(layout_dir, tag, dest, None)
}

/// [`skopeo_copy`] to a registry that wants `(user, password)`.
pub fn skopeo_copy_with_creds(
    layout_dir: &Path,
    tag: &str,
    dest: &Reference,
    credentials: Option<(&str, &str)>,
) -> Result<(), KitError> {
    let mut command = Command::new(SKOPEO);
    // No policy file is needed for test pushes; Debian may not ship one.
    command.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if let Some((user, password)) = credentials {
        command
            .arg("--dest-creds")
            .arg(format!("{user}:{password}"));
    }
    command
        .arg(format!("oci:{}:{tag}", layout_dir.display()))
        .arg(format!("docker://{dest}"));
    let output = command.output().map_err(KitError::io(format!(
        "run {SKOPEO} (apt-get install skopeo)"
    )))?;
    if !output.status.success() {
        return Err(KitError::Command {
            what: format!(
                "skopeo copy oci:{}:{tag} docker://{dest}",
                layout_dir.display()
            ),
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
