//! Docker credential helpers (`credHelpers`, `credsStore` in a docker
//! config): `docker-credential-<name> get`, the registry's server URL on
//! stdin, `{"ServerURL", "Username", "Secret"}` on stdout, run as docker
//! runs them. Answers are kept a few minutes, so that helpers handing out
//! short-lived tokens (cloud registries) are asked again in time.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::credentials::Credentials;

/// How long a helper's answer is used before it is asked again.
const ANSWER_TTL: Duration = Duration::from_secs(300);
/// How long a helper may take to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Docker Hub's server URL as docker hands it to helpers.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

#[derive(Clone, Default)]
pub(crate) struct Helpers {
    /// `credsStore`: the helper of every registry without its own.
    store: Option<String>,
    /// `credHelpers`: registry → helper name.
    by_registry: HashMap<String, String>,
    /// Answers by registry, and when they were given.
    answers: Arc<Mutex<HashMap<String, Answer>>>,
}

/// A helper's answer for one registry and when it was given.
type Answer = (Instant, Option<Credentials>);

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

#[derive(Debug, thiserror::Error)]
enum HelperError {
    #[error("cannot run {helper}: {source}")]
    Spawn {
        helper: String,
        source: std::io::Error,
    },
    #[error("{helper} did not answer within {HELPER_TIMEOUT:?}")]
    Timeout { helper: String },
    #[error("{helper} failed: {message}")]
    Failed { helper: String, message: String },
    #[error("{helper} answered something that is not credentials: {source}")]
    Answer {
        helper: String,
        source: serde_json::Error,
    },
}

impl Helpers {
    pub(crate) fn new(store: Option<String>, by_registry: HashMap<String, String>) -> Self {
        Self {
            store,
            by_registry,
            answers: Arc::default(),
        }
    }

    /// What the helper for `registry` has, if one is configured and has
    /// credentials for it. A helper that fails is logged (never with what
    /// it printed, which may hold a secret) and counts as having none.
    pub(crate) fn get(&self, registry: &str) -> Option<Credentials> {
        let helper = self.by_registry.get(registry).or(self.store.as_ref())?;
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, answer)) = answers.get(registry) {
            if at.elapsed() < ANSWER_TTL {
                return answer.clone();
            }
        }
        let program = format!("docker-credential-{helper}");
        let answer = match ask(&program, &server_url(registry)) {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(registry, error = %e, "credential helper failed; trying the config's auths");
                None
            }
        };
        answers.insert(registry.to_owned(), (Instant::now(), answer.clone()));
        answer
    }
}

/// The server URL docker asks helpers about for `registry`.
fn server_url(registry: &str) -> String {
    if super::credentials::DOCKER_HUB_ALIASES.contains(&registry) {
        DOCKER_HUB_SERVER.to_owned()
    } else {
        registry.to_owned()
    }
}

/// Runs `program get`; `None` when it has no credentials for `server`.
fn ask(program: &str, server: &str) -> Result<Option<Credentials>, HelperError> {
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| HelperError::Spawn {
            helper: program.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit below.
        let _ = stdin.write_all(server.as_bytes());
    }
    // The helper is waited for on a thread, so that one that never ends
    // is killed in time.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let (done, answered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.read_to_end(&mut out);
        let status = child.wait();
        let _ = done.send(read.and(status).map(|status| (status.success(), out)));
    });
    match answered.recv_timeout(HELPER_TIMEOUT) {
        Ok(Ok((success, out))) => parse_answer(program, success, &out),
        Ok(Err(e)) => Err(HelperError::Failed {
            helper: program.to_owned(),
            message: e.to_string(),
        }),
        Err(_) => {
            // Not reaped yet (its thread still waits), so the pid is its own.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            Err(HelperError::Timeout {
                helper: program.to_owned(),
            })
        }
    }
}

/// A helper's answer: credentials, `None` for "not found", or an error.
fn parse_answer(
    program: &str,
    success: bool,
    out: &[u8],
) -> Result<Option<Credentials>, HelperError> {
    if !success {
        let text = String::from_utf8_lossy(out);
        // docker-credential-helpers' ErrCredentialsNotFound.
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(HelperError::Failed {
            helper: program.to_owned(),
            message: "non-zero exit".to_owned(),
        });
    }
    let answer: HelperAnswer =
        serde_json::from_slice(out).map_err(|source| HelperError::Answer {
            helper: program.to_owned(),
            source,
        })?;
    if answer.username == "<token>" {
        tracing::warn!(
            helper = program,
            "identity tokens from credential helpers are not supported"
        );
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_credentials_not_found_or_errors() {
        let ok = br#"{"ServerURL":"h.io","Username":"u","Secret":"s3"}"#;
        let creds = parse_answer("h", true, ok).unwrap().unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            ("u", "s3")
        );
        assert!(
            parse_answer("h", false, b"credentials not found in native keychain\n")
                .unwrap()
                .is_none()
        );
        let token = br#"{"ServerURL":"h.io","Username":"<token>","Secret":"t"}"#;
        assert!(parse_answer("h", true, token).unwrap().is_none());
        for (success, out) in [(false, &b"boom"[..]), (true, b"not json"), (true, b"{}")] {
            let e = parse_answer("docker-credential-x", success, out).unwrap_err();
            assert!(e.to_string().contains("docker-credential-x"), "{e}");
            assert!(
                !e.to_string().contains("boom"),
                "helper output is never shown: {e}"
            );
        }
    }

    #[test]
    fn docker_hub_is_asked_for_by_its_server_url() {
        assert_eq!(server_url("docker.io"), DOCKER_HUB_SERVER);
        assert_eq!(server_url("registry-1.docker.io"), DOCKER_HUB_SERVER);
        assert_eq!(server_url("h.io:5000"), "h.io:5000");
    }

    #[test]
    fn a_missing_helper_counts_as_no_credentials() {
        let helpers = Helpers::new(Some("lode-test-no-such-helper".into()), HashMap::new());
        assert!(helpers.get("h.io").is_none());
        assert!(
            Helpers::default().get("h.io").is_none(),
            "no helper configured"
        );
    }
}
