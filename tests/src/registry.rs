//! A throw-away Debian `docker-registry` on a free loopback port, with its
//! storage and logs in a temporary directory.
//!
//! The registry writes an Apache "combined" access log line per request to
//! stdout, e.g. `127.0.0.1 - - [23/Nov/2026:20:49:53 +0000] "GET /v2/ HTTP/1.1"
//! 200 2 "" "curl/7.88.1"`, where the number after the status is the count
//! of body bytes sent. [`Registry::requests`] parses that log so tests can
//! assert how often and how much a blob was fetched.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lode_common::registry::Reference;
use lode_common::Digest;

use crate::token_server::TokenServer;
use crate::{wait_until, KitError};

pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";
const HTPASSWD: &str = "htpasswd";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Path prefix of the requests that mark a point in the access log.
const MARKER_PATH: &str = "/v2/?lode-log-marker=";

/// One access log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Request path with query string.
    pub path: String,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses a combined-log-format line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once(" \"")?;
        let (request, rest) = rest.split_once("\" ")?;
        let mut request = request.split(' ');
        let method = request.next()?.to_owned();
        let path = request.next()?.to_owned();
        let mut fields = rest.splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = match fields.next()? {
            "-" => 0,
            n => n.parse().ok()?,
        };
        let user_agent = fields
            .next()
            .and_then(|tail| tail.rsplit_once(" \""))
            .map(|(_, ua)| ua.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        Some(Self {
            method,
            path,
            status,
            bytes,
            user_agent,
        })
    }
}

/// A running (or stopped) registry. Stopped and its files removed on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    credentials: Option<(String, String)>,
    /// The registry this one is a pull-through cache of (its URL).
    remote: Option<String>,
    /// Served over HTTPS with a self-signed certificate ([`Self::ca_path`]).
    tls: bool,
    /// The server of the tokens it requires, if any.
    token_server: Option<TokenServer>,
    child: Mutex<Option<Child>>,
    markers: AtomicU64,
}

impl Registry {
    /// Whether the Debian `docker-registry` binary is installed.
    pub fn available() -> bool {
        Path::new(DOCKER_REGISTRY).is_file()
    }

    /// Starts an anonymous registry.
    pub fn start() -> Result<Self, KitError> {
        Self::launch(None, None, false, None)
    }

    /// Starts a registry served over HTTPS only, with a certificate for
    /// 127.0.0.1 signed by nobody but itself ([`Self::ca_path`]; made by
    /// `openssl`).
    pub fn start_with_tls() -> Result<Self, KitError> {
        Self::launch(None, None, true, None)
    }

    /// Starts a pull-through cache of `origin` (`proxy.remoteurl`): it
    /// fetches what it is asked for from `origin` and keeps it.
    pub fn start_mirror_of(origin: &Registry) -> Result<Self, KitError> {
        Self::launch(None, Some(origin.url()), false, None)
    }

    /// Starts a registry requiring HTTP basic authentication (htpasswd with
    /// bcrypt, made by `htpasswd -B` from apache2-utils).
    pub fn start_with_auth(user: &str, password: &str) -> Result<Self, KitError> {
        Self::launch(
            Some((user.to_owned(), password.to_owned())),
            None,
            false,
            None,
        )
    }

    /// Starts a registry requiring bearer tokens from a [`TokenServer`] of
    /// its own, which grants anyone everything in tokens that work for `ttl`
    /// ([`Self::token_server`]).
    pub fn start_with_token_auth(ttl: Duration) -> Result<Self, KitError> {
        Self::launch(None, None, false, Some(TokenServer::start(ttl)?))
    }

    fn launch(
        credentials: Option<(String, String)>,
        remote: Option<String>,
        tls: bool,
        token_server: Option<TokenServer>,
    ) -> Result<Self, KitError> {
        if !Self::available() {
            return Err(KitError::Invalid(format!(
                "{DOCKER_REGISTRY} not found (apt-get install docker-registry)"
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("lode-registry-")
            .tempdir()
            .map_err(KitError::io("create registry directory"))?;
        if let Some((user, password)) = &credentials {
            write_htpasswd(&dir.path().join("htpasswd"), user, password)?;
        }
        let mut registry = Self {
            dir,
            port: 0,
            credentials,
            remote,
            tls,
            token_server,
            child: Mutex::new(None),
            markers: AtomicU64::new(0),
        };
        // A port picked this way can be taken by someone else before the
        // registry binds it; try a few.
        let mut last_error = None;
        for _ in 0..5 {
            registry.port = free_port()?;
            registry.write_config()?;
            match registry.spawn_and_wait() {
                Ok(()) => return Ok(registry),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| KitError::Invalid("registry did not start".into())))
    }

    fn write_config(&self) -> Result<(), KitError> {
        let storage = self.storage_dir();
        let auth = match (&self.credentials, &self.token_server) {
            (Some(_), _) => format!(
                "auth:\n  htpasswd:\n    realm: lode-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ),
            (None, Some(server)) => server.registry_config(),
            (None, None) => String::new(),
        };
        let tls = if self.tls {
            self.make_certificate()?;
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                self.dir.path().join("cert.pem").display(),
                self.dir.path().join("key.pem").display()
            )
        } else {
            String::new()
        };
        let proxy = match &self.remote {
            Some(url) => format!("proxy:\n  remoteurl: {url}\n"),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{}\n  secret: lode-test-secret\n{tls}\
             {auth}{proxy}",
            storage.display(),
            self.port
        );
        let path = self.config_path();
        fs::write(&path, config).map_err(KitError::io(format!("write {}", path.display())))
    }

    /// The authority that signed the registry's certificate (PEM).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A test authority and a server certificate for 127.0.0.1 it signed.
    fn make_certificate(&self) -> Result<(), KitError> {
        let dir = self.dir.path();
        if dir.join("cert.pem").exists() {
            return Ok(());
        }
        let extensions = dir.join("leaf.ext");
        fs::write(
            &extensions,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(KitError::io("write leaf.ext"))?;
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let steps: [Vec<&str>; 3] = [
            [
                &["req", "-x509"][..],
                &key,
                &["-days", "2", "-subj", "/CN=lode test CA"],
            ]
            .concat(),
            [&["req"][..], &key, &["-subj", "/CN=127.0.0.1"]].concat(),
            vec!["x509", "-req", "-days", "2", "-CAcreateserial"],
        ];
        let files: [&[(&str, &str)]; 3] = [
            &[("-keyout", "ca.key"), ("-out", "ca.pem")],
            &[("-keyout", "key.pem"), ("-out", "leaf.csr")],
            &[
                ("-in", "leaf.csr"),
                ("-CA", "ca.pem"),
                ("-CAkey", "ca.key"),
                ("-extfile", "leaf.ext"),
                ("-out", "cert.pem"),
            ],
        ];
        for (args, files) in steps.iter().zip(files) {
            let mut command = Command::new("openssl");
            command.args(args).current_dir(dir);
            for (flag, file) in files {
                command.arg(flag).arg(file);
            }
            let output = command.output().map_err(KitError::io("run openssl"))?;
            if !output.status.success() {
                return Err(KitError::Command {
                    what: format!("openssl {args:?}"),
                    message: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    fn app_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn spawn_and_wait(&self) -> Result<(), KitError> {
        let open_log = |path: PathBuf| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(KitError::io(format!("open {}", path.display())))
        };
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(open_log(self.access_log_path())?)
            .stderr(open_log(self.app_log_path())?)
            .spawn()
            .map_err(KitError::io(format!("start {DOCKER_REGISTRY}")))?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let mut exited = None;
        let ready = wait_until(STARTUP_TIMEOUT, "the registry to answer GET /v2/", || {
            if let Some(status) = self.try_wait() {
                exited = Some(status);
                return true;
            }
            http_status(self.port, "/v2/", None).is_some()
        });
        if let Some(status) = exited {
            return Err(KitError::Command {
                what: format!("docker-registry on port {}", self.port),
                message: format!("exited with {status}: {}", self.app_log_tail(20)),
            });
        }
        ready.inspect_err(|_| self.kill())
    }

    fn try_wait(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let status = child.as_mut()?.try_wait().ok()??;
        *child = None;
        Some(status)
    }

    fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where it listens, for a [`crate::link::Link`] in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// A Lode registry client with this registry's credentials, if it has
    /// any (plain HTTP: the registry is on loopback).
    pub fn client(&self) -> lode_common::registry::RegistryClient {
        use lode_common::registry::{Credentials, RegistryClient, RegistryOptions};
        let credentials = self.credentials().map(|(username, password)| {
            let given = Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            };
            (self.host(), given)
        });
        RegistryClient::new(RegistryOptions {
            credentials: credentials.into_iter().collect(),
            ..RegistryOptions::default()
        })
        .expect("registry client")
    }

    /// `127.0.0.1:<port>/<repository_and_tag>` as a reference.
    pub fn reference(&self, repository_and_tag: &str) -> Reference {
        let text = format!("{}/{repository_and_tag}", self.host());
        text.parse()
            .unwrap_or_else(|e| panic!("bad test reference {text:?}: {e}"))
    }

    /// The user and password of a registry started with authentication.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The token server of a registry started with token authentication.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Writes a docker `config.json` with this registry's credentials.
    pub fn write_docker_config(&self, path: &Path) -> Result<(), KitError> {
        let (user, password) = self
            .credentials()
            .ok_or_else(|| KitError::Invalid("registry has no credentials".into()))?;
        write_docker_config(path, &self.host(), user, password)
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps blob `digest` (overwrite it to corrupt the blob).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(&hex)
            .join("data")
    }

    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
            && self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    /// Kills the registry (connections drop, new ones are refused).
    pub fn stop(&self) {
        self.kill();
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&self) -> Result<(), KitError> {
        self.kill();
        self.spawn_and_wait()
    }

    /// Freezes the registry (SIGSTOP): connections are accepted by the
    /// kernel but never answered, so clients must time out.
    pub fn pause(&self) -> Result<(), KitError> {
        self.signal(libc::SIGSTOP)
    }

    /// Undoes [`Self::pause`].
    pub fn resume(&self) -> Result<(), KitError> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<(), KitError> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let pid = child
            .as_ref()
            .ok_or_else(|| KitError::Invalid("registry is not running".into()))?
            .id();
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| KitError::Invalid(format!("pid {pid} out of range")))?;
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(KitError::io(format!("signal registry pid {pid}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// All requests logged so far, oldest first. While the registry runs,
    /// a marker request is sent first and awaited in the log, so requests
    /// that completed before this call are included. Marker requests are
    /// left out.
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        if self.is_running() {
            self.sync_log();
        }
        self.read_log()
            .into_iter()
            .filter(|e| !e.path.starts_with(MARKER_PATH))
            .collect()
    }

    /// Requests whose path contains `needle` (a digest, `/manifests/`, ...).
    pub fn requests_for(&self, needle: &str) -> Vec<AccessLogEntry> {
        self.requests()
            .into_iter()
            .filter(|e| e.path.contains(needle))
            .collect()
    }

    /// Body bytes the registry sent for requests whose path contains `needle`.
    pub fn bytes_served_for(&self, needle: &str) -> u64 {
        self.requests_for(needle).iter().map(|e| e.bytes).sum()
    }

    fn read_log(&self) -> Vec<AccessLogEntry> {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.access_log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        // A line still being written has no newline yet.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete.lines().filter_map(AccessLogEntry::parse).collect()
    }

    fn sync_log(&self) {
        let marker = format!(
            "{MARKER_PATH}{}",
            self.markers.fetch_add(1, Ordering::SeqCst)
        );
        if http_status(self.port, &marker, None).is_none() {
            return;
        }
        let _ = wait_until(Duration::from_secs(10), "the access log marker", || {
            self.read_log().iter().any(|e| e.path == marker)
        });
    }

    /// The last `lines` lines of the registry's own log (for diagnostics).
    pub fn app_log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.app_log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "--- docker-registry log (port {}) ---\n{}",
                self.port,
                self.app_log_tail(30)
            );
        }
        // A paused process must be continued to die promptly.
        let _ = self.resume();
        self.kill();
    }
}

/// Writes a docker `config.json` holding `user:password` for `registry`.
pub fn write_docker_config(
    path: &Path,
    registry: &str,
    user: &str,
    password: &str,
) -> Result<(), KitError> {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    fs::write(path, config.to_string()).map_err(KitError::io(format!("write {}", path.display())))
}

fn write_htpasswd(path: &Path, user: &str, password: &str) -> Result<(), KitError> {
    let output = Command::new(HTPASSWD)
        .args(["-B", "-b", "-n", user, password])
        .output()
        .map_err(KitError::io(format!(
            "run {HTPASSWD} (apt-get install apache2-utils)"
        )))?;
    if !output.status.success() {
        return Err(KitError::Command {
            what: HTPASSWD.to_owned(),
            message: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    fs::write(path, &output.stdout).map_err(KitError::io(format!("write {}", path.display())))
}

fn free_port() -> Result<u16, KitError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(KitError::io("bind a free port"))?;
    let port = listener
        .local_addr()
        .map_err(KitError::io("read a free port"))?
        .port();
    Ok(port)
}

/// Status of `GET path` on the registry, or `None` if it does not answer.
pub(crate) fn http_status(port: u16, path: &str, authorization: Option<&str>) -> Option<u16> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let authorization = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let _ = stream.shutdown(Shutdown::Write);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    // An HTTPS registry answers plain HTTP with an HTTP/1.0 400: it is up.
    text.strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let line = r#"127.0.0.1 - - [23/Nov/2026:20:49:53 +0000] "GET /v2/foo/blobs/sha256:ab HTTP/1.1" 206 4096 "" "lode/0.1.0""#;
        let entry = AccessLogEntry::parse(line).unwrap();
        assert_eq!(entry.method, "GET");
        assert_eq!(entry.path, "/v2/foo/blobs/sha256:ab");
        assert_eq!(entry.status, 206);
        assert_eq!(entry.bytes, 4096);
        assert_eq!(entry.user_agent, "lode/0.1.0");
        let head = r#"127.0.0.1 - alice [23/Nov/2026:20:49:53 +0000] "HEAD /v2/x HTTP/1.1" 404 - "" "curl""#;
        assert_eq!(AccessLogEntry::parse(head).unwrap().bytes, 0);
        assert_eq!(
            AccessLogEntry::parse("time=\"...\" level=info msg=\"listening\""),
            None
        );
    }
}
