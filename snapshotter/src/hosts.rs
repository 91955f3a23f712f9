//! Where a registry's content is fetched from, as the snapshotter is
//! configured: the `[[registry.mirrors]]` of the registry, then what
//! containerd's `hosts.toml` for it says (`registry.config_path`), which
//! ends with the registry itself.
//!
//! Resolved whenever a client is made or a daemon is asked to mount,
//! never recorded: a `hosts.toml`'s `header` entries may hold credentials
//! (a mirror's token), which the snapshotter does not persist, and an
//! edited file applies to the next mount as it does to the next pull.

use lode_common::registry::{hosts_for, HostsError, RegistryHost};
use lode_config::SnapshotterRegistryConfig;

/// The hosts to fetch `registry`'s content from, in order.
pub fn resolve(
    config: &SnapshotterRegistryConfig,
    registry: &str,
) -> Result<Vec<RegistryHost>, HostsError> {
    let plain = |host: &str| {
        let bare = host.rsplit_once(':').map_or(host, |(name, _)| name);
        config.is_plain_http(bare) || config.is_plain_http(host)
    };
    let mut hosts: Vec<RegistryHost> = config
        .mirrors
        .iter()
        .filter(|m| m.host == registry)
        .flat_map(|m| m.endpoints.iter())
        .map(|endpoint| RegistryHost::origin(endpoint, plain(endpoint)))
        .collect();
    let own = plain(registry);
    match &config.config_path {
        Some(dir) => hosts.extend(hosts_for(dir, registry, own)?),
        None => hosts.push(RegistryHost::origin(registry, own)),
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_before_their_registry() {
        let config = SnapshotterRegistryConfig {
            mirrors: vec![lode_config::MirrorConfig {
                host: "docker.io".into(),
                endpoints: vec!["mirror.local:5000".into()],
            }],
            ..Default::default()
        };
        let hosts: Vec<String> = resolve(&config, "docker.io")
            .unwrap()
            .into_iter()
            .map(|h| h.host)
            .collect();
        assert_eq!(hosts, ["mirror.local:5000", "docker.io"]);
        assert_eq!(resolve(&config, "quay.io").unwrap().len(), 1);
    }

    #[test]
    fn containerd_hosts_files_follow_the_mirrors_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("reg.io")).unwrap();
        std::fs::write(
            dir.path().join("reg.io/hosts.toml"),
            "server = \"https://reg.io\"\n[host.\"http://cache.local:5000\"]\n",
        )
        .unwrap();
        let config = SnapshotterRegistryConfig {
            mirrors: vec![lode_config::MirrorConfig {
                host: "reg.io".into(),
                endpoints: vec!["first.local".into()],
            }],
            config_path: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let hosts = resolve(&config, "reg.io").unwrap();
        let names: Vec<(&str, bool)> = hosts
            .iter()
            .map(|h| (h.host.as_str(), h.plain_http))
            .collect();
        assert_eq!(
            names,
            [
                ("first.local", false),
                ("cache.local:5000", true),
                ("reg.io", false)
            ]
        );
        assert_eq!(
            resolve(&config, "quay.io").unwrap(),
            vec![RegistryHost::origin("quay.io", false)]
        );
    }
}
