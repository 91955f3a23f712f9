//! Where a registry's content is fetched from: containerd's host
//! configuration (`<config_path>/<registry>/hosts.toml`, else
//! `<config_path>/_default/hosts.toml`, as containerd's CRI plugin reads
//! it), and clients for those hosts tried in order, request by request.
//!
//! A `hosts.toml` lists hosts (`[host."https://mirror:5000"]`, in file
//! order, each with `capabilities`, `header`, `ca`, `skip_verify`) tried
//! before `server` (the registry itself unless given). A host that fails at the transport level
//! (refused, timed out, 5xx) is passed over for a while, so that a dead
//! mirror costs each request nothing once noticed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::reference::validate_host_port;
use super::{Reference, RegistryClient, RegistryError, RegistryOptions, TlsOptions};

/// How long a host that failed at the transport level is passed over.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// One host to fetch a registry's content from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryHost {
    /// `host[:port]`.
    pub host: String,
    /// Reached over plain HTTP (loopback hosts always are).
    #[serde(default)]
    pub plain_http: bool,
    /// May resolve tags (manifests by tag).
    pub resolve: bool,
    /// May serve content by digest (manifests by digest, blobs).
    pub pull: bool,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: HostHeaders,
    /// Named `https://` (or without a scheme) in a `hosts.toml`: HTTPS even
    /// on loopback.
    #[serde(default)]
    pub https: bool,
    /// Accept any certificate.
    #[serde(default)]
    pub skip_verify: bool,
    /// Certificate authorities (PEM files) trusted besides the system's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca: Vec<PathBuf>,
}

/// A host's extra request headers (a `hosts.toml`'s `header`), by name.
/// Their values may be credentials (a mirror's token): `Debug` shows the
/// names only.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostHeaders(pub BTreeMap<String, String>);

impl std::ops::Deref for HostHeaders {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for HostHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|name| (name, "<redacted>")))
            .finish()
    }
}

impl RegistryHost {
    /// The registry itself, for everything.
    pub fn origin(registry: &str, plain_http: bool) -> Self {
        Self {
            host: registry.to_owned(),
            plain_http,
            resolve: true,
            pull: true,
            headers: HostHeaders::default(),
            https: false,
            skip_verify: false,
            ca: Vec::new(),
        }
    }
}

/// What a request needs a host to be able to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Resolve,
    Pull,
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a hosts.toml: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: host {host:?}: {message}")]
    Host {
        path: PathBuf,
        host: String,
        message: String,
    },
}

#[derive(Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: bool,
    ca: Option<toml::Value>,
    #[serde(default)]
    header: BTreeMap<String, toml::Value>,
    #[serde(default)]
    override_path: bool,
    // Keys containerd knows and Lode has no use for (client, dial_timeout)
    // are ignored.
}

/// The hosts of `registry` (`host[:port]`) in the order to try them, from
/// the `hosts.toml` under `config_path` that applies to it; just the
/// registry itself when none does. `plain_http` is the registry's own
/// scheme when no file names it.
pub fn hosts_for(
    config_path: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let candidates = [registry, "_default"].map(|dir| config_path.join(dir).join("hosts.toml"));
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Ok(vec![RegistryHost::origin(registry, plain_http)]);
    };
    let text = std::fs::read_to_string(path).map_err(|source| HostsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_hosts(&text, path, registry, plain_http)
}

/// Parses the text of a containerd `hosts.toml` (read from `path`, which
/// names it in errors and anchors relative `ca` paths) into the hosts of
/// `registry` in the order to try them: the file's `[host]` entries, then
/// its `server` (else the registry itself, over HTTP if `plain_http`).
pub fn parse_hosts(
    text: &str,
    path: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let file: HostsFile = toml::from_str(text).map_err(|e| HostsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut hosts = Vec::with_capacity(file.host.len() + 1);
    for (url, entry) in file.host {
        let bad = |message: String| HostsError::Host {
            path: path.to_owned(),
            host: url.clone(),
            message,
        };
        let entry: HostEntry = entry.try_into().map_err(|e| bad(e.to_string()))?;
        let (host, plain) = split_url(&url, entry.override_path).map_err(bad)?;
        let mut host = capable(host, plain, entry.capabilities.as_deref()).map_err(bad)?;
        host.skip_verify = entry.skip_verify;
        // Relative CA paths are relative to the file's directory, as
        // containerd has them.
        let dir = path.parent().unwrap_or(Path::new("/"));
        host.ca = match entry.ca {
            None => Vec::new(),
            Some(toml::Value::String(ca)) => vec![dir.join(ca)],
            Some(toml::Value::Array(cas)) => cas
                .iter()
                .map(|v| v.as_str().map(|ca| dir.join(ca)))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("ca: not a path or a list of paths".to_owned()))?,
            Some(_) => return Err(bad("ca: not a path or a list of paths".to_owned())),
        };
        for (name, value) in entry.header {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Array(values) => values
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad(format!("header {name}: not text")))?
                    .join(", "),
                _ => return Err(bad(format!("header {name}: not text"))),
            };
            host.headers.0.insert(name, value);
        }
        hosts.push(host);
    }
    let server = match &file.server {
        Some(url) => {
            let (host, plain) = split_url(url, false).map_err(|message| HostsError::Host {
                path: path.to_owned(),
                host: url.clone(),
                message,
            })?;
            capable(host, plain, file.capabilities.as_deref()).map_err(|message| {
                HostsError::Host {
                    path: path.to_owned(),
                    host: url.clone(),
                    message,
                }
            })?
        }
        None => RegistryHost::origin(registry, plain_http),
    };
    hosts.push(server);
    Ok(hosts)
}

/// `https://host:port[/v2]` → (`host:port`, plain HTTP?).
fn split_url(url: &str, override_path: bool) -> Result<(String, bool), String> {
    let (plain, rest) = match url.split_once("://") {
        Some(("http", rest)) => (true, rest),
        Some(("https", rest)) => (false, rest),
        Some((scheme, _)) => return Err(format!("scheme {scheme:?} (http or https)")),
        None => (false, url),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err("no host".to_owned());
    }
    // The host replaces the registry of the references requests are made
    // for; anything but `host[:port]` (user information, a query, a
    // fragment) would change what the request URLs mean.
    validate_host_port(host).map_err(|e| format!("{e}: expected host[:port]"))?;
    let path = path.trim_end_matches('/');
    if override_path || !(path.is_empty() || path == "v2") {
        return Err(format!(
            "path /{path} is not supported by Lode; give the host's root (/v2 is implied)"
        ));
    }
    Ok((host.to_owned(), plain))
}

/// A host named in a `hosts.toml`, its scheme as written.
fn capable(
    host: String,
    plain_http: bool,
    caps: Option<&[String]>,
) -> Result<RegistryHost, String> {
    let mut found = RegistryHost::origin(&host, plain_http);
    found.https = !plain_http;
    if let Some(caps) = caps {
        for cap in caps {
            if !matches!(cap.as_str(), "pull" | "resolve" | "push") {
                return Err(format!("capability {cap:?} (pull, resolve or push)"));
            }
        }
        found.pull = caps.iter().any(|c| c == "pull");
        found.resolve = caps.iter().any(|c| c == "resolve");
    }
    Ok(found)
}

/// A client per host, tried in order request by request.
pub struct HostClients {
    hosts: Vec<HostClient>,
}

struct HostClient {
    host: RegistryHost,
    client: RegistryClient,
    down_until: Mutex<Option<Instant>>,
}

/// One host to send a request to: the reference rewritten to it, and its client.
pub struct Attempt<'a> {
    pub reference: Reference,
    pub client: &'a RegistryClient,
    index: usize,
}

impl HostClients {
    /// Clients for `hosts`, built with `options` (but the scheme and the
    /// headers, which are the host's). Every host but the last gives up
    /// at the first failure: the next one is tried instead.
    pub fn new(hosts: Vec<RegistryHost>, options: &RegistryOptions) -> Result<Self, RegistryError> {
        let last = hosts.len().saturating_sub(1);
        let hosts = hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| {
                let client = RegistryClient::new(RegistryOptions {
                    plain_http: options.plain_http || host.plain_http,
                    max_retries: if i == last { options.max_retries } else { 0 },
                    headers: host.headers.clone(),
                    tls: TlsOptions {
                        ca: host.ca.clone(),
                        skip_verify: host.skip_verify,
                        required: host.https,
                    },
                    ..options.clone()
                })?;
                Ok(HostClient {
                    host,
                    client,
                    down_until: Mutex::new(None),
                })
            })
            .collect::<Result<_, RegistryError>>()?;
        Ok(Self { hosts })
    }

    /// The hosts able to do `capability` for `reference`, in order, those
    /// recently down after the others.
    pub fn attempts(&self, reference: &Reference, capability: Capability) -> Vec<Attempt<'_>> {
        let now = Instant::now();
        let (mut up, down): (Vec<_>, Vec<_>) = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| match capability {
                Capability::Resolve => h.host.resolve,
                Capability::Pull => h.host.pull,
            })
            .partition(|(_, h)| {
                h.down_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none_or(|until| until <= now)
            });
        up.extend(down);
        up.into_iter()
            .map(|(index, h)| Attempt {
                reference: Reference {
                    registry: h.host.host.clone(),
                    ..reference.clone()
                },
                client: &h.client,
                index,
            })
            .collect()
    }

    /// Notes that `attempt` failed with `error`: a transport failure
    /// passes its host over for a while.
    pub fn failed(&self, attempt: &Attempt<'_>, error: &RegistryError) {
        let host = &self.hosts[attempt.index];
        let transport = matches!(
            error,
            RegistryError::Timeout { .. } | RegistryError::Request { .. }
        );
        tracing::warn!(host = %host.host.host, %error, "registry host failed; trying the next");
        if transport {
            *host.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + DOWN_FOR);
        }
    }

    /// Whether every host's client still has its docker config's
    /// credentials as they are on disk.
    pub fn credentials_current(&self) -> bool {
        self.hosts.iter().all(|h| h.client.credentials_current())
    }

    /// The hosts, for messages.
    pub fn describe(&self) -> String {
        self.hosts
            .iter()
            .map(|h| h.host.host.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(text: &str) -> Result<Vec<RegistryHost>, HostsError> {
        parse_hosts(
            text,
            Path::new("/certs.d/reg.io/hosts.toml"),
            "reg.io",
            false,
        )
    }

    #[test]
    fn hosts_come_in_file_order_before_the_server() {
        let found = hosts(
            r#"
server = "https://reg.io"

[host."http://zz-mirror:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://zz-mirror:5000".header]
    x-token = "t"
    x-list = ["a", "b"]

[host."https://aa-mirror/v2"]
  capabilities = ["pull"]
"#,
        )
        .unwrap();
        let names: Vec<&str> = found.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["zz-mirror:5000", "aa-mirror", "reg.io"]);
        assert!(found[0].plain_http && !found[1].plain_http && !found[2].plain_http);
        assert!(found[0].resolve && !found[1].resolve && found[1].pull);
        assert_eq!(found[0].headers["x-token"], "t");
        assert_eq!(found[0].headers["x-list"], "a, b");
        assert!(found[2].resolve && found[2].pull);
        assert!(!found[0].https && found[1].https && found[2].https);
    }

    #[test]
    fn header_values_stay_out_of_debug_output() {
        let found = hosts(
            r#"
[host."http://mirror:5000"]
  header = { authorization = "Bearer secret-token" }
"#,
        )
        .unwrap();
        let options = RegistryOptions {
            headers: found[0].headers.clone(),
            ..RegistryOptions::default()
        };
        for shown in [format!("{found:?}"), format!("{options:?}")] {
            assert!(shown.contains("authorization"), "{shown}");
            assert!(!shown.contains("secret-token"), "{shown}");
        }
    }

    #[test]
    fn ca_paths_are_relative_to_the_file_and_skip_verify_is_kept() {
        let found = hosts(
            "[host.\"https://m\"]\nca = \"m.pem\"\nskip_verify = true\n\
             [host.\"https://n\"]\nca = [\"/etc/ssl/a.pem\", \"b.pem\"]\n",
        )
        .unwrap();
        assert_eq!(found[0].ca, [PathBuf::from("/certs.d/reg.io/m.pem")]);
        assert!(found[0].skip_verify && !found[1].skip_verify);
        assert_eq!(
            found[1].ca,
            [
                PathBuf::from("/etc/ssl/a.pem"),
                PathBuf::from("/certs.d/reg.io/b.pem")
            ]
        );
        assert!(hosts("[host.\"https://m\"]\nca = 1\n").is_err());
    }

    #[test]
    fn without_a_server_the_registry_itself_comes_last() {
        let found = hosts("[host.\"mirror\"]\n").unwrap();
        assert_eq!(found[0].host, "mirror");
        assert!(found[0].https, "no scheme means https");
        assert_eq!(found[1], RegistryHost::origin("reg.io", false));
        assert_eq!(
            hosts("").unwrap(),
            vec![RegistryHost::origin("reg.io", false)]
        );
    }

    #[test]
    fn what_lode_cannot_follow_is_an_error_naming_file_and_host() {
        for text in [
            "server = \"ftp://reg.io\"",
            "[host.\"https://m/sub/path\"]",
            "[host.\"https://m\"]\noverride_path = true",
            "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
            "[host.\"https://m\"]\nheader = { x = 1 }",
            "not toml at all [",
        ] {
            let e = hosts(text).unwrap_err().to_string();
            assert!(e.contains("/certs.d/reg.io/hosts.toml"), "{text}: {e}");
        }
    }

    #[test]
    fn a_host_is_a_name_and_a_port_and_nothing_more() {
        // Found by fuzzing: `==?alm` was taken as a host, and requests to
        // it would have carried `?alm` as their query.
        for url in [
            "==?alm",
            "https://user:pw@m.io",
            "https://m.io?x",
            "https://m.io#f",
            "https://a b",
            "https://m_1",
            "https://m.io:99999",
            "https://m.io:",
            "http://[::1",
        ] {
            let e = hosts(&format!("[host.{url:?}]\n")).unwrap_err().to_string();
            assert!(e.contains("expected host[:port]"), "{url}: {e}");
        }
        assert!(hosts("server = \"https://u@reg.io\"").is_err());
        for url in [
            "https://m",
            "http://10.0.0.1:5000",
            "https://[::1]:443/v2",
            "Mirror-1.example.com",
        ] {
            assert!(hosts(&format!("[host.{url:?}]\n")).is_ok(), "{url}");
        }
    }

    #[test]
    fn the_registry_directory_comes_before_default_and_nothing_means_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            hosts_for(dir.path(), "127.0.0.1:5000", true).unwrap(),
            vec![RegistryHost::origin("127.0.0.1:5000", true)]
        );
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "[host.\"http://d\"]\n",
        )
        .unwrap();
        assert_eq!(
            hosts_for(dir.path(), "127.0.0.1:5000", true).unwrap()[0].host,
            "d"
        );
        std::fs::create_dir_all(dir.path().join("127.0.0.1:5000")).unwrap();
        std::fs::write(
            dir.path().join("127.0.0.1:5000/hosts.toml"),
            "[host.\"http://own\"]\n",
        )
        .unwrap();
        assert_eq!(
            hosts_for(dir.path(), "127.0.0.1:5000", true).unwrap()[0].host,
            "own"
        );
    }

    #[test]
    fn a_host_down_goes_last_for_a_while() {
        let clients = HostClients::new(
            vec![
                RegistryHost::origin("127.0.0.1:1", true),
                RegistryHost::origin("127.0.0.1:2", true),
            ],
            &RegistryOptions::default(),
        )
        .unwrap();
        let reference: Reference = "reg.io/app:v1".parse().unwrap();
        let first = clients.attempts(&reference, Capability::Pull);
        assert_eq!(first[0].reference.registry, "127.0.0.1:1");
        assert_eq!(first[0].reference.repository, "app");
        let refused = RegistryError::NotFound {
            reference: "r".into(),
            what: "w".into(),
        };
        clients.failed(&first[0], &refused);
        assert_eq!(
            clients.attempts(&reference, Capability::Pull)[0]
                .reference
                .registry,
            "127.0.0.1:1",
            "a host that answered stays first"
        );
        let down = RegistryError::Request {
            reference: "r".into(),
            what: "w".into(),
            message: "connection refused".into(),
        };
        clients.failed(&first[0], &down);
        let after: Vec<String> = clients
            .attempts(&reference, Capability::Pull)
            .into_iter()
            .map(|a| a.reference.registry)
            .collect();
        assert_eq!(after, ["127.0.0.1:2", "127.0.0.1:1"]);
    }
}
