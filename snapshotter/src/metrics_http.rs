//! The Prometheus endpoint: the snapshotter's own metrics plus per-image
//! figures scraped from each daemon's API when Prometheus asks.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lode_common::api::DaemonClient;

use crate::daemons::DaemonManager;

/// A daemon that does not answer within this is reported as unreachable.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `address` (loopback only, checked by the config) and serves
/// `GET /metrics` until the task is dropped. Returns the bound address.
pub async fn serve(
    address: &str,
    manager: Arc<DaemonManager>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        return Err(std::io::Error::other(format!(
            "{local} is not a loopback address"
        )));
    }
    tracing::info!(address = %local, "metrics endpoint listening");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let manager = manager.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(manager.clone(), request));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(
    manager: Arc<DaemonManager>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let mut text = manager.metrics().encode();
    // The registry's text ends with "# EOF"; daemon figures go before it.
    if let Some(stripped) = text.strip_suffix("# EOF\n") {
        text = stripped.to_string();
    }
    text.push_str(&scrape(&manager).await);
    text.push_str("# EOF\n");
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    Ok(response)
}

/// Per-daemon and per-image figures, in OpenMetrics text.
async fn scrape(manager: &DaemonManager) -> String {
    let mut up = String::new();
    let mut images = String::new();
    for daemon in manager.daemons() {
        let client = DaemonClient::new(&daemon.apisock);
        let info = tokio::time::timeout(SCRAPE_TIMEOUT, client.daemon_info()).await;
        let Ok(Ok(info)) = info else {
            let _ = writeln!(up, "lode_daemon_up{{daemon=\"{}\"}} 0", escape(&daemon.id));
            continue;
        };
        let _ = writeln!(
            up,
            "lode_daemon_up{{daemon=\"{}\",state=\"{}\"}} 1",
            escape(&daemon.id),
            info.state
        );
        for instance in info.instances {
            let image = escape(instance.image_ref.as_deref().unwrap_or(&instance.id));
            let id = Some(instance.id.as_str());
            if let Ok(Ok(fs)) = tokio::time::timeout(SCRAPE_TIMEOUT, client.fs_metrics(id)).await {
                let _ = writeln!(
                    images,
                    "lode_image_read_bytes_total{{image=\"{image}\"}} {}",
                    fs.bytes_read
                );
            }
            if let Ok(Ok(cache)) =
                tokio::time::timeout(SCRAPE_TIMEOUT, client.cache_metrics(id)).await
            {
                for (name, value) in [
                    ("cache_hits", cache.hits),
                    ("cache_misses", cache.misses),
                    ("fetched_bytes", cache.bytes_fetched),
                    ("ahead_bytes", cache.ahead_bytes),
                    ("digest_errors", cache.digest_errors),
                ] {
                    let _ = writeln!(
                        images,
                        "lode_image_{name}_total{{image=\"{image}\"}} {value}"
                    );
                }
            }
        }
    }
    let mut text = String::new();
    text.push_str("# HELP lode_daemon_up Whether a recorded lode-fsd daemon answers its API.\n# TYPE lode_daemon_up gauge\n");
    text.push_str(&up);
    for (name, help) in [
        ("read_bytes", "Bytes read from the image's files."),
        ("cache_hits", "Chunk reads served from the local cache."),
        ("cache_misses", "Chunk reads that needed the registry."),
        ("fetched_bytes", "Bytes fetched from the registry."),
        (
            "ahead_bytes",
            "Of the fetched bytes, those of the prefetch list fetched while the image was pulled.",
        ),
        (
            "digest_errors",
            "Chunks whose sha256 did not match (never served).",
        ),
    ] {
        let _ = writeln!(
            text,
            "# HELP lode_image_{name} {help}\n# TYPE lode_image_{name} counter"
        );
        for line in images
            .lines()
            .filter(|l| l.starts_with(&format!("lode_image_{name}_total")))
        {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
