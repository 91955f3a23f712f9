//! Turns an HTTP request (method, path, query, body) into an [`ApiRequest`].
//! Never panics on input: every malformed request is an [`HttpError`].

use std::path::PathBuf;

use hyper::{Method, StatusCode};
use lode_common::api::query;
use lode_common::api::API_PREFIX;

use super::{ApiRequest, MAX_BODY};

/// A request refused before it reached the daemon.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("no endpoint {0}")]
    NotFound(String),
    #[error("{path} does not accept {method}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
}

impl HttpError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge => "payload_too_large",
        }
    }
}

/// The longest path or query echoed back in an error message.
const ECHO: usize = 200;

fn echo(s: &str) -> String {
    s.chars().take(ECHO).collect()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, HttpError> {
        let pairs = query::parse(raw.unwrap_or(""))
            .map_err(|e| HttpError::BadRequest(echo(&e.to_string())))?;
        if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(HttpError::BadRequest(format!(
                "unknown query parameter {:?}",
                echo(k)
            )));
        }
        Ok(Self(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn id(&self) -> Result<Option<String>, HttpError> {
        match self.get("id") {
            Some("") => Err(HttpError::BadRequest("query parameter id is empty".into())),
            other => Ok(other.map(str::to_owned)),
        }
    }

    fn mountpoint(&self) -> Result<PathBuf, HttpError> {
        match self.get("mountpoint") {
            Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
            Some(p) => Err(HttpError::BadRequest(format!(
                "mountpoint {:?} is not an absolute path",
                echo(p)
            ))),
            None => Err(HttpError::BadRequest(
                "query parameter mountpoint is required".into(),
            )),
        }
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, HttpError> {
    if body.len() > MAX_BODY {
        return Err(HttpError::TooLarge);
    }
    serde_json::from_slice(body).map_err(|e| {
        HttpError::BadRequest(format!(
            "invalid {what} request body: {}",
            echo(&e.to_string())
        ))
    })
}

fn no_body(body: &[u8]) -> Result<(), HttpError> {
    if body.is_empty() {
        Ok(())
    } else if body.len() > MAX_BODY {
        Err(HttpError::TooLarge)
    } else {
        Err(HttpError::BadRequest("this endpoint takes no body".into()))
    }
}

/// Parses one request. `path` excludes the query; `query` excludes the `?`.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<ApiRequest, HttpError> {
    let endpoint = path
        .strip_prefix(API_PREFIX)
        .ok_or_else(|| HttpError::NotFound(echo(path)))?;
    let allowed: &[Method] = match endpoint {
        "/daemon" | "/metrics" | "/metrics/cache" | "/metrics/backend" | "/metrics/inflight"
        | "/access" => &[Method::GET],
        "/mount" => &[Method::POST, Method::PUT, Method::DELETE],
        "/daemon/start"
        | "/daemon/exit"
        | "/daemon/fuse/sendfd"
        | "/daemon/fuse/takeover"
        | "/ahead" => &[Method::PUT],
        _ => return Err(HttpError::NotFound(echo(path))),
    };
    if !allowed.contains(method) {
        return Err(HttpError::MethodNotAllowed {
            method: echo(method.as_str()),
            path: echo(path),
        });
    }
    let plain = |request: ApiRequest| -> Result<ApiRequest, HttpError> {
        Query::parse(query, &[])?;
        no_body(body)?;
        Ok(request)
    };
    let metrics = |make: fn(Option<String>) -> ApiRequest| -> Result<ApiRequest, HttpError> {
        let q = Query::parse(query, &["id"])?;
        no_body(body)?;
        Ok(make(q.id()?))
    };
    match (endpoint, method) {
        ("/daemon", _) => plain(ApiRequest::GetDaemon),
        ("/metrics", _) => metrics(|id| ApiRequest::FsMetrics { id }),
        ("/metrics/cache", _) => metrics(|id| ApiRequest::CacheMetrics { id }),
        ("/metrics/backend", _) => metrics(|id| ApiRequest::BackendMetrics { id }),
        ("/metrics/inflight", _) => plain(ApiRequest::Inflight),
        ("/access", _) => metrics(|id| ApiRequest::Access { id }),
        ("/daemon/start", _) => plain(ApiRequest::Start),
        ("/daemon/exit", _) => plain(ApiRequest::Exit),
        ("/daemon/fuse/sendfd", _) => plain(ApiRequest::SendFd),
        ("/daemon/fuse/takeover", _) => plain(ApiRequest::Takeover),
        ("/ahead", _) => {
            Query::parse(query, &[])?;
            Ok(ApiRequest::Ahead(json_body(body, "ahead")?))
        }
        (_, m) => {
            let mountpoint = Query::parse(query, &["mountpoint"])?.mountpoint()?;
            if *m == Method::DELETE {
                no_body(body)?;
                Ok(ApiRequest::Umount { mountpoint })
            } else {
                let request = json_body(body, "mount")?;
                if *m == Method::POST {
                    Ok(ApiRequest::Mount {
                        mountpoint,
                        request,
                    })
                } else {
                    Ok(ApiRequest::Remount {
                        mountpoint,
                        request,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
