//! Client behaviour against a scripted server: retries, deadlines,
//! re-authentication, range checks, resumption. The real registry is
//! exercised by `tests/tests/registry.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::fake_server::{FakeRequest, FakeResponse, FakeServer};
use super::*;

const BLOB: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn client(timeout_ms: u64, max_retries: u32) -> RegistryClient {
    client_with_config(timeout_ms, max_retries, None)
}

fn client_with_config(
    timeout_ms: u64,
    max_retries: u32,
    docker_config: Option<PathBuf>,
) -> RegistryClient {
    // An explicit (possibly empty) config keeps the user's own
    // ~/.docker/config.json out of the tests. The client reads it once, as
    // it is built; the directory goes afterwards.
    let empty = tempfile::tempdir().unwrap();
    let docker_config = docker_config.or_else(|| {
        let path = empty.path().join("config.json");
        std::fs::write(&path, "{}").unwrap();
        Some(path)
    });
    RegistryClient::new(RegistryOptions {
        plain_http: false,
        request_timeout: Duration::from_millis(timeout_ms),
        max_retries,
        docker_config,
        ..RegistryOptions::default()
    })
    .unwrap()
}

/// Serves BLOB ranges like a registry would.
fn range_response(request: &FakeRequest) -> FakeResponse {
    let Some(range) = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
    else {
        return FakeResponse::new(200, BLOB);
    };
    let (start, end) = range.split_once('-').unwrap();
    let start: usize = start.parse().unwrap();
    let end: usize = if end.is_empty() {
        BLOB.len() - 1
    } else {
        end.parse().unwrap()
    };
    if start >= BLOB.len() {
        return FakeResponse::new(416, "");
    }
    let end = end.min(BLOB.len() - 1);
    FakeResponse::new(206, &BLOB[start..=end]).header(
        "Content-Range",
        &format!("bytes {start}-{end}/{}", BLOB.len()),
    )
}

fn digest() -> Digest {
    Digest::of(BLOB)
}

#[tokio::test]
async fn range_read_returns_exactly_the_requested_bytes() {
    let server = FakeServer::start(|req, _| range_response(req)).await;
    let reference = server.reference("app:v1");
    let c = client(2000, 0);
    let got = c
        .pull_blob_range(&reference, &digest(), 10, 5)
        .await
        .unwrap();
    assert_eq!(&got[..], &BLOB[10..15]);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("range"), Some("bytes=10-14"));
    assert_eq!(requests[0].path, format!("/v2/app/blobs/{}", digest()));
    assert!(c
        .pull_blob_range(&reference, &digest(), 3, 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        server.requests().len(),
        1,
        "an empty range needs no request"
    );
}

#[tokio::test]
async fn range_past_the_end_is_short_or_refused() {
    let server = FakeServer::start(|req, _| range_response(req)).await;
    let reference = server.reference("app");
    let c = client(2000, 3);
    let err = c
        .pull_blob_range(&reference, &digest(), 30, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::ShortRange {
                expected: 10,
                actual: 6,
                offset: 30,
                ..
            }
        ),
        "{err}"
    );
    let err = c
        .pull_blob_range(&reference, &digest(), 100, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Request { .. }), "{err}");
    assert!(err.to_string().contains("416"), "{err}");
    assert_eq!(server.requests().len(), 2, "client errors are not retried");
}

#[tokio::test]
async fn a_range_is_read_out_of_a_whole_blob_answer() {
    // A host ignoring the Range header (a pull-through cache that has not
    // cached the blob yet) answers with the whole blob.
    let server = FakeServer::start(|_, _| FakeResponse::new(200, BLOB)).await;
    let c = client(2000, 2);
    let reference = server.reference("app");
    let part = c
        .pull_blob_range(&reference, &digest(), 4, 4)
        .await
        .unwrap();
    assert_eq!(&part[..], &BLOB[4..8]);
    let tail = c
        .pull_blob_range(&reference, &digest(), 30, 6)
        .await
        .unwrap();
    assert_eq!(&tail[..], &BLOB[30..]);
    let whole = c
        .pull_blob_range(&reference, &digest(), 0, BLOB.len() as u64)
        .await
        .unwrap();
    assert_eq!(&whole[..], BLOB);
    assert_eq!(server.requests().len(), 3, "one request each");
    // A range past the blob's end is short, not retried.
    let err = c
        .pull_blob_range(&reference, &digest(), 30, 7)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::ShortRange { actual: 6, .. }),
        "{err}"
    );
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff() {
    let server = FakeServer::start(|req, i| {
        if i < 2 {
            FakeResponse::new(503, "busy")
        } else {
            range_response(req)
        }
    })
    .await;
    let c = client(2000, 3);
    let start = Instant::now();
    let got = c
        .pull_blob_range(&server.reference("app"), &digest(), 0, 4)
        .await
        .unwrap();
    assert_eq!(&got[..], b"0123");
    assert_eq!(server.requests().len(), 3);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "backoff 100 + 200 ms, took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn gives_up_after_max_retries_naming_reference_and_digest() {
    let server = FakeServer::start(|_, _| {
        FakeResponse::new(
            500,
            r#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#,
        )
    })
    .await;
    let reference = server.reference("app:v1");
    let err = client(2000, 2)
        .pull_blob(&reference, &digest())
        .await
        .unwrap_err();
    assert_eq!(server.requests().len(), 3);
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Request { .. }), "{text}");
    for part in [
        reference.to_string(),
        digest().to_string(),
        "500".into(),
        "disk on fire".into(),
    ] {
        assert!(text.contains(&part), "{text:?} lacks {part:?}");
    }
}

#[tokio::test]
async fn cut_off_range_resumes_where_the_sink_stopped() {
    let server = FakeServer::start(|req, i| {
        let mut response = range_response(req);
        if i == 0 {
            response.cut_after = Some(3);
        }
        response
    })
    .await;
    let c = client(2000, 2);
    let mut seen = Vec::new();
    c.pull_blob_range_with(&server.reference("app"), &digest(), 5, 10, &mut |piece| {
        seen.extend_from_slice(piece)
    })
    .await
    .unwrap();
    assert_eq!(&seen[..], &BLOB[5..15], "every byte once, in order");
    let ranges: Vec<_> = server
        .requests()
        .iter()
        .map(|r| r.header("range").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ranges, ["bytes=5-14", "bytes=8-14"]);
}

#[tokio::test]
async fn a_transfer_cut_every_few_bytes_completes_while_it_delivers() {
    // Every answer is cut after 2 bytes; one retry allowed. Each attempt
    // delivers, so the retries start afresh and the range completes.
    let server = FakeServer::start(|req, _| {
        let mut response = range_response(req);
        response.cut_after = Some(2);
        response
    })
    .await;
    let c = client(2000, 1);
    let got = c
        .pull_blob_range(&server.reference("app"), &digest(), 4, 12)
        .await
        .unwrap();
    assert_eq!(&got[..], &BLOB[4..16]);
    assert_eq!(server.requests().len(), 6, "2 bytes per attempt");
}

#[tokio::test]
async fn a_transfer_cut_before_its_first_byte_gives_up_after_max_retries() {
    let server = FakeServer::start(|req, _| {
        let mut response = range_response(req);
        response.cut_after = Some(0);
        response
    })
    .await;
    let c = client(2000, 1);
    c.pull_blob_range(&server.reference("app"), &digest(), 4, 12)
        .await
        .unwrap_err();
    assert_eq!(server.requests().len(), 2, "no progress: max_retries only");
}

#[tokio::test]
async fn resume_answered_with_another_range_is_refused() {
    let server = FakeServer::start(|req, i| {
        if i == 0 {
            let mut response = range_response(req);
            response.cut_after = Some(2);
            response
        } else {
            // Starts over at the original offset instead of resuming.
            FakeResponse::new(206, &BLOB[0..4]).header("Content-Range", "bytes 0-3/36")
        }
    })
    .await;
    let c = client(2000, 2);
    let mut seen = Vec::new();
    let err = c
        .pull_blob_range_with(&server.reference("app"), &digest(), 0, 4, &mut |piece| {
            seen.extend_from_slice(piece)
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another range"), "{err}");
    assert_eq!(&seen[..], &BLOB[0..2], "nothing twice");
}

#[tokio::test]
async fn hanging_server_times_out_within_the_deadline() {
    let server = FakeServer::start(|_, _| FakeResponse::hang()).await;
    let start = Instant::now();
    let err = client(200, 1)
        .pull_blob_range(&server.reference("app"), &digest(), 0, 4)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert_eq!(server.requests().len(), 2);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn not_found_is_typed() {
    let server = FakeServer::start(|_, _| FakeResponse::new(404, "")).await;
    let c = client(2000, 3);
    let err = c
        .pull_blob_range(&server.reference("app"), &digest(), 0, 4)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(!c
        .blob_exists(&server.reference("app"), &digest())
        .await
        .unwrap());
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn sequential_reads_reuse_one_connection() {
    let server = FakeServer::start(|req, _| range_response(req)).await;
    let c = client(2000, 0);
    for offset in 0..10 {
        c.pull_blob_range(&server.reference("app"), &digest(), offset, 3)
            .await
            .unwrap();
    }
    assert_eq!(server.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_from_many_tasks() {
    let server = FakeServer::start(|req, _| range_response(req)).await;
    let c = client(5000, 0);
    let reference = server.reference("app");
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let (c, reference) = (c.clone(), reference.clone());
            tokio::spawn(async move { (i, c.pull_blob_range(&reference, &digest(), i, 4).await) })
        })
        .collect();
    for task in tasks {
        let (i, got) = task.await.unwrap();
        let i = i as usize;
        assert_eq!(&got.unwrap()[..], &BLOB[i..i + 4]);
    }
}

#[tokio::test]
async fn whole_blob_download_resumes_after_a_cut_and_verifies() {
    let server = FakeServer::start(|req, i| {
        if i == 0 {
            FakeResponse {
                cut_after: Some(10),
                ..FakeResponse::new(200, BLOB)
            }
        } else {
            range_response(req)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let c = client(2000, 2);
    let size = c
        .pull_blob_to_file(&server.reference("app"), &digest(), &path)
        .await
        .unwrap();
    assert_eq!(size, BLOB.len() as u64);
    assert_eq!(std::fs::read(&path).unwrap(), BLOB);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].header("range"), Some("bytes=10-"));
}

#[tokio::test]
async fn corrupted_blob_is_a_digest_mismatch_without_retries() {
    let server = FakeServer::start(|_, _| FakeResponse::new(200, b"something else".to_vec())).await;
    let err = client(2000, 3)
        .pull_blob(&server.reference("app"), &digest())
        .await
        .unwrap_err();
    match err {
        RegistryError::DigestMismatch {
            digest: d, actual, ..
        } => {
            assert_eq!(d, digest());
            assert_eq!(actual, Digest::of(b"something else"));
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(server.requests().len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let err = client(2000, 0)
        .pull_blob_to_file(&server.reference("app"), &digest(), &path)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(!path.exists(), "a blob that failed verification is removed");
}

/// A registry with a token service: blob requests need `Bearer <token>` with
/// the current token; `/token` hands out `t1`, `t2`, ...
struct TokenRegistry {
    server: FakeServer,
    issued: Arc<AtomicUsize>,
}

async fn token_registry(
    valid_token: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> TokenRegistry {
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let server = FakeServer::start(move |req, _| {
        let host = req.header("host").unwrap_or_default().to_owned();
        let challenge = format!(r#"Bearer realm="http://{host}/token",service="fake""#);
        if req.path.starts_with("/token") {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            return FakeResponse::new(200, format!(r#"{{"token":"t{n}"}}"#));
        }
        let authorized = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer t"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(&valid_token);
        if req.path == "/v2/" || !authorized {
            return FakeResponse::new(401, "").header("WWW-Authenticate", &challenge);
        }
        range_response(req)
    })
    .await;
    TokenRegistry { server, issued }
}

#[tokio::test]
async fn bearer_token_is_fetched_on_401_and_reused() {
    let registry = token_registry(|n| n == 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:pw");
    let host = registry.server.reference("app").registry;
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let c = client_with_config(2000, 0, Some(config));
    let reference = registry.server.reference("app");
    for _ in 0..3 {
        let got = c
            .pull_blob_range(&reference, &digest(), 1, 2)
            .await
            .unwrap();
        assert_eq!(&got[..], b"12");
    }
    assert_eq!(
        registry.issued.load(Ordering::SeqCst),
        1,
        "one token for all reads"
    );
    let token_request = registry
        .server
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/token"))
        .unwrap();
    assert!(
        token_request.path.contains("scope=repository%3Aapp%3Apull"),
        "{}",
        token_request.path
    );
    assert_eq!(
        token_request.header("authorization"),
        Some(format!("Basic {auth}").as_str())
    );
    // The 401 carried the challenge: nobody asked /v2/ for it again.
    let paths: Vec<String> = registry
        .server
        .requests()
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert!(!paths.iter().any(|p| p == "/v2/"), "{paths:?}");
}

#[test]
fn challenges_name_the_realm_and_service_or_basic() {
    use super::auth::Challenge;
    let bearer = |realm: &str, service: Option<&str>| Challenge::Bearer {
        realm: realm.to_owned(),
        service: service.map(str::to_owned),
    };
    assert_eq!(
        Challenge::parse(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:app:pull""#
        ),
        Some(bearer(
            "https://auth.example.com/token",
            Some("registry.example.com")
        ))
    );
    // Scheme and parameter names in any case, with an escape in a value.
    assert_eq!(
        Challenge::parse(r#"bearer REALM="https://a.io/t\"x""#),
        Some(bearer(r#"https://a.io/t"x"#, None))
    );
    // Bearer wins over basic, whichever comes first.
    assert_eq!(
        Challenge::parse(r#"Basic realm="r", Bearer realm="https://a.io/t""#),
        Some(bearer("https://a.io/t", None))
    );
    assert_eq!(
        Challenge::parse(r#"Basic realm="Registry Realm""#),
        Some(Challenge::Basic)
    );
    // Nothing this client can answer itself: a bearer challenge without a
    // realm, other schemes, malformed headers.
    for header in [
        r#"Bearer service="x""#,
        "Negotiate",
        "",
        "Bearer realm=\"unterminated",
        "=",
    ] {
        assert_eq!(Challenge::parse(header), None, "{header:?}");
    }
}

#[tokio::test]
async fn expired_token_is_refreshed_once() {
    // Token 1 stops working after the first read; token 2 is good.
    let uses = Arc::new(AtomicUsize::new(0));
    let counted = uses.clone();
    let registry =
        token_registry(move |n| n == 2 || (n == 1 && counted.fetch_add(1, Ordering::SeqCst) == 0))
            .await;
    let c = client(2000, 0);
    let reference = registry.server.reference("app");
    c.pull_blob_range(&reference, &digest(), 0, 1)
        .await
        .unwrap();
    c.pull_blob_range(&reference, &digest(), 0, 1)
        .await
        .unwrap();
    assert_eq!(registry.issued.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn persistent_401_is_unauthorized_after_one_reauthentication() {
    let registry = token_registry(|_| false).await;
    let c = client(2000, 3);
    let err = c
        .pull_blob_range(&registry.server.reference("app"), &digest(), 0, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert_eq!(registry.issued.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn manifest_media_type_comes_from_content_type_and_digest_is_checked() {
    let body = br#"{"schemaVersion":2,"manifests":[]}"#.to_vec();
    let served = body.clone();
    let server = FakeServer::start(move |_, _| {
        FakeResponse::new(200, served.clone())
            .header("Content-Type", "application/vnd.oci.image.index.v1+json")
    })
    .await;
    let c = client(2000, 0);
    let manifest = c.pull_manifest(&server.reference("app:v1")).await.unwrap();
    assert_eq!(manifest.media_type, crate::oci::MEDIA_TYPE_OCI_INDEX);
    assert_eq!(manifest.digest, Digest::of(&body));
    assert_eq!(manifest.bytes, body);
    let accept = server.requests()[0]
        .header("accept")
        .unwrap_or_default()
        .to_owned();
    assert!(
        accept.contains(crate::oci::MEDIA_TYPE_DOCKER_MANIFEST),
        "{accept}"
    );

    let wrong = server.reference("app").with_digest(Digest::of(b"other"));
    let err = c.pull_manifest(&wrong).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn manifest_push_sends_media_type_and_returns_the_digest() {
    let server = FakeServer::start(|req, _| {
        let digest = Digest::of(&req.body).to_string();
        FakeResponse::new(201, "").header("Docker-Content-Digest", &digest)
    })
    .await;
    let body = br#"{"schemaVersion":2}"#.to_vec();
    let c = client(2000, 0);
    let digest = c
        .push_manifest(
            &server.reference("app:v2"),
            body.clone(),
            crate::oci::MEDIA_TYPE_OCI_MANIFEST,
        )
        .await
        .unwrap();
    assert_eq!(digest, Digest::of(&body));
    let request = &server.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("PUT", "/v2/app/manifests/v2")
    );
    assert_eq!(
        request.header("content-type"),
        Some(crate::oci::MEDIA_TYPE_OCI_MANIFEST)
    );
    assert_eq!(request.body, body);

    let err = c
        .push_manifest(
            &server.reference("app").with_digest(Digest::of(b"x")),
            body,
            "application/json",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert_eq!(
        server.requests().len(),
        1,
        "a mismatching digest is caught before sending"
    );
}

#[test]
fn debug_output_hides_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:hunter2");
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"r.example.com":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let c = client_with_config(1000, 0, Some(config));
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains(&auth),
        "{shown}"
    );
    assert!(shown.contains("r.example.com"), "{shown}");
}

#[test]
fn client_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let c = client(1000, 0);
    let reference: Reference = "127.0.0.1:1/app".parse().unwrap();
    let d = digest();
    assert_send(&c.pull_blob_range(&reference, &d, 0, 1));
    assert_send(&c.pull_blob(&reference, &d));
    assert_send(&c.pull_blob_to_file(&reference, &d, Path::new("/nonexistent")));
    assert_send(&c.pull_manifest(&reference));
    assert_send(&c.push_blob(&reference, &d, Bytes::new()));
    assert_send(&c.push_blob_file(&reference, &d, Path::new("/nonexistent")));
    assert_send(&c.push_manifest(&reference, Vec::new(), "x"));
    assert_send(&c.blob_exists(&reference, &d));
}
