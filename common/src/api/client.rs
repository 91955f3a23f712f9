//! A typed client for the lode-fsd API: HTTP/1.1 over the daemon's unix
//! socket, one connection per call (calls are rare and the daemon may be
//! replaced between two of them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::query::encode;
use super::types::*;
use super::API_PREFIX;

/// Largest response body the client accepts.
const MAX_RESPONSE: usize = 16 << 20;
/// How long one call may take unless the client is given its own deadline.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {uri} on {path}: {source}")]
    Http {
        method: Method,
        uri: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The daemon answered with an error body.
    #[error("{method} {uri}: {status} {code}: {message}")]
    Api {
        method: Method,
        uri: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{method} {uri}: cannot decode the answer: {source}")]
    Decode {
        method: Method,
        uri: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("daemon at {path} did not reach state {wanted} in time (last: {last})")]
    StateTimeout {
        path: PathBuf,
        wanted: String,
        last: String,
    },
    #[error("daemon at {path} exited before reaching state {wanted}")]
    Exited { path: PathBuf, wanted: String },
    /// The daemon accepted the call but did not answer within the deadline
    /// (stopped, or stuck): it is taken for hung.
    #[error("{method} {uri} on {path}: no answer within {after:?}")]
    Timeout {
        method: Method,
        uri: String,
        path: PathBuf,
        after: Duration,
    },
}

impl ClientError {
    /// The API error code, when the daemon answered with one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the daemon missed the call's deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

/// How long [`DaemonClient::wait_for_states`] asks every [`EAGER_PAUSE`].
const EAGER_POLLING: Duration = Duration::from_millis(250);
/// How often it asks meanwhile.
const EAGER_PAUSE: Duration = Duration::from_millis(2);

/// Talks to one daemon's API socket. Every call has a deadline (connect,
/// request and the whole answer).
#[derive(Clone, Debug)]
pub struct DaemonClient {
    socket: PathBuf,
    timeout: Duration,
}

fn mountpoint_query(mountpoint: &Path) -> String {
    format!("mountpoint={}", encode(&mountpoint.to_string_lossy()))
}

fn id_query(id: Option<&str>) -> String {
    id.map(|id| format!("?id={}", encode(id)))
        .unwrap_or_default()
}

impl DaemonClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn daemon_info(&self) -> Result<DaemonInfo, ClientError> {
        self.call(Method::GET, "/daemon", None::<&()>).await
    }

    pub async fn mount(
        &self,
        mountpoint: &Path,
        request: &MountRequest,
    ) -> Result<(), ClientError> {
        let uri = format!("/mount?{}", mountpoint_query(mountpoint));
        self.call_empty(Method::POST, &uri, Some(request)).await
    }

    pub async fn remount(
        &self,
        mountpoint: &Path,
        request: &MountRequest,
    ) -> Result<(), ClientError> {
        let uri = format!("/mount?{}", mountpoint_query(mountpoint));
        self.call_empty(Method::PUT, &uri, Some(request)).await
    }

    /// Asks the daemon to fetch data blob fronts ahead of a mount.
    pub async fn ahead(&self, request: &AheadRequest) -> Result<(), ClientError> {
        self.call_empty(Method::PUT, "/ahead", Some(request)).await
    }

    pub async fn umount(&self, mountpoint: &Path) -> Result<(), ClientError> {
        let uri = format!("/mount?{}", mountpoint_query(mountpoint));
        self.call_empty(Method::DELETE, &uri, None::<&()>).await
    }

    pub async fn fs_metrics(&self, id: Option<&str>) -> Result<FsMetrics, ClientError> {
        self.call(
            Method::GET,
            &format!("/metrics{}", id_query(id)),
            None::<&()>,
        )
        .await
    }

    pub async fn cache_metrics(&self, id: Option<&str>) -> Result<CacheMetrics, ClientError> {
        let uri = format!("/metrics/cache{}", id_query(id));
        self.call(Method::GET, &uri, None::<&()>).await
    }

    pub async fn backend_metrics(&self, id: Option<&str>) -> Result<BackendMetrics, ClientError> {
        let uri = format!("/metrics/backend{}", id_query(id));
        self.call(Method::GET, &uri, None::<&()>).await
    }

    /// `GET /access?id=`: the files and chunks the instance's readers read.
    pub async fn access(&self, id: Option<&str>) -> Result<InstanceAccess, ClientError> {
        let uri = format!("/access{}", id_query(id));
        self.call(Method::GET, &uri, None::<&()>).await
    }

    pub async fn inflight(&self) -> Result<InflightMetrics, ClientError> {
        self.call(Method::GET, "/metrics/inflight", None::<&()>)
            .await
    }

    pub async fn start(&self) -> Result<(), ClientError> {
        self.call_empty(Method::PUT, "/daemon/start", None::<&()>)
            .await
    }

    /// Asks the daemon to exit without unmounting (for a hand-over).
    pub async fn exit(&self) -> Result<(), ClientError> {
        self.call_empty(Method::PUT, "/daemon/exit", None::<&()>)
            .await
    }

    pub async fn send_fd(&self) -> Result<(), ClientError> {
        self.call_empty(Method::PUT, "/daemon/fuse/sendfd", None::<&()>)
            .await
    }

    pub async fn takeover(&self) -> Result<(), ClientError> {
        self.call_empty(Method::PUT, "/daemon/fuse/takeover", None::<&()>)
            .await
    }

    /// Polls the daemon until it reports `wanted`, the deadline passes, or
    /// it reports STOPPED (from which no state follows). Connection errors
    /// are retried: the daemon may not be listening yet.
    pub async fn wait_for_state(
        &self,
        wanted: DaemonState,
        deadline: Instant,
    ) -> Result<DaemonInfo, ClientError> {
        self.wait_for_states(&[wanted], deadline, || false).await
    }

    /// [`DaemonClient::wait_for_state`] for any of `wanted`; also gives up
    /// as soon as `exited()` says the daemon's process is gone.
    ///
    /// A starting daemon serves within a few tens of milliseconds, and an
    /// image's first container waits for it: for the first 250 ms the
    /// daemon is asked every 2 ms (a probe of a socket nobody listens on yet
    /// costs microseconds), then ever less often.
    pub async fn wait_for_states(
        &self,
        wanted: &[DaemonState],
        deadline: Instant,
        exited: impl Fn() -> bool,
    ) -> Result<DaemonInfo, ClientError> {
        let started = Instant::now();
        let mut pause = EAGER_PAUSE;
        loop {
            if exited() {
                return Err(ClientError::Exited {
                    path: self.socket.clone(),
                    wanted: states_text(wanted),
                });
            }
            // No probe outlives the deadline of the wait.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let probe = self
                .clone()
                .with_timeout(self.timeout.min(remaining.max(Duration::from_millis(50))));
            let last = match probe.daemon_info().await {
                Ok(info) if wanted.contains(&info.state) => return Ok(info),
                Ok(info) if info.state == DaemonState::Stopped => {
                    return Err(self.state_timeout(wanted, "STOPPED".into()))
                }
                Ok(info) => info.state.to_string(),
                Err(e) => e.to_string(),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(self.state_timeout(wanted, last));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            if now.duration_since(started) >= EAGER_POLLING {
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }

    fn state_timeout(&self, wanted: &[DaemonState], last: String) -> ClientError {
        ClientError::StateTimeout {
            path: self.socket.clone(),
            wanted: states_text(wanted),
            last,
        }
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let (uri, bytes) = self.send(method.clone(), uri, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            uri,
            source,
        })
    }

    async fn call_empty<B: Serialize>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        self.send(method, uri, body).await.map(|_| ())
    }

    /// Sends one request on a new connection; returns the full URI and the
    /// body of a 2xx answer, or the decoded error of any other. The whole
    /// exchange is bounded by the client's deadline.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<(String, Bytes), ClientError> {
        let exchange = self.exchange(method.clone(), uri, body);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                method,
                uri: format!("{API_PREFIX}{uri}"),
                path: self.socket.clone(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange<B: Serialize>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&B>,
    ) -> Result<(String, Bytes), ClientError> {
        let uri = format!("{API_PREFIX}{uri}");
        let http = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Http {
            method: method.clone(),
            uri: uri.clone(),
            path: self.socket.clone(),
            source,
        };
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| http(e.into()))?),
            None => Bytes::new(),
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
        // Drives the connection until the exchange ends, or is given up at
        // the deadline (the guard aborts it either way).
        let _driver = AbortOnDrop(tokio::spawn(conn));
        let request = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(hyper::header::HOST, "lode-fsd")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .map_err(|e| http(e.into()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| http(e.into()))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(http)?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        }
        .await;
        let (status, bytes) = result?;
        if status.is_success() {
            return Ok((uri, bytes));
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => (e.code, e.message),
            Err(_) => (
                "unknown".to_owned(),
                String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            ),
        };
        Err(ClientError::Api {
            method,
            uri,
            status,
            code,
            message,
        })
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn states_text(states: &[DaemonState]) -> String {
    states
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}
