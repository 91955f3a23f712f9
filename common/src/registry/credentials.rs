//! Registry credentials from a docker `config.json` (`auths` section).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;

/// A user name and password for one registry. The password never appears in
/// `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
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
pub(crate) struct CredentialStore {
    by_registry: HashMap<String, Credentials>,
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
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

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

    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<Self, RegistryError> {
        let err = |message: String| RegistryError::Credentials {
            path: path.display().to_string(),
            message,
        };
        let config: DockerConfig = serde_json::from_slice(text)
            .map_err(|e| err(format!("not a docker config file: {e}")))?;
        if config.creds_store.is_some() || !config.cred_helpers.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "docker config names credential helpers; Lode only reads inline \"auths\" entries"
            );
        }
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
            by_registry,
            source: None,
        })
    }

    /// Whether the config file is as it was when loaded (a client that
    /// outlives a `docker login` must be rebuilt to see it).
    pub(crate) fn is_current(&self) -> bool {
        self.source
            .as_ref()
            .is_none_or(|(path, then)| stamp(path) == *then)
    }

    /// Credentials for `registry` (`host[:port]`), if configured.
    pub(crate) fn get(&self, registry: &str) -> Option<&Credentials> {
        if let Some(found) = self.by_registry.get(registry) {
            return Some(found);
        }
        if DOCKER_HUB_ALIASES.contains(&registry) {
            return DOCKER_HUB_ALIASES
                .iter()
                .find_map(|alias| self.by_registry.get(*alias));
        }
        None
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
fn normalize_key(key: &str) -> String {
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
        let store = parse(r#"{"credsStore": "desktop"}"#).unwrap();
        assert_eq!(store.len(), 0);
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
