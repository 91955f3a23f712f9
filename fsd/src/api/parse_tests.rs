use super::*;
use proptest::prelude::*;

fn mount_json() -> Vec<u8> {
    br#"{"source":"/b/bootstrap","config":{"blob_source":"dir:///blobs"},"seq":3,"image_ref":"r/x:1"}"#.to_vec()
}

#[test]
fn parses_every_endpoint() {
    let get = |p: &str, q: Option<&str>| parse(&Method::GET, p, q, b"");
    let put = |p: &str| parse(&Method::PUT, p, None, b"");
    assert_eq!(get("/api/v1/daemon", None), Ok(ApiRequest::GetDaemon));
    assert_eq!(
        get("/api/v1/metrics", Some("id=a")),
        Ok(ApiRequest::FsMetrics {
            id: Some("a".into())
        })
    );
    assert_eq!(
        get("/api/v1/metrics/cache", None),
        Ok(ApiRequest::CacheMetrics { id: None })
    );
    assert_eq!(
        get("/api/v1/metrics/backend", Some("id=b")),
        Ok(ApiRequest::BackendMetrics {
            id: Some("b".into())
        })
    );
    assert_eq!(
        get("/api/v1/metrics/inflight", None),
        Ok(ApiRequest::Inflight)
    );
    assert_eq!(
        get("/api/v1/access", Some("id=c")),
        Ok(ApiRequest::Access {
            id: Some("c".into())
        })
    );
    assert_eq!(put("/api/v1/daemon/start"), Ok(ApiRequest::Start));
    assert_eq!(put("/api/v1/daemon/exit"), Ok(ApiRequest::Exit));
    assert_eq!(put("/api/v1/daemon/fuse/sendfd"), Ok(ApiRequest::SendFd));
    assert_eq!(
        put("/api/v1/daemon/fuse/takeover"),
        Ok(ApiRequest::Takeover)
    );
    let ahead = format!(
        r#"{{"config":{{"blob_source":"registry://r/x"}},"blobs":[{{"digest":"{}","size":9,"bytes":4}}]}}"#,
        lode_common::Digest::of(b"x")
    );
    match parse(&Method::PUT, "/api/v1/ahead", None, ahead.as_bytes()) {
        Ok(ApiRequest::Ahead(request)) => {
            assert_eq!(request.config.blob_source, "registry://r/x");
            assert_eq!((request.blobs[0].size, request.blobs[0].bytes), (9, 4));
        }
        other => panic!("{other:?}"),
    }
    let q = Some("mountpoint=%2Fmnt%2Fa");
    match parse(&Method::POST, "/api/v1/mount", q, &mount_json()) {
        Ok(ApiRequest::Mount {
            mountpoint,
            request,
        }) => {
            assert_eq!(mountpoint, PathBuf::from("/mnt/a"));
            assert_eq!(request.seq, 3);
            assert_eq!(request.config.blob_source, "dir:///blobs");
            assert!(!request.config.plain_http);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        parse(&Method::PUT, "/api/v1/mount", q, &mount_json()),
        Ok(ApiRequest::Remount { .. })
    ));
    assert_eq!(
        parse(&Method::DELETE, "/api/v1/mount", q, b""),
        Ok(ApiRequest::Umount {
            mountpoint: "/mnt/a".into()
        })
    );
}

#[test]
fn refuses_bad_requests_with_fitting_errors() {
    let status = |m: Method, p: &str, q: Option<&str>, b: &[u8]| {
        parse(&m, p, q, b).map(|_| ()).map_err(|e| e.status())
    };
    let q = Some("mountpoint=/mnt/a");
    assert_eq!(
        status(Method::GET, "/nope", None, b""),
        Err(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        status(Method::GET, "/api/v1/daemonx", None, b""),
        Err(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        status(Method::POST, "/api/v1/daemon", None, b""),
        Err(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        status(Method::GET, "/api/v1/mount", q, b""),
        Err(StatusCode::METHOD_NOT_ALLOWED)
    );
    assert_eq!(
        status(Method::POST, "/api/v1/mount", q, b"{not json"),
        Err(StatusCode::BAD_REQUEST)
    );
    // Unknown fields are refused, not ignored.
    let extra = br#"{"source":"/b","config":{"blob_source":"dir:///x","colour":1},"seq":1}"#;
    assert_eq!(
        status(Method::POST, "/api/v1/mount", q, extra),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(Method::POST, "/api/v1/mount", None, &mount_json()),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(
            Method::POST,
            "/api/v1/mount",
            Some("mountpoint=rel"),
            &mount_json()
        ),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(Method::GET, "/api/v1/daemon", Some("x=1"), b""),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(Method::GET, "/api/v1/metrics", Some("id="), b""),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(Method::PUT, "/api/v1/daemon/start", None, b"{}"),
        Err(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        status(Method::GET, "/api/v1/ahead", None, b""),
        Err(StatusCode::METHOD_NOT_ALLOWED)
    );
    for bad in [
        &b""[..],
        b"{}",
        br#"{"config":{"blob_source":"x"},"blobs":[{"digest":"nope","size":1,"bytes":1}]}"#,
    ] {
        assert_eq!(
            status(Method::PUT, "/api/v1/ahead", None, bad),
            Err(StatusCode::BAD_REQUEST),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let huge = vec![b' '; MAX_BODY + 1];
    assert_eq!(
        status(Method::POST, "/api/v1/mount", q, &huge),
        Err(StatusCode::PAYLOAD_TOO_LARGE)
    );
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
        Just(Method::HEAD),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/api/v1/mount".to_owned()),
        Just("/api/v1/daemon".to_owned()),
        Just("/api/v1/metrics".to_owned()),
        Just("/api/v1/access".to_owned()),
        Just("/api/v1/daemon/fuse/takeover".to_owned()),
        Just("/api/v1/ahead".to_owned()),
        "/api/v1/[a-z/]{0,20}",
        any::<String>(),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(mount_json()),
        any::<Vec<u8>>(),
        "\\{\"source\":\"[^\"]{0,10}\",\"config\":\\{\"blob_source\":[0-9]{0,3}\\},\"seq\":-?[0-9]{0,12}\\}"
            .prop_map(String::into_bytes),
        (0usize..3).prop_map(|n| vec![b'['; MAX_BODY - 1 + n]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Garbage never panics, and is refused with a 4xx, never a 5xx.
    #[test]
    fn arbitrary_requests_never_panic(
        m in method(),
        p in path(),
        q in proptest::option::of(any::<String>()),
        b in body(),
    ) {
        if let Err(e) = parse(&m, &p, q.as_deref(), &b) {
            prop_assert!(e.status().is_client_error(), "{e:?}");
            prop_assert!(!e.code().is_empty());
        }
    }
}
