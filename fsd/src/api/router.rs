//! Maps HTTP requests to [`DaemonControl`] calls and their results to
//! status codes and JSON bodies. A plain function: tests call it directly.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use lode_common::api::ErrorBody;
use serde::Serialize;
use tracing::{debug, error};

use super::parse::{parse, HttpError};
use super::{ApiResponse, ControlError, DaemonControl};

/// An answer ready to send: status and JSON body (empty for 204).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    fn json<T: Serialize>(status: StatusCode, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                body: Bytes::from(body),
            },
            Err(e) => Self::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot encode the answer: {e}"),
            ),
        }
    }

    pub fn error(status: StatusCode, code: &str, message: String) -> Self {
        let body = ErrorBody {
            code: code.to_owned(),
            message,
        };
        Self {
            status,
            body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        }
    }

    pub fn from_http_error(e: &HttpError) -> Self {
        debug!(error = %e, "API request refused");
        Self::error(e.status(), e.code(), e.to_string())
    }
}

fn control_error(e: &ControlError) -> Reply {
    let (status, code) = match e {
        ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ControlError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ControlError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        ControlError::NotSupported(_) => (StatusCode::NOT_IMPLEMENTED, "not_supported"),
        ControlError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    // Only the daemon's own failures are worth an error line; the rest are
    // the caller's mistakes and are answered, not logged loudly.
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        error!(error = %e, "API request failed");
    } else {
        debug!(error = %e, "API request refused");
    }
    Reply::error(status, code, e.to_string())
}

/// Handles one request end to end.
pub fn handle(
    control: &dyn DaemonControl,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Reply {
    let request = match parse(method, path, query, body) {
        Ok(r) => r,
        Err(e) => return Reply::from_http_error(&e),
    };
    match control.handle(request) {
        Ok(ApiResponse::Daemon(info)) => Reply::json(StatusCode::OK, &info),
        Ok(ApiResponse::FsMetrics(m)) => Reply::json(StatusCode::OK, &m),
        Ok(ApiResponse::CacheMetrics(m)) => Reply::json(StatusCode::OK, &m),
        Ok(ApiResponse::BackendMetrics(m)) => Reply::json(StatusCode::OK, &m),
        Ok(ApiResponse::Access(a)) => Reply::json(StatusCode::OK, &a),
        Ok(ApiResponse::Inflight(m)) => Reply::json(StatusCode::OK, &m),
        Ok(ApiResponse::Empty) => Reply {
            status: StatusCode::NO_CONTENT,
            body: Bytes::new(),
        },
        Err(e) => control_error(&e),
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
