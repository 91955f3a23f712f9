//! The emulated link of the test kit, against a real `docker-registry`: each
//! request costs the profile's round trip (two for a new connection), and
//! downloads, alone or side by side, take the time the profile's rate says.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_common::registry::Reference;
use lode_common::Digest;
use lode_tests::link::{Link, LinkProfile};
use lode_tests::{pseudo_random_bytes, skip_unless, Registry};

/// A registry, and a link shaped by `profile` in front of it.
fn linked_registry(profile: LinkProfile) -> Option<(Registry, Link)> {
    if !skip_unless(Registry::available(), "docker-registry is not installed") {
        return None;
    }
    let registry = Registry::start().expect("start docker-registry");
    let link = Link::start(registry.addr(), profile).unwrap();
    Some((registry, link))
}

/// Sends `GET path` on `stream` and reads the whole response; returns its
/// status.
fn get(stream: &mut TcpStream, path: &str) -> u16 {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: link\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    status_line.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_request_costs_a_round_trip_and_a_new_connection_one_more() {
    let profile = LinkProfile::REGION;
    let Some((registry, link)) = linked_registry(profile) else {
        return;
    };
    let logged_before = registry.requests().len();

    let start = Instant::now();
    let mut stream = TcpStream::connect(link.addr()).unwrap();
    assert_eq!(get(&mut stream, "/v2/"), 200);
    let first = start.elapsed();
    let start = Instant::now();
    assert_eq!(get(&mut stream, "/v2/"), 200);
    let second = start.elapsed();
    drop(stream);

    eprintln!("{profile}: first request {first:?}, second {second:?}");
    let slack = Duration::from_millis(30);
    assert!(
        first >= 2 * profile.rtt && first < 2 * profile.rtt + slack,
        "first request on a new connection took {first:?}, not about 2 x {:?}",
        profile.rtt
    );
    assert!(
        second >= profile.rtt && second < profile.rtt + slack,
        "a request on an open connection took {second:?}, not about {:?}",
        profile.rtt
    );
    let stats = link.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.requests, 2);
    assert_eq!(registry.requests().len() - logged_before, 2);
    assert!(stats.bytes_up > 0 && stats.bytes_down > 0, "{stats:?}");
}

#[test]
fn downloads_share_the_rate_of_the_link() {
    let profile = LinkProfile::FAR;
    let Some((registry, link)) = linked_registry(profile) else {
        return;
    };
    const SIZE: usize = 4 << 20;
    let blobs: Vec<(Digest, Bytes)> = (0..2u64)
        .map(|i| {
            let data = Bytes::from(pseudo_random_bytes(i, 0, SIZE));
            (Digest::of(&data), data)
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = registry.client();
    let direct: Reference = registry.reference("link/blobs:v1");
    let linked: Reference = format!("{}/link/blobs:v1", link.host()).parse().unwrap();
    runtime.block_on(async {
        for (digest, data) in &blobs {
            client
                .push_blob(&direct, digest, data.clone())
                .await
                .unwrap();
        }
    });

    let time = |blobs: &[(Digest, Bytes)]| {
        let start = Instant::now();
        runtime.block_on(async {
            let pulls = blobs.iter().cloned().map(|(digest, data)| {
                let client = client.clone();
                let linked = linked.clone();
                async move {
                    let pulled = client.pull_blob(&linked, &digest).await.unwrap();
                    assert_eq!(pulled, data);
                }
            });
            futures_join_all(pulls).await;
        });
        start.elapsed()
    };
    let alone = time(&blobs[..1]);
    let side_by_side = time(&blobs);
    let one = profile.transmission(SIZE as u64);
    eprintln!(
        "{profile}: one {SIZE}-byte blob in {alone:?}, two side by side in {side_by_side:?}; \
         sending one takes {one:?}; {:?}",
        link.stats()
    );
    assert!(
        alone >= one + profile.rtt && alone < 2 * one + 4 * profile.rtt,
        "one blob took {alone:?}, sending it {one:?} plus round trips of {:?}",
        profile.rtt
    );
    assert!(
        side_by_side >= 2 * one + profile.rtt,
        "two blobs side by side took {side_by_side:?}, less than sending both ({:?})",
        2 * one
    );
    assert!(link.stats().bytes_down >= 3 * SIZE as u64);
}

/// Awaits every future (the tests crate has no `futures`).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for handle in handles {
        handle.await.unwrap();
    }
}
