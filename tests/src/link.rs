//! An emulated network link on loopback: a TCP proxy between clients and one
//! upstream server that adds a round-trip delay and limits the bandwidth of
//! each direction, and counts connections, HTTP requests and bytes (and
//! keeps the requests' heads).
//!
//! This kernel has no `netem`, so delay cannot come from `tc`. The proxy
//! models a link as two one-way pipes, one per direction, shared by every
//! connection through it (as a real link is):
//!
//! - data read from one side is serialized onto its direction's pipe at the
//!   profile's rate (it departs when the pipe is free and takes
//!   `bytes × 8 / bits_per_second` to send), then arrives half a round trip
//!   later, in order;
//! - a new connection's first bytes cannot depart before one round trip has
//!   passed since it was accepted (the TCP handshake a real link costs);
//! - a pipe queues at most a round trip's worth of sending (at least 2 ms);
//!   beyond that the proxy stops reading, so senders feel the rate.
//!
//! Timers have tokio's millisecond resolution, so delays below a few
//! milliseconds are approximate. TCP windows are not modelled: up to
//! [`IN_FLIGHT_CHUNKS`] reads per direction and connection may be in flight.
//!
//! A [`Fault`] set on the link ([`Link::set_fault`]) breaks the traffic in
//! one way until it is cleared: cut connections, stalls, flipped bytes,
//! server errors.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::KitError;

/// Size of one read from either side.
const READ_SIZE: usize = 64 * 1024;
/// Reads per direction and connection that may be on the link at once.
pub const IN_FLIGHT_CHUNKS: usize = 512;
/// The shortest queue a pipe holds, in sending time.
const MIN_QUEUE: Duration = Duration::from_millis(2);
/// Request heads kept, the latest.
const HEADS_KEPT: usize = 4096;

/// Round trip and bandwidth of an emulated link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkProfile {
    pub name: &'static str,
    pub rtt: Duration,
    /// Per direction.
    pub bits_per_second: u64,
}

impl LinkProfile {
    /// Nodes and registry in one data centre.
    pub const LAN: Self = Self {
        name: "lan",
        rtt: Duration::from_millis(1),
        bits_per_second: 10_000_000_000,
    };
    /// A registry in the same cloud region.
    pub const REGION: Self = Self {
        name: "region",
        rtt: Duration::from_millis(20),
        bits_per_second: 1_000_000_000,
    };
    /// A registry on another continent, or a thin uplink.
    pub const FAR: Self = Self {
        name: "far",
        rtt: Duration::from_millis(80),
        bits_per_second: 200_000_000,
    };
    pub const ALL: [Self; 3] = [Self::LAN, Self::REGION, Self::FAR];

    /// The profile called `name` (`lan`, `region`, `far`).
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name == name)
    }

    /// How long `bytes` take to send at this profile's rate.
    pub fn transmission(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_second as f64)
    }
}

impl std::fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} ms RTT, {} Mbit/s)",
            self.name,
            self.rtt.as_millis(),
            self.bits_per_second / 1_000_000
        )
    }
}

/// A way the link breaks the traffic while it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every connection is closed after this many bytes towards the client
    /// (a link that keeps breaking but keeps delivering).
    CutAfter(u64),
    /// Nothing more reaches the clients until the fault is cleared; the
    /// connections stay open (a stalled transfer).
    Stall,
    /// One byte in the middle of every read towards the client larger than
    /// 4 KiB is flipped (bodies, not response heads).
    FlipBytes,
    /// The link answers every request itself with `503 Service
    /// Unavailable` and closes the connection; connections open when the
    /// fault is set are cut.
    ServerError,
    /// Every `Content-Range` towards the client names another range (its
    /// first byte moved; the length unchanged).
    WrongRange,
    /// Towards the clients, the link delivers only this many bytes per
    /// second (a slow drip that never quite stops).
    Drip(u64),
}

/// Reads towards the client at least this large get a byte flipped.
const FLIP_MIN_READ: usize = 4096;

/// What went through a link so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub connections: u64,
    /// HTTP/1 request heads sent towards the server.
    pub requests: u64,
    /// Bytes towards the server.
    pub bytes_up: u64,
    /// Bytes towards the clients.
    pub bytes_down: u64,
    /// Times a fault acted: connections cut or answered 503, reads
    /// flipped or stalled.
    pub faults: u64,
}

impl std::ops::Sub for LinkStats {
    type Output = Self;
    fn sub(self, earlier: Self) -> Self {
        Self {
            connections: self.connections - earlier.connections,
            requests: self.requests - earlier.requests,
            bytes_up: self.bytes_up - earlier.bytes_up,
            bytes_down: self.bytes_down - earlier.bytes_down,
            faults: self.faults - earlier.faults,
        }
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    faults: AtomicU64,
}

/// One direction of the link: when it is next free to send.
struct Pipe {
    free_at: Mutex<Instant>,
}

impl Pipe {
    fn new() -> Self {
        Self {
            free_at: Mutex::new(Instant::now()),
        }
    }

    /// Puts `bytes` on the pipe no earlier than `not_before`; returns when
    /// their last bit has been sent. While the pipe's queue holds more than
    /// a round trip's worth of sending (a router's buffer), waits: the
    /// sender then feels the link's rate, and other connections' data does
    /// not queue behind an unbounded backlog.
    async fn send(&self, profile: &LinkProfile, bytes: u64, not_before: Instant) -> Instant {
        let queue = profile.rtt.max(MIN_QUEUE);
        loop {
            let retry_at = {
                let mut free_at = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if *free_at <= now + queue {
                    let start = (*free_at).max(not_before).max(now);
                    *free_at = start + profile.transmission(bytes);
                    return *free_at;
                }
                *free_at - queue
            };
            tokio::time::sleep_until(retry_at).await;
        }
    }
}

struct Shared {
    profile: LinkProfile,
    upstream: SocketAddr,
    up: Pipe,
    down: Pipe,
    counters: Counters,
    /// The latest request heads, oldest first.
    heads: Mutex<VecDeque<String>>,
    fault: watch::Sender<Option<Fault>>,
}

impl Shared {
    /// Counts and keeps the request heads `requests` has completed.
    fn record_requests(&self, requests: &mut RequestCounter) {
        if requests.done.is_empty() {
            return;
        }
        let done = std::mem::take(&mut requests.done);
        self.counters
            .requests
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        for head in done {
            if heads.len() == HEADS_KEPT {
                heads.pop_front();
            }
            heads.push_back(head);
        }
    }

    fn fault(&self) -> Option<Fault> {
        *self.fault.borrow()
    }

    fn count_fault(&self) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running link; it stops (and drops its connections) when dropped.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Link {
    /// Listens on a free loopback port and relays every connection to
    /// `upstream` through a link shaped by `profile`.
    pub fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<Self, KitError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lode-link")
            .enable_all()
            .build()
            .map_err(KitError::io("start the link's tokio runtime"))?;
        let listener = runtime
            .block_on(TcpListener::bind(("127.0.0.1", 0)))
            .map_err(KitError::io("bind the link's loopback port"))?;
        let addr = listener
            .local_addr()
            .map_err(KitError::io("the link's port"))?;
        let shared = Arc::new(Shared {
            profile,
            upstream,
            up: Pipe::new(),
            down: Pipe::new(),
            counters: Counters::default(),
            heads: Mutex::default(),
            fault: watch::Sender::new(None),
        });
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    pub fn profile(&self) -> LinkProfile {
        self.shared.profile
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, for image references that go through the link.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> LinkStats {
        let c = &self.shared.counters;
        LinkStats {
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
        }
    }

    /// The heads of the latest requests sent towards the server (up to
    /// 4096), oldest first, as the clients wrote them.
    pub fn request_heads(&self) -> Vec<String> {
        let heads = self.shared.heads.lock().unwrap_or_else(|e| e.into_inner());
        heads.iter().cloned().collect()
    }

    /// Breaks the traffic in the way `fault` says from now on, or (`None`)
    /// lets it flow again.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.fault.send_replace(fault);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            if shared.fault() == Some(Fault::ServerError) {
                answer_503(client, &shared).await;
                return;
            }
            let accepted = Instant::now();
            // A client the upstream refuses sees its connection closed, as
            // it would if the server were down behind a real link.
            let Ok(server) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let handshake_done = accepted + shared.profile.rtt;
            let up = relay(
                client_read,
                server_write,
                shared.clone(),
                Direction::Up,
                handshake_done,
            );
            let down = relay(
                server_read,
                client_write,
                shared.clone(),
                Direction::Down,
                handshake_done,
            );
            let mut faults = shared.fault.subscribe();
            let server_error = faults.wait_for(|f| *f == Some(Fault::ServerError));
            tokio::select! {
                _ = async { tokio::join!(up, down) } => {}
                // Dropping both directions closes the connection.
                _ = server_error => shared.count_fault(),
            }
        });
    }
}

/// Reads a request's head from `client` and answers 503 with
/// `Connection: close`, as an overloaded registry (or its load balancer)
/// would.
async fn answer_503(mut client: TcpStream, shared: &Shared) {
    let mut requests = RequestCounter::default();
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) if requests.feed(&buf[..n]) > 0 => break,
            Ok(_) => {}
        }
    }
    shared.record_requests(&mut requests);
    shared.count_fault();
    let _ = client
        .write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
    let _ = client.shutdown().await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Carries one direction of a connection: reads, puts each read on the
/// direction's pipe, and writes it out when it arrives. Closes the write side
/// once the read side ends and everything read has arrived.
async fn relay(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    direction: Direction,
    not_before: Instant,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let half_rtt = shared.profile.rtt / 2;
    let reader = {
        let shared = shared.clone();
        async move {
            let mut requests = RequestCounter::default();
            let mut faults = shared.fault.subscribe();
            let mut delivered = 0u64;
            loop {
                let mut buf = vec![0u8; READ_SIZE];
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.truncate(n);
                let mut cut = false;
                if direction == Direction::Down {
                    match shared.fault() {
                        Some(Fault::Stall) => {
                            shared.count_fault();
                            let _ = faults.wait_for(|f| *f != Some(Fault::Stall)).await;
                        }
                        Some(Fault::FlipBytes) if n >= FLIP_MIN_READ => {
                            shared.count_fault();
                            buf[n / 2] ^= 0xff;
                        }
                        Some(Fault::CutAfter(limit)) if delivered + n as u64 > limit => {
                            shared.count_fault();
                            buf.truncate(limit.saturating_sub(delivered) as usize);
                            cut = true;
                        }
                        // Rewrites the header when the read holds one.
                        Some(Fault::WrongRange) if move_range_start(&mut buf) => {
                            shared.count_fault();
                        }
                        Some(Fault::Drip(rate)) => {
                            shared.count_fault();
                            let pause = n as f64 / rate.max(1) as f64;
                            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                        }
                        _ => {}
                    }
                    delivered += buf.len() as u64;
                }
                let n = buf.len();
                let counters = &shared.counters;
                let (pipe, bytes) = match direction {
                    Direction::Up => {
                        requests.feed(&buf);
                        shared.record_requests(&mut requests);
                        (&shared.up, &counters.bytes_up)
                    }
                    Direction::Down => (&shared.down, &counters.bytes_down),
                };
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                let sent = pipe.send(&shared.profile, n as u64, not_before).await;
                if tx.send((sent + half_rtt, buf)).await.is_err() || cut {
                    break;
                }
            }
        }
    };
    let writer = async move {
        while let Some((arrival, buf)) = rx.recv().await {
            tokio::time::sleep_until(arrival).await;
            if to.write_all(&buf).await.is_err() {
                // The receiver is gone: stop reading from the sender too.
                rx.close();
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Finds HTTP/1 request heads in a client's byte stream: a head ends at an
/// empty line, and a `Content-Length` body after it is skipped. A chunked
/// request body (uploads; a pull never sends one) stops the search for the
/// rest of the connection.
#[derive(Default)]
struct RequestCounter {
    head: Vec<u8>,
    body_left: u64,
    lost: bool,
    /// The heads found and not yet taken.
    done: Vec<String>,
}

/// Longest head kept while looking for its end.
const MAX_HEAD: usize = 64 * 1024;

impl RequestCounter {
    /// Feeds the next bytes; returns how many request heads ended in them.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut heads = 0;
        while !bytes.is_empty() && !self.lost {
            if self.body_left > 0 {
                let skip = (self.body_left as usize).min(bytes.len());
                self.body_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let searched_from = self.head.len().saturating_sub(3);
            self.head.extend_from_slice(bytes);
            bytes = &[];
            let Some(end) = find(&self.head[searched_from..], b"\r\n\r\n") else {
                self.lost = self.head.len() > MAX_HEAD;
                continue;
            };
            let end = searched_from + end + 4;
            heads += 1;
            let rest = self.head.split_off(end);
            let head = std::mem::take(&mut self.head);
            match body_length(&head) {
                Some(length) => self.body_left = length,
                None => self.lost = true,
            }
            self.done.push(String::from_utf8_lossy(&head).into_owned());
            // What followed the head is the body and further requests.
            return heads + self.feed(&rest);
        }
        heads
    }
}

/// Changes the last digit of the first byte position in a
/// `Content-Range: bytes A-B/N` header in `buf`; returns whether there was
/// one. (Registries write the header name in this case.)
fn move_range_start(buf: &mut [u8]) -> bool {
    const HEADER: &[u8] = b"Content-Range: bytes ";
    let Some(at) = find(buf, HEADER) else {
        return false;
    };
    let digits = buf[at + HEADER.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return false;
    }
    let last = at + HEADER.len() + digits - 1;
    buf[last] = b'0' + (buf[last] - b'0' + 1) % 10;
    true
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the body that follows a request head: its
/// `Content-Length`, 0 without one; `None` for a chunked body.
fn body_length(head: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(head);
    let mut length = 0;
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok()?;
        }
    }
    Some(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_counted_across_reads_and_bodies_skipped() {
        let mut c = RequestCounter::default();
        assert_eq!(c.feed(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r"), 0);
        assert_eq!(c.feed(b"\nHEAD /v2/x HTTP/1.1\r\n\r\nGET /"), 2);
        assert_eq!(
            c.feed(b"y HTTP/1.1\r\n\r\nPUT /z HTTP/1.1\r\nContent-Length: 8\r\n\r\n\r\n\r\n"),
            2
        );
        assert_eq!(c.feed(b"1234GET / HTTP/1.1\r\n\r\n"), 1);
        assert!(!c.lost);
        let lines: Vec<&str> = c.done.iter().map(|h| h.lines().next().unwrap()).collect();
        assert_eq!(
            lines,
            [
                "GET /v2/ HTTP/1.1",
                "HEAD /v2/x HTTP/1.1",
                "GET /y HTTP/1.1",
                "PUT /z HTTP/1.1",
                "GET / HTTP/1.1"
            ]
        );
        assert_eq!(c.done[0], "GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn a_wrong_range_moves_only_the_first_position() {
        let mut head =
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 1039-2047/9999\r\n\r\n".to_vec();
        assert!(move_range_start(&mut head));
        assert!(find(&head, b"Content-Range: bytes 1030-2047/9999\r\n").is_some());
        assert!(!move_range_start(&mut b"HTTP/1.1 200 OK\r\n\r\n".to_vec()));
    }

    #[test]
    fn a_chunked_body_stops_the_counting() {
        let mut c = RequestCounter::default();
        let n = c.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n");
        assert_eq!(n, 1);
        assert!(c.lost);
        assert_eq!(c.feed(b"GET / HTTP/1.1\r\n\r\n"), 0);
    }

    #[test]
    fn transmission_follows_the_rate() {
        assert_eq!(
            LinkProfile::FAR.transmission(25_000_000),
            Duration::from_secs(1)
        );
        assert_eq!(LinkProfile::named("region"), Some(LinkProfile::REGION));
        assert_eq!(LinkProfile::named("moon"), None);
    }
}
