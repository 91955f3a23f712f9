//! Registry credentials: given in memory (a CRI pull's), from a docker
//! `config.json`'s credential helpers (`credHelpers`, `credsStore`), or its
//! inline `auths` entries, in that order.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::credential_helper::Helpers;
use super::RegistryError;

/// A user name and password for one registry. The password never appears in
/// `Debug` output or logs; it travels only between Lode's processes (over
/// their unix sockets) and is never written to disk by Lode.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Credentials by registry (`host[:port]`, as written in references).
#[derive(Clone, Default)]
pub struct CredentialStore {
    /// Given in memory; they take precedence over the config file.
    given: HashMap<String, Credentials>,
    by_registry: HashMap<String, Credentials>,
    helpers: Helpers,
    /// The file read (or looked for) and its state then.
    source: Option<(PathBuf, FileStamp)>,
}

/// What tells a config file changed: modification time and size, `None`
/// while the file does not exist.
type FileStamp = Option<(std::time::SystemTime, u64)>;

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut registries: Vec<&String> = self.by_registry.keys().collect();
        registries.sort();
        f.debug_struct("CredentialStore")
            .field("registries", &registries)
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Docker Hub's registry is known under several names in config files.
pub(super) const DOCKER_HUB_ALIASES: [&str; 3] =
    ["docker.io", "index.docker.io", "registry-1.docker.io"];

impl CredentialStore {
    /// Loads `explicit`, else `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`. A missing default file means anonymous
    /// access; a missing explicit file is an error.
    pub(crate) fn load(explicit: Option<&Path>) -> Result<Self, RegistryError> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => match default_config_path() {
                Some(path) if path.exists() => path,
                Some(path) => {
                    return Ok(Self {
                        source: Some((path, None)),
                        ..Self::default()
                    })
                }
                None => return Ok(Self::default()),
            },
        };
        let before = stamp(&path);
        let text = std::fs::read(&path).map_err(|source| RegistryError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut store = Self::parse(&text, &path)?;
        store.source = Some((path.clone(), before));
        tracing::debug!(path = %path.display(), registries = store.by_registry.len(), "loaded registry credentials");
        Ok(store)
    }

    /// Parses the text of a docker `config.json` (`auths`, `credsStore`,
    /// `credHelpers`; other keys are ignored). `path` only names the file
    /// in errors. Runs no credential helper: they are asked on lookup.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, RegistryError> {
        let err = |message: String| RegistryError::Credentials {
            path: path.display().to_string(),
            message,
        };
        let config: DockerConfig = serde_json::from_slice(text)
            .map_err(|e| err(format!("not a docker config file: {e}")))?;
        let helpers = Helpers::new(
            config.creds_store.filter(|s| !s.is_empty()),
            config
                .cred_helpers
                .into_iter()
                .map(|(key, helper)| (normalize_key(&key), helper))
                .collect(),
        );
        let mut by_registry = HashMap::new();
        for (key, entry) in config.auths {
            let registry = normalize_key(&key);
            let credentials = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => decode_auth(&auth).ok_or_else(|| {
                    err(format!(
                        "auths[{key:?}].auth is not base64 of \"user:password\""
                    ))
                })?,
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => {
                    if entry.identity_token.is_some() {
                        tracing::warn!(registry = %registry, "identity tokens are not supported; using anonymous access");
                    }
                    continue;
                }
            };
            by_registry.insert(registry, credentials);
        }
        Ok(Self {
            given: HashMap::new(),
            by_registry,
            helpers,
            source: None,
        })
    }

    /// `given` in place of whatever the config file has for those registries.
    pub(crate) fn with_given(mut self, given: HashMap<String, Credentials>) -> Self {
        self.given = given;
        self
    }

    /// Whether the config file is as it was when loaded (a client that
    /// outlives a `docker login` must be rebuilt to see it).
    pub(crate) fn is_current(&self) -> bool {
        self.source
            .as_ref()
            .is_none_or(|(path, then)| stamp(path) == *then)
    }

    /// Credentials for `registry` (`host[:port]`), if any: given ones,
    /// else the config file's helper for it (`credHelpers`, then
    /// `credsStore`), else its `auths` entry. Docker Hub answers to any of
    /// its names.
    pub(crate) fn get(&self, registry: &str) -> Option<Credentials> {
        let names: &[&str] = if DOCKER_HUB_ALIASES.contains(&registry) {
            &DOCKER_HUB_ALIASES
        } else {
            std::slice::from_ref(&registry)
        };
        if let Some(found) = names.iter().find_map(|n| self.given.get(*n)) {
            return Some(found.clone());
        }
        if let Some(found) = self.helpers.get(registry) {
            return Some(found);
        }
        names.iter().find_map(|n| self.by_registry.get(*n)).cloned()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_registry.len()
    }
}

fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

/// `https://host:port/v1/` → `host:port`: docker writes keys as URLs or as
/// bare hosts.
pub(super) fn normalize_key(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    host.to_owned()
}

fn decode_auth(auth: &str) -> Option<Credentials> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CredentialStore, RegistryError> {
        CredentialStore::parse(text.as_bytes(), Path::new("/test/config.json"))
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn reads_auth_and_username_password_forms() {
        let text = format!(
            r#"{{"auths": {{
                "reg.example.com": {{"auth": "{}"}},
                "https://other.example.com:5000/v2/": {{"username": "bob", "password": "pw:with:colons"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "empty.example.com": {{}}
            }}}}"#,
            b64("alice:s3cret"),
            b64("hub:hubpw")
        );
        let store = parse(&text).unwrap();
        let alice = store.get("reg.example.com").unwrap();
        let alice = &alice;
        assert_eq!(
            (alice.username.as_str(), alice.password.as_str()),
            ("alice", "s3cret")
        );
        let bob = store.get("other.example.com:5000").unwrap();
        assert_eq!(bob.password, "pw:with:colons");
        assert_eq!(store.get("docker.io").unwrap().username, "hub");
        assert_eq!(store.get("registry-1.docker.io").unwrap().username, "hub");
        assert!(store.get("empty.example.com").is_none());
        assert!(store.get("unknown.example.com").is_none());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_loaded_store_knows_when_its_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {}}"#).unwrap();
        let store = CredentialStore::load(Some(&path)).unwrap();
        assert!(store.is_current());
        let login = format!(r#"{{"auths": {{"h.io": {{"auth": "{}"}}}}}}"#, b64("u:p"));
        std::fs::write(&path, login).unwrap();
        assert!(!store.is_current(), "a login changed the file");
        let again = CredentialStore::load(Some(&path)).unwrap();
        assert!(again.is_current());
        assert_eq!(again.get("h.io").unwrap().username, "u");
        std::fs::remove_file(&path).unwrap();
        assert!(!again.is_current(), "the file went away");
        assert!(CredentialStore::default().is_current(), "nothing to watch");
    }

    #[test]
    fn password_in_auth_may_contain_colons() {
        let store = parse(&format!(
            r#"{{"auths":{{"h.io":{{"auth":"{}"}}}}}}"#,
            b64("u:a:b")
        ))
        .unwrap();
        assert_eq!(store.get("h.io").unwrap().password, "a:b");
    }

    #[test]
    fn malformed_files_are_errors_naming_the_path() {
        for text in [
            "not json",
            r#"{"auths": {"h.io": {"auth": "%%%"}}}"#,
            r#"{"auths": {"h.io": {"auth": "bm9jb2xvbg=="}}}"#,
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.to_string().contains("/test/config.json"), "{e}");
        }
    }

    #[test]
    fn config_without_auths_is_anonymous() {
        let store = parse(r#"{"auths": {}}"#).unwrap();
        assert_eq!(store.len(), 0);
        assert!(store.get("h.io").is_none());
    }

    #[test]
    fn given_credentials_come_before_the_file() {
        let file = format!(
            r#"{{"auths":{{"h.io":{{"auth":"{}"}}, "docker.io":{{"auth":"{}"}}}}}}"#,
            b64("file:pw"),
            b64("hubfile:pw")
        );
        let given = |user: &str| Credentials {
            username: user.into(),
            password: "x".into(),
        };
        let store = parse(&file).unwrap().with_given(HashMap::from([
            ("h.io".to_owned(), given("cri")),
            ("index.docker.io".to_owned(), given("hubcri")),
        ]));
        assert_eq!(store.get("h.io").unwrap().username, "cri");
        assert_eq!(
            store.get("registry-1.docker.io").unwrap().username,
            "hubcri"
        );
        assert!(store.get("other.io").is_none());
    }

    #[test]
    fn debug_output_hides_passwords() {
        let store = parse(&format!(
            r#"{{"auths":{{"h.io":{{"auth":"{}"}}}}}}"#,
            b64("user:topsecret")
        ))
        .unwrap();
        let creds = store.get("h.io").unwrap();
        let shown = format!("{creds:?} {store:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("user"), "{shown}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e =
            CredentialStore::load(Some(Path::new("/nonexistent/lode/config.json"))).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/lode/config.json"),
            "{e}"
        );
    }
}
