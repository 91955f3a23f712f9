//! Serves the API over a unix socket (mode 0600) with hyper, on the daemon's
//! tokio runtime. Each request body is read up to [`MAX_BODY`]; the control
//! call runs on a blocking thread because mounting does I/O.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nix::sys::socket::{Backlog, SockType};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use super::parse::HttpError;
use super::router::{handle, Reply};
use super::{DaemonControl, MAX_BODY};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (replacing a stale socket file) with mode 0600 from the
/// start. Must be called inside the runtime that will serve it; serves
/// only peers of the daemon's user (or root).
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |source| ServerError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let fd =
        lode_common::socket::bind_private(path, SockType::Stream).map_err(|e| err(e.source))?;
    nix::sys::socket::listen(&fd, Backlog::new(128).expect("a valid backlog"))
        .map_err(|e| err(std::io::Error::from_raw_os_error(e as i32)))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(err)?;
    let listener = UnixListener::from_std(listener).map_err(err)?;
    info!(path = %path.display(), "API listening");
    Ok(listener)
}

async fn answer(
    control: Arc<dyn DaemonControl>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let reply = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            let method = parts.method.clone();
            let path = parts.uri.path().to_owned();
            let query = parts.uri.query().map(str::to_owned);
            tokio::task::spawn_blocking(move || {
                handle(control.as_ref(), &method, &path, query.as_deref(), &body)
            })
            .await
            .unwrap_or_else(|e| {
                Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("request handler failed: {e}"),
                )
            })
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Reply::from_http_error(&HttpError::TooLarge)
        }
        Err(e) => Reply::from_http_error(&HttpError::BadRequest(format!(
            "cannot read the request body: {e}"
        ))),
    };
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    if reply.status != StatusCode::NO_CONTENT {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    Ok(response)
}

/// Connections being served; lets the daemon finish answering (e.g. the
/// `exit` request itself) before it stops.
#[derive(Debug, Default)]
pub struct Connections(AtomicUsize);

impl Connections {
    pub fn open(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open or `deadline` passes.
    pub async fn drained(&self, deadline: Instant) -> bool {
        while self.open() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

struct Open(Arc<Connections>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts connections until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    control: Arc<dyn DaemonControl>,
    connections: Arc<Connections>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) if lode_common::socket::peer_is_trusted(&stream) => stream,
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                // Out of descriptors, typically: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let control = Arc::clone(&control);
        connections.0.fetch_add(1, Ordering::SeqCst);
        let open = Open(Arc::clone(&connections));
        tokio::spawn(async move {
            let _open = open;
            let service = service_fn(move |req| answer(Arc::clone(&control), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
