//! Registry credentials kubelet hands over in CRI `PullImage` requests (a
//! pod's image pull secrets), kept in memory by registry and repository for
//! the snapshotter's own requests (manifests, bootstraps) and for the
//! daemons serving those images. Never written anywhere: a restarted
//! snapshotter starts empty and learns them again from the next pull, while
//! the daemons keep the ones they were given.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use k8s_cri::v1::AuthConfig;
use lode_common::registry::{Credentials, Reference};

#[derive(Default)]
pub struct Keychain {
    by_repository: Mutex<HashMap<(String, String), Credentials>>,
}

impl Keychain {
    pub fn new() -> Self {
        Self::default()
    }

    /// The credentials last pulled with for `reference`'s repository.
    pub fn get(&self, reference: &Reference) -> Option<Credentials> {
        self.lock().get(&key(reference)).cloned()
    }

    /// Keeps `credentials` for `reference`'s repository; returns what they
    /// replace.
    pub fn put(&self, reference: &Reference, credentials: Credentials) -> Option<Credentials> {
        self.lock().insert(key(reference), credentials)
    }

    /// Puts back what [`Keychain::put`] replaced (a pull that failed).
    pub fn restore(&self, reference: &Reference, previous: Option<Credentials>) {
        let mut map = self.lock();
        match previous {
            Some(credentials) => map.insert(key(reference), credentials),
            None => map.remove(&key(reference)),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Credentials>> {
        self.by_repository.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn key(reference: &Reference) -> (String, String) {
    (reference.registry.clone(), reference.repository.clone())
}

/// What a CRI `AuthConfig` holds that Lode can use: a user name and
/// password, given as such or as `auth` (base64 of `user:password`).
/// Tokens (identity, registry) are not: `Err` says so.
pub fn credentials_of(auth: &AuthConfig) -> Result<Option<Credentials>, &'static str> {
    if !auth.username.is_empty() {
        return Ok(Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        }));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| "auth is not base64")?;
        let text = String::from_utf8(decoded).map_err(|_| "auth is not text")?;
        let (username, password) = text
            .split_once(':')
            .ok_or("auth is not \"user:password\"")?;
        return Ok(Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }));
    }
    if !auth.identity_token.is_empty() || !auth.registry_token.is_empty() {
        return Err("identity and registry tokens are not supported; Lode reads anonymously");
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: &str) -> Reference {
        s.parse().unwrap()
    }

    fn creds(user: &str) -> Credentials {
        Credentials {
            username: user.into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn credentials_are_kept_per_repository_and_restored_after_a_failed_pull() {
        let keychain = Keychain::new();
        let app = reference("reg.io:5000/team/app:v1");
        assert!(keychain.put(&app, creds("a")).is_none());
        assert_eq!(keychain.get(&reference("reg.io:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000")).unwrap().username, "a");
        assert!(keychain
            .get(&reference("reg.io:5000/team/other:v1"))
            .is_none());
        assert!(keychain.get(&reference("other.io/team/app:v1")).is_none());
        let previous = keychain.put(&app, creds("b"));
        keychain.restore(&app, previous);
        assert_eq!(keychain.get(&app).unwrap().username, "a");
        let other = reference("reg.io:5000/team/new:v1");
        keychain.restore(&other, None);
        assert!(keychain.get(&other).is_none());
    }

    #[test]
    fn auth_configs_give_user_and_password_in_either_form() {
        let plain = AuthConfig {
            username: "u".into(),
            password: "p:w".into(),
            ..Default::default()
        };
        assert_eq!(credentials_of(&plain).unwrap().unwrap().password, "p:w");
        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:w"),
            ..Default::default()
        };
        let c = credentials_of(&encoded).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:w"));
        assert!(credentials_of(&AuthConfig::default()).unwrap().is_none());
        for bad in [
            AuthConfig {
                auth: "%%%".into(),
                ..Default::default()
            },
            AuthConfig {
                auth: base64::engine::general_purpose::STANDARD.encode("nocolon"),
                ..Default::default()
            },
            AuthConfig {
                registry_token: "t".into(),
                ..Default::default()
            },
        ] {
            assert!(credentials_of(&bad).is_err());
        }
    }
}
