//! One shared HTTP client plus the policy every registry request follows:
//! a deadline, retries with exponential backoff on transient failures, one
//! re-authentication on 401, and the mapping of failures to [`RegistryError`].

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};

use super::auth::{Authenticator, Scope};
use super::{Reference, RegistryError, RegistryOptions};
use crate::Digest;

pub(crate) const USER_AGENT: &str = concat!("lode/", env!("CARGO_PKG_VERSION"));

/// First retry delay; doubled on every further retry up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How much of an error response body ends up in the error message.
const MAX_ERROR_BODY: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

/// What an operation is about; formatted only when an error is reported.
#[derive(Clone, Copy)]
pub(crate) enum Target<'a> {
    Manifest(&'a Reference),
    Blob(&'a Digest),
    BlobRange {
        digest: &'a Digest,
        offset: u64,
        len: u64,
    },
    BlobUpload(&'a Digest),
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Manifest(reference) => write!(f, "manifest {}", reference.manifest_selector()),
            Target::Blob(digest) => write!(f, "blob {digest}"),
            Target::BlobRange {
                digest,
                offset,
                len,
            } => {
                write!(
                    f,
                    "blob {digest} bytes {offset}..{}",
                    offset.saturating_add(*len)
                )
            }
            Target::BlobUpload(digest) => write!(f, "upload of blob {digest}"),
        }
    }
}

/// Runs `$body` (an attempt, evaluating to `Result<T, AttemptError>`, with
/// the Authorization header to send bound to `$auth`) until it succeeds or
/// [`Attempts::outcome`] gives up; evaluates to `T` and returns the
/// [`RegistryError`] from the enclosing function otherwise.
///
/// A loop rather than a closure-taking helper: futures of async closures
/// cannot currently be proven `Send`, and callers spawn these operations.
macro_rules! retrying {
    // `progress` counts what the operation has kept so far (bytes): an
    // attempt that moved it on failed having delivered, so the retries
    // start afresh (see [`Attempts::progressed`]).
    ($transport:expr, $endpoint:expr, $target:expr, progress = $progress:ident, |$auth:ident| $body:block) => {{
        let mut attempts = $transport.attempts($endpoint, $target);
        loop {
            let $auth = attempts.auth();
            let before = $progress;
            let result: Result<_, $crate::registry::transport::AttemptError> = async $body.await;
            if $progress > before {
                attempts.progressed();
            }
            if let Some(value) = attempts.outcome(result).await? {
                break value;
            }
        }
    }};
    ($transport:expr, $endpoint:expr, $target:expr, |$auth:ident| $body:block) => {{
        let mut attempts = $transport.attempts($endpoint, $target);
        loop {
            let $auth = attempts.auth();
            let result: Result<_, $crate::registry::transport::AttemptError> = async $body.await;
            if let Some(value) = attempts.outcome(result).await? {
                break value;
            }
        }
    }};
}
pub(crate) use retrying;

/// Why one attempt failed; [`Attempts`] decides whether to retry.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// The registry answered with an unexpected status.
    Status { status: StatusCode, message: String },
    /// A 401 with the registry's challenge (`WWW-Authenticate`), which
    /// says how to authenticate without asking for it again.
    Challenged { message: String, challenge: String },
    /// Connecting, sending or receiving failed.
    Transport(reqwest::Error),
    /// A deadline enforced outside reqwest elapsed.
    Timeout,
    /// Authentication was refused.
    Denied(String),
    /// Not worth retrying (digest mismatch, short range, local I/O...).
    Fatal(RegistryError),
    /// The HTTP client for authentication could not be built.
    Setup(String),
}

impl AttemptError {
    fn is_transient(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            AttemptError::Transport(e) => {
                !e.is_builder() && !e.is_redirect() && !super::tls::is_tls_refusal(e)
            }
            AttemptError::Timeout => true,
            AttemptError::Challenged { .. }
            | AttemptError::Denied(_)
            | AttemptError::Fatal(_)
            | AttemptError::Setup(_) => false,
        }
    }

    fn into_error(
        self,
        reference: &Reference,
        target: &Target<'_>,
        timeout: Duration,
    ) -> RegistryError {
        let reference_text = reference.to_string();
        match self {
            AttemptError::Status { status, message } => match status {
                StatusCode::NOT_FOUND => RegistryError::NotFound {
                    reference: reference_text,
                    what: target.to_string(),
                },
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
                    reference: reference_text,
                    message: format!("{target}: HTTP {status}: {message}"),
                },
                _ => RegistryError::Request {
                    reference: reference_text,
                    what: target.to_string(),
                    message: format!("HTTP {status}: {message}"),
                },
            },
            // Refused like any 401 once re-authentication did not help.
            AttemptError::Challenged { message, .. } => AttemptError::Status {
                status: StatusCode::UNAUTHORIZED,
                message,
            }
            .into_error(reference, target, timeout),
            AttemptError::Transport(e) if e.is_timeout() => RegistryError::Timeout {
                reference: reference_text,
                what: target.to_string(),
                timeout,
            },
            AttemptError::Transport(e) => RegistryError::Request {
                reference: reference_text,
                what: target.to_string(),
                message: error_chain(&e),
            },
            AttemptError::Timeout => RegistryError::Timeout {
                reference: reference_text,
                what: target.to_string(),
                timeout,
            },
            AttemptError::Denied(message) => RegistryError::Unauthorized {
                reference: reference_text,
                message: format!("{target}: {message}"),
            },
            AttemptError::Fatal(e) => e,
            AttemptError::Setup(message) => RegistryError::Request {
                reference: reference_text,
                what: "client setup".to_owned(),
                message,
            },
        }
    }
}

impl From<reqwest::Error> for AttemptError {
    fn from(e: reqwest::Error) -> Self {
        AttemptError::Transport(e)
    }
}

/// reqwest's top-level message hides the interesting part ("connection
/// refused") in its sources.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Where one repository lives and how to authorize against it.
pub(crate) struct Endpoint<'a> {
    pub reference: &'a Reference,
    /// `scheme://host[:port]/v2/<repository>`
    pub base: String,
    pub scope: Scope<'a>,
}

impl Endpoint<'_> {
    pub(crate) fn blob_url(&self, digest: &Digest) -> String {
        format!("{}/blobs/{digest}", self.base)
    }

    pub(crate) fn manifest_url(&self, selector: &str) -> String {
        format!("{}/manifests/{selector}", self.base)
    }

    pub(crate) fn upload_url(&self) -> String {
        format!("{}/blobs/uploads/", self.base)
    }
}

pub(crate) struct Transport {
    pub http: reqwest::Client,
    pub options: RegistryOptions,
    pub auth: Authenticator,
}

impl Transport {
    pub(crate) fn new(options: RegistryOptions, auth: Authenticator) -> Result<Self, String> {
        let tls = super::tls::client_config(&options.tls)
            .map_err(|e| format!("cannot set up TLS for the HTTP client: {e}"))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in options.headers.iter() {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            let mut value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|e| format!("header {name}: {e}"))?;
            // A host's headers may be credentials (a mirror's token).
            value.set_sensitive(true);
            headers.append(name, value);
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .user_agent(USER_AGENT)
            .connect_timeout(options.request_timeout)
            // Detects a stalled body even on transfers without a total deadline.
            .read_timeout(options.request_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        Ok(Self {
            http,
            options,
            auth,
        })
    }

    pub(crate) fn endpoint<'a>(&self, reference: &'a Reference, access: Access) -> Endpoint<'a> {
        let plain_http =
            !self.options.tls.required && (self.options.plain_http || reference.is_loopback());
        let scheme = if plain_http { "http" } else { "https" };
        // Docker Hub's API is not served under the name users write.
        let host = match reference.registry.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        };
        Endpoint {
            reference,
            base: format!("{scheme}://{host}/v2/{}", reference.repository),
            scope: Scope {
                endpoint: host,
                registry: &reference.registry,
                repository: &reference.repository,
                access,
                plain_http,
            },
        }
    }

    /// A request with the usual deadline, covering the response body.
    pub(crate) fn request(
        &self,
        method: Method,
        url: &str,
        auth: Option<&HeaderValue>,
    ) -> RequestBuilder {
        self.unbounded_request(method, url, auth)
            .timeout(self.options.request_timeout)
    }

    /// A request whose body may take longer than one deadline; stalls are
    /// still caught by the client's read timeout.
    pub(crate) fn unbounded_request(
        &self,
        method: Method,
        url: &str,
        auth: Option<&HeaderValue>,
    ) -> RequestBuilder {
        let builder = self.http.request(method, url);
        match auth {
            Some(value) => builder.header(AUTHORIZATION, value.clone()),
            None => builder,
        }
    }

    /// Like [`Self::request`] for a URL the registry handed out (upload
    /// locations): credentials go only to the registry itself.
    pub(crate) fn request_to_location(
        &self,
        method: Method,
        location: &Url,
        endpoint: &Endpoint<'_>,
        auth: Option<&HeaderValue>,
    ) -> RequestBuilder {
        let same_origin = Url::parse(&endpoint.base).is_ok_and(|base| {
            base.scheme() == location.scheme()
                && base.host_str() == location.host_str()
                && base.port_or_known_default() == location.port_or_known_default()
        });
        let auth = if same_origin { auth } else { None };
        self.request(method, location.as_str(), auth)
    }

    /// Retry bookkeeping for one operation; see [`Attempts`].
    pub(crate) fn attempts<'a>(
        &'a self,
        endpoint: &'a Endpoint<'a>,
        target: Target<'a>,
    ) -> Attempts<'a> {
        Attempts {
            transport: self,
            endpoint,
            target,
            retries: 0,
            reauthenticated: false,
            auth: None,
            started: std::time::Instant::now(),
            progressed: false,
        }
    }
}

/// Retry state of one operation (see [`retrying!`]): transient failures
/// are retried with exponential backoff, a 401 leads to one
/// re-authentication, anything else becomes a [`RegistryError`].
///
/// Retries are counted from the last attempt that delivered something: a
/// link that keeps breaking but keeps delivering (every connection cut
/// after some bytes) still completes, retrying at once after each piece.
/// Such retries end when the operation has taken as long as all of its
/// attempts could without progress (`request_timeout × (max_retries + 1)`).
pub(crate) struct Attempts<'a> {
    transport: &'a Transport,
    endpoint: &'a Endpoint<'a>,
    target: Target<'a>,
    retries: u32,
    reauthenticated: bool,
    auth: Option<HeaderValue>,
    started: std::time::Instant,
    /// The attempt that just failed had delivered something.
    progressed: bool,
}

impl Attempts<'_> {
    /// The Authorization header to send with the next attempt.
    pub(crate) fn auth(&mut self) -> Option<HeaderValue> {
        self.auth = self.transport.auth.header(&self.endpoint.scope);
        self.auth.clone()
    }

    /// The attempt about to be judged delivered something.
    pub(crate) fn progressed(&mut self) {
        self.progressed = true;
    }

    /// How long the operation may go on retrying after progress.
    fn budget(&self) -> Duration {
        let options = &self.transport.options;
        options
            .request_timeout
            .saturating_mul(options.max_retries.saturating_add(1))
    }

    /// `Ok(Some(value))` on success, `Ok(None)` to make another attempt
    /// (after backing off or re-authenticating), `Err` to give up.
    pub(crate) async fn outcome<T>(
        &mut self,
        result: Result<T, AttemptError>,
    ) -> Result<Option<T>, RegistryError> {
        let error = match result {
            Ok(value) => return Ok(Some(value)),
            Err(error) => error,
        };
        let max_retries = self.transport.options.max_retries;
        let challenge = match &error {
            AttemptError::Challenged { challenge, .. } => Some(Some(challenge.as_str())),
            AttemptError::Status {
                status: StatusCode::UNAUTHORIZED,
                ..
            } => Some(None),
            _ => None,
        };
        if let Some(challenge) = challenge {
            if !self.reauthenticated {
                self.reauthenticated = true;
                let refreshed = self
                    .transport
                    .auth
                    .refresh(&self.endpoint.scope, self.auth.as_ref(), challenge)
                    .await;
                match refreshed {
                    Ok(()) => return Ok(None),
                    Err(auth_error) if auth_error.is_transient() && self.retries < max_retries => {
                        self.backoff(&auth_error).await;
                        self.reauthenticated = false;
                        return Ok(None);
                    }
                    Err(auth_error) => return Err(self.fail(auth_error)),
                }
            }
        }
        let progressed = std::mem::take(&mut self.progressed);
        if error.is_transient() && progressed && self.started.elapsed() < self.budget() {
            self.retries = 0;
            tracing::debug!(
                reference = %self.endpoint.reference,
                target = %self.target,
                error = %describe(&error),
                "registry transfer broke after delivering; resuming at once"
            );
            return Ok(None);
        }
        if error.is_transient() && self.retries < max_retries {
            self.backoff(&error).await;
            return Ok(None);
        }
        Err(self.fail(error))
    }

    fn fail(&self, error: AttemptError) -> RegistryError {
        error.into_error(
            self.endpoint.reference,
            &self.target,
            self.transport.options.request_timeout,
        )
    }

    async fn backoff(&mut self, error: &AttemptError) {
        let delay = backoff_delay(self.retries);
        self.retries += 1;
        tracing::warn!(
            reference = %self.endpoint.reference,
            target = %self.target,
            retry = self.retries,
            max_retries = self.transport.options.max_retries,
            delay_ms = delay.as_millis() as u64,
            error = %describe(error),
            "registry request failed, retrying"
        );
        tokio::time::sleep(delay).await;
    }
}

fn describe(error: &AttemptError) -> String {
    match error {
        AttemptError::Status { status, message } => format!("HTTP {status}: {message}"),
        AttemptError::Challenged { message, .. } => describe(&AttemptError::Status {
            status: StatusCode::UNAUTHORIZED,
            message: message.clone(),
        }),
        AttemptError::Transport(e) => error_chain(e),
        AttemptError::Timeout => "deadline exceeded".to_owned(),
        AttemptError::Denied(message) => message.clone(),
        AttemptError::Fatal(e) => e.to_string(),
        AttemptError::Setup(message) => message.clone(),
    }
}

pub(crate) fn backoff_delay(retry: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF)
}

/// Returns the response if its status is one of `expected`, otherwise an
/// [`AttemptError::Status`] carrying the registry's error message.
pub(crate) async fn expect_status(
    response: Response,
    expected: &[StatusCode],
) -> Result<Response, AttemptError> {
    if expected.contains(&response.status()) {
        return Ok(response);
    }
    Err(status_error(response).await)
}

/// An [`AttemptError::Status`] for `response`, with the registry's message
/// (an [`AttemptError::Challenged`] for a 401 that says how to authenticate).
pub(crate) async fn status_error(response: Response) -> AttemptError {
    let status = response.status();
    let challenge = (status == StatusCode::UNAUTHORIZED)
        .then(|| response.headers().get(reqwest::header::WWW_AUTHENTICATE))
        .flatten()
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let message = error_message(response).await;
    match challenge {
        Some(challenge) => AttemptError::Challenged { message, challenge },
        None => AttemptError::Status { status, message },
    }
}

/// The OCI error envelope's codes and messages, or the start of the body.
async fn error_message(mut response: Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    error_body_message(&body)
}

/// The message of a registry's error response body: the codes and messages
/// of an OCI error envelope (`{"errors":[{"code","message"}]}`), else the
/// body's text, trimmed.
pub fn error_body_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<EnvelopeError>,
    }
    #[derive(serde::Deserialize)]
    struct EnvelopeError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(body) {
        let parts: Vec<String> = envelope
            .errors
            .into_iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(no message)".to_owned()
    } else {
        text.to_owned()
    }
}

/// Resolves an upload `Location` header against the request URL.
pub(crate) fn location(response: &Response) -> Result<Url, AttemptError> {
    let header = response
        .headers()
        .get(reqwest::header::LOCATION)
        .ok_or_else(|| AttemptError::Status {
            status: response.status(),
            message: "registry sent no Location header for the upload".to_owned(),
        })?;
    let text = header.to_str().map_err(|_| AttemptError::Status {
        status: response.status(),
        message: "upload Location header is not text".to_owned(),
    })?;
    response.url().join(text).map_err(|e| AttemptError::Status {
        status: response.status(),
        message: format!("invalid upload Location {text:?}: {e}"),
    })
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_limited(
    mut response: Response,
    limit: usize,
) -> Result<Bytes, AttemptError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(AttemptError::Status {
                status: response.status(),
                message: format!("response body larger than {limit} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_delay(0), Duration::from_millis(100));
        assert_eq!(backoff_delay(1), Duration::from_millis(200));
        assert_eq!(backoff_delay(2), Duration::from_millis(400));
        assert_eq!(backoff_delay(10), MAX_BACKOFF);
        assert_eq!(backoff_delay(40), MAX_BACKOFF);
    }

    #[test]
    fn transient_statuses() {
        let status = |code: u16| AttemptError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            message: String::new(),
        };
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(status(code).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 416] {
            assert!(!status(code).is_transient(), "{code}");
        }
        assert!(AttemptError::Timeout.is_transient());
        assert!(!AttemptError::Denied(String::new()).is_transient());
    }

    #[test]
    fn statuses_map_to_typed_errors_naming_reference_and_digest() {
        let reference: Reference = "127.0.0.1:5000/app:v1".parse().unwrap();
        let digest = Digest::of(b"x");
        let target = Target::Blob(&digest);
        let err = |code: u16| {
            AttemptError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                message: "msg".into(),
            }
            .into_error(&reference, &target, Duration::from_secs(1))
        };
        let not_found = err(404);
        assert!(matches!(not_found, RegistryError::NotFound { .. }));
        let text = not_found.to_string();
        assert!(
            text.contains("127.0.0.1:5000/app:v1") && text.contains(&digest.to_string()),
            "{text}"
        );
        assert!(matches!(err(401), RegistryError::Unauthorized { .. }));
        assert!(matches!(err(403), RegistryError::Unauthorized { .. }));
        assert!(matches!(err(500), RegistryError::Request { .. }));
        let timeout = AttemptError::Timeout.into_error(&reference, &target, Duration::from_secs(1));
        assert!(matches!(timeout, RegistryError::Timeout { .. }));
        assert!(timeout.to_string().contains(&digest.to_string()));
    }

    #[test]
    fn range_target_names_the_range() {
        let digest = Digest::of(b"x");
        let text = Target::BlobRange {
            digest: &digest,
            offset: 10,
            len: 5,
        }
        .to_string();
        assert!(
            text.contains("bytes 10..15") && text.contains(&digest.to_string()),
            "{text}"
        );
    }
}
