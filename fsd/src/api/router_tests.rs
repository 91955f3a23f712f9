use std::sync::Mutex;

use lode_common::api::*;

use super::*;
use crate::api::ApiRequest;

/// Records requests and answers with what the test queued.
#[derive(Default)]
struct FakeControl {
    seen: Mutex<Vec<ApiRequest>>,
    answer: Mutex<Option<Result<ApiResponse, ControlError>>>,
}

impl FakeControl {
    fn answering(answer: Result<ApiResponse, ControlError>) -> Self {
        Self {
            seen: Mutex::default(),
            answer: Mutex::new(Some(answer)),
        }
    }
}

impl DaemonControl for FakeControl {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ControlError> {
        self.seen.lock().unwrap().push(request);
        self.answer
            .lock()
            .unwrap()
            .take()
            .unwrap_or(Ok(ApiResponse::Empty))
    }
}

fn error_body(reply: &Reply) -> ErrorBody {
    serde_json::from_slice(&reply.body).unwrap()
}

#[test]
fn maps_each_control_error_to_its_status_and_code() {
    let cases = [
        (ControlError::NotFound("x".into()), 404, "not_found"),
        (
            ControlError::InvalidArgument("x".into()),
            400,
            "invalid_argument",
        ),
        (ControlError::Conflict("x".into()), 409, "conflict"),
        (ControlError::NotReady("x".into()), 503, "not_ready"),
        (ControlError::NotSupported("x".into()), 501, "not_supported"),
        (ControlError::Internal("x".into()), 500, "internal"),
    ];
    for (err, status, code) in cases {
        let control = FakeControl::answering(Err(err));
        let reply = handle(&control, &Method::PUT, "/api/v1/daemon/start", None, b"");
        assert_eq!(reply.status.as_u16(), status);
        let body = error_body(&reply);
        assert_eq!(body.code, code);
        assert_eq!(body.message, "x");
    }
}

#[test]
fn answers_typed_bodies_and_204_for_actions() {
    let metrics = CacheMetrics {
        id: "i".into(),
        hits: 7,
        misses: 1,
        inflight_joins: 0,
        prefetch_hits: 0,
        readahead_requests: 0,
        prefetch_requests: 0,
        bytes_fetched: 10,
        ahead_bytes: 0,
        chunks_cached: 1,
        bytes_cached: 10,
        write_errors: 0,
        digest_errors: 0,
        fetch_timeouts: 0,
    };
    let control = FakeControl::answering(Ok(ApiResponse::CacheMetrics(metrics.clone())));
    let reply = handle(
        &control,
        &Method::GET,
        "/api/v1/metrics/cache",
        Some("id=i"),
        b"",
    );
    assert_eq!(reply.status, StatusCode::OK);
    let back: CacheMetrics = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(back, metrics);
    assert_eq!(
        control.seen.lock().unwrap()[0],
        ApiRequest::CacheMetrics {
            id: Some("i".into())
        }
    );

    let control = FakeControl::default();
    let reply = handle(
        &control,
        &Method::DELETE,
        "/api/v1/mount",
        Some("mountpoint=/m"),
        b"",
    );
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
}

#[test]
fn refused_requests_never_reach_the_daemon() {
    let control = FakeControl::default();
    for (method, path, body) in [
        (Method::GET, "/api/v2/daemon", &b""[..]),
        (Method::DELETE, "/api/v1/daemon", b""),
        (Method::POST, "/api/v1/mount", b"[]"),
    ] {
        let reply = handle(&control, &method, path, Some("mountpoint=/m"), body);
        assert!(reply.status.is_client_error(), "{path}: {}", reply.status);
        assert!(!error_body(&reply).message.is_empty());
    }
    assert!(control.seen.lock().unwrap().is_empty());
}
