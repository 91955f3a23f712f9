//! A token server for `docker-registry`'s token authentication (`auth:
//! token:`, the Docker registry token specification), on a free loopback
//! port: it grants every scope a client asks for, to anyone, in ES256 JSON
//! web tokens that stop working a configurable time after they are issued.
//! What it issued is recorded so tests can assert that clients came back
//! for new tokens; it can be stopped and started again on the same port.
//!
//! The signing key and its self-signed certificate (EC P-256) are made by
//! `openssl` at start; tokens name the certificate in their `x5c` header
//! and the registry trusts it through `rootcertbundle`.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::KitError;

/// The registry's `service` (the tokens' audience).
pub const SERVICE: &str = "lode-test-registry";
/// The tokens' issuer.
pub const ISSUER: &str = "lode-test-token-server";
/// distribution 2.8 (`registry/auth/token/token.go`, `Leeway`) accepts a
/// token until 60 s after its `exp` claim (and from 60 s before its
/// `nbf`), for clock skew. Tokens are issued with `exp` that much before
/// the moment they should stop working, so that they really expire after
/// the server's TTL of a few seconds rather than a minute later.
pub const REGISTRY_LEEWAY_SECS: u64 = 60;
/// Longest request (line and headers) the server reads.
const MAX_REQUEST: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One token the server handed out.
#[derive(Clone)]
pub struct IssuedToken {
    pub issued_at: SystemTime,
    /// From this instant on the registry refuses the token.
    pub expires_at: SystemTime,
    /// The scopes granted (`repository:NAME:ACTIONS`).
    pub scopes: Vec<String>,
    token: String,
}

impl IssuedToken {
    /// The token itself (for probes; never print it).
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

struct State {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// The certificate, base64 DER, for the tokens' `x5c` header.
    certificate: String,
    ttl_secs: AtomicU64,
    issued: Mutex<Vec<IssuedToken>>,
}

struct Serving {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

/// A running (or stopped) token server; stopped on drop.
pub struct TokenServer {
    dir: tempfile::TempDir,
    port: u16,
    state: Arc<State>,
    serving: Mutex<Option<Serving>>,
}

impl TokenServer {
    /// Starts a server issuing tokens that work for `ttl` (whole seconds,
    /// at least one).
    pub fn start(ttl: Duration) -> Result<Self, KitError> {
        let dir = tempfile::Builder::new()
            .prefix("lode-token-server-")
            .tempdir()
            .map_err(KitError::io("create token server directory"))?;
        make_key_and_certificate(dir.path())?;
        let read = |name: &str| {
            let path = dir.path().join(name);
            fs::read(&path).map_err(KitError::io(format!("read {}", path.display())))
        };
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &read("key.p8")?, &rng)
                .map_err(|e| KitError::Invalid(format!("token signing key: {e}")))?;
        let state = Arc::new(State {
            key,
            rng,
            certificate: STANDARD.encode(read("cert.der")?),
            ttl_secs: AtomicU64::new(0),
            issued: Mutex::new(Vec::new()),
        });
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(KitError::io("bind the token server"))?;
        let port = listener
            .local_addr()
            .map_err(KitError::io("token server address"))?
            .port();
        let server = Self {
            dir,
            port,
            state,
            serving: Mutex::new(None),
        };
        server.set_ttl(ttl);
        server.serve(listener);
        Ok(server)
    }

    /// How long tokens issued from now on work (whole seconds, at least one).
    pub fn set_ttl(&self, ttl: Duration) {
        self.state
            .ttl_secs
            .store(ttl.as_secs().max(1), Ordering::SeqCst);
    }

    /// `http://127.0.0.1:<port>/token`
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The `auth:` section of a registry configuration trusting this server.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
             rootcertbundle: {}\n",
            self.realm(),
            self.dir.path().join("cert.pem").display()
        )
    }

    /// Every token issued so far, oldest first.
    pub fn issued(&self) -> Vec<IssuedToken> {
        self.state
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many tokens were issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.state
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Stops serving: the port is closed, connections are refused.
    pub fn stop(&self) {
        let Some(serving) = self
            .serving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        serving.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then drops the listener.
        let _ = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), IO_TIMEOUT);
        let _ = serving.thread.join();
    }

    /// Serves again on the same port.
    pub fn restart(&self) -> Result<(), KitError> {
        self.stop();
        let listener = TcpListener::bind(("127.0.0.1", self.port)).map_err(KitError::io(
            format!("bind the token server on {}", self.port),
        ))?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::clone(&self.state);
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = Arc::clone(&state);
                std::thread::spawn(move || {
                    let _ = handle(stream, &state);
                });
            }
        });
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(Serving { thread, stop });
    }
}

impl crate::Registry {
    /// Status of `GET path` sent with `Authorization: Bearer <token>`, or
    /// `None` if the registry does not answer.
    pub fn status_with_token(&self, path: &str, token: &str) -> Option<u16> {
        crate::registry::http_status(self.port(), path, Some(&format!("Bearer {token}")))
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An EC P-256 key (PKCS#8 DER, `key.p8`) and a self-signed certificate
/// for it (`cert.pem`, `cert.der`).
fn make_key_and_certificate(dir: &Path) -> Result<(), KitError> {
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lode test token issuer",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.p8",
        ],
        &[
            "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
        ],
    ];
    for args in steps {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(KitError::io("run openssl"))?;
        if !output.status.success() {
            return Err(KitError::Command {
                what: format!("openssl {}", args[0]),
                message: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

/// Answers one request: `GET /token?service=S&scope=...` with a token, or
/// an error status.
fn handle(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let line = text.lines().next().unwrap_or_default();
    let (status, body) = match answer(line, state) {
        Ok(body) => ("200 OK", body),
        Err((status, message)) => (status, serde_json::json!({ "error": message }).to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

fn answer(line: &str, state: &State) -> Result<String, (&'static str, String)> {
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" || path != "/token" {
        return Err(("404 Not Found", format!("no {method} {path}")));
    }
    let mut scopes = Vec::new();
    let mut service = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            // One parameter may hold several scopes, separated by spaces.
            "scope" => scopes.extend(
                value
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "service" => service = Some(value),
            _ => {}
        }
    }
    if service.as_deref() != Some(SERVICE) {
        return Err(("400 Bad Request", format!("unknown service {service:?}")));
    }
    let (token, ttl) = issue(state, scopes).map_err(|e| ("500 Internal Server Error", e))?;
    Ok(serde_json::json!({ "token": token, "access_token": token, "expires_in": ttl }).to_string())
}

/// Signs a token granting `scopes` and records it; returns it and its TTL.
fn issue(state: &State, scopes: Vec<String>) -> Result<(String, u64), String> {
    let ttl = state.ttl_secs.load(Ordering::SeqCst);
    let now = SystemTime::now();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    // The registry accepts the token while `now ≤ exp + leeway` (whole
    // seconds): it stops working at `now_secs + ttl`.
    let exp = i128::from(now_secs) + i128::from(ttl) - i128::from(REGISTRY_LEEWAY_SECS);
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            // `type:name:actions`; a name may hold a `:` (a port).
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let actions: Vec<&str> = actions.split(',').collect();
            Some(serde_json::json!({ "type": kind, "name": name, "actions": actions }))
        })
        .collect();
    let mut issued = state.issued.lock().unwrap_or_else(|p| p.into_inner());
    let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "x5c": [state.certificate] });
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "anonymous", "aud": SERVICE,
        "exp": exp, "nbf": now_secs, "iat": now_secs,
        "jti": format!("lode-test-{}", issued.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = state
        .key
        .sign(&state.rng, signing_input.as_bytes())
        .map_err(|e| format!("sign a token: {e}"))?;
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature));
    issued.push(IssuedToken {
        issued_at: now,
        expires_at: UNIX_EPOCH + Duration::from_secs(now_secs + ttl),
        scopes,
        token: token.clone(),
    });
    Ok((token, ttl))
}

/// `application/x-www-form-urlencoded` value decoding.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(
            percent_decode("repository%3Aa%2Fb%3Apull%2Cpush+x"),
            "repository:a/b:pull,push x"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
