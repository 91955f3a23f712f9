//! A registry token that expires while an image is mounted and being read,
//! with real components in every mode: `lode-fsd` reads from a real
//! `docker-registry` with token authentication (the test kit's token
//! server, `lode_tests::token_server`, issuing tokens that work for a few
//! seconds). Once the registry refuses the daemon's token, reads of data
//! not read before still return the files' bytes: the daemon takes the
//! registry's 401, gets a new token and goes on. With the token server
//! down, such reads fail with EIO within the deadline, and succeed again
//! once it is back. Root only (FUSE).

use std::time::{Duration, SystemTime};

use lode_tests::failover::{file_content, file_name, push_image, RegistryImage, FILES};
use lode_tests::lode::{timed_read, Counters, Mode, ModeFsd};
use lode_tests::token_server::{IssuedToken, TokenServer};
use lode_tests::{lode_prerequisites, wait_until, LodeBinaries, Registry};

/// How long the daemon's tokens work: the reads before expiry must end
/// well within it, even on a loaded machine.
const TTL: Duration = Duration::from_secs(6);
/// How long the tokens of the pushes work: long enough for any push.
const SETUP_TTL: Duration = Duration::from_secs(600);
/// Each read's deadline (`fetch.deadline_secs`).
const DEADLINE: Duration = Duration::from_secs(3);
/// Longest a read that must fail may take: the kernel sends a failed
/// read's page again once (see `fsd_failures.rs`), each bounded by the
/// deadline; then scheduling.
const FAIL_BOUND: Duration = Duration::from_secs(2 * 3 + 3);
/// Readers of cold files at once right after the token expired.
const READERS: usize = 4;
/// Longest wait for the registry to refuse a token past its TTL. Were the
/// registry's 60 s leeway not accounted for, it would take a minute more.
const EXPIRY_BOUND: Duration = Duration::from_secs(TTL.as_secs() + 10);

lode_tests::every_mode!(token_expiry);

struct Fixture {
    bins: LodeBinaries,
    registry: Registry,
    image: RegistryImage,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Option<Self> {
        let bins = lode_prerequisites()?;
        let registry = Registry::start_with_token_auth(SETUP_TTL)
            .expect("start docker-registry with token authentication");
        let image = push_image(&bins.lodectl, &registry, "token");
        registry.token_server().unwrap().set_ttl(TTL);
        Some(Self {
            bins,
            registry,
            image,
            work: tempfile::tempdir().unwrap(),
        })
    }

    fn tokens(&self) -> &TokenServer {
        self.registry.token_server().unwrap()
    }

    /// A daemon of `mode` reading the image from the registry, with a short
    /// deadline and one retry, fetching only the chunks read (no readahead,
    /// no neighbours), so that each file is cold until it is read and
    /// nothing is fetched while the test waits.
    fn start(&self, mode: Mode) -> ModeFsd {
        let config = self.image.cold_fsd_config(self.work.path(), DEADLINE);
        ModeFsd::start(
            &self.bins.fsd,
            mode,
            &self.image.fsd_options(Some(config)),
            false,
        )
        .unwrap_or_else(|e| panic!("[{mode}] start lode-fsd: {e}"))
    }

    /// Waits until the registry refuses `token`; returns how long after
    /// its issue that was.
    fn wait_refused(&self, mode: Mode, token: &IssuedToken) -> Duration {
        wait_until(EXPIRY_BOUND, "the registry to refuse the token", || {
            self.registry.status_with_token("/v2/", token.token()) == Some(401)
        })
        .unwrap_or_else(|e| panic!("[{mode}] {e}"));
        let age = token.issued_at.elapsed().unwrap_or_default();
        assert!(
            SystemTime::now() >= token.expires_at && age + Duration::from_secs(1) >= TTL,
            "[{mode}] the registry refused a token {age:?} after its issue, before its expiry"
        );
        age
    }
}

/// Reads `files` at once, one reader thread each, and checks their bytes;
/// returns how long each read took.
fn read_ok(fsd: &ModeFsd, files: &[u64], when: &str) -> Vec<Duration> {
    let mode = fsd.mode();
    let readers: Vec<_> = files
        .iter()
        .map(|&file| {
            let path = fsd.join(file_name(file));
            (file, std::thread::spawn(move || timed_read(path)))
        })
        .collect();
    readers
        .into_iter()
        .map(|(file, reader)| {
            let (result, took) = reader.join().unwrap_or_else(|_| {
                panic!("[{mode}] {when}: the reader of {} failed", file_name(file))
            });
            let data = result.unwrap_or_else(|e| {
                panic!(
                    "[{mode}] {when}, {}: {e}\nthe daemon's log:\n{}",
                    file_name(file),
                    fsd.log_text()
                )
            });
            assert!(
                data == file_content(file),
                "[{mode}] {when}, {}: wrong bytes",
                file_name(file)
            );
            took
        })
        .collect()
}

fn counters(fsd: &ModeFsd) -> Counters {
    fsd.settled_counters()
        .unwrap_or_else(|e| panic!("[{}] counters: {e}", fsd.mode()))
}

fn latest(tokens: &TokenServer) -> IssuedToken {
    tokens.issued().pop().expect("no token issued")
}

fn token_expiry(mode: Mode) {
    let Some(fx) = Fixture::new() else {
        return;
    };
    let tokens = fx.tokens();
    let fsd = fx.start(mode);
    let mut files = 0..FILES;
    let mut cold = |n: usize| -> Vec<u64> {
        let taken: Vec<u64> = files.by_ref().take(n).collect();
        assert_eq!(taken.len(), n, "out of cold files");
        taken
    };

    // Before the token expires.
    let issued_before = tokens.tokens_issued();
    let mut fresh = Vec::new();
    for file in cold(3) {
        fresh.extend(read_ok(&fsd, &[file], "before expiry"));
    }
    assert!(
        tokens.tokens_issued() > issued_before,
        "[{mode}] the daemon read from the registry without a token"
    );
    let first = latest(tokens);
    assert!(
        first.scopes.iter().any(|s| s.contains(":token-lode:")),
        "[{mode}] the daemon's token is for {:?}",
        first.scopes
    );
    assert_eq!(
        fx.registry.status_with_token("/v2/", first.token()),
        Some(200),
        "[{mode}] the registry refused a fresh token"
    );

    // The registry refuses the daemon's token from now on.
    let log_mark = fx.registry.requests().len();
    let before = counters(&fsd);
    let issued_at_expiry = tokens.tokens_issued();
    let expired_after = fx.wait_refused(mode, &first);

    // Data not read before, by readers at once: the daemon must get a new
    // token, one for all of them (re-authentication is serialized).
    let burst = cold(READERS);
    let took = read_ok(&fsd, &burst, "after expiry");
    let new_tokens = tokens.issued()[issued_at_expiry..].to_vec();
    eprintln!(
        "[{mode}] token refused {expired_after:?} after its issue (TTL {TTL:?}); \
         {READERS} reads of cold files after expiry took {took:?} \
         (before expiry: {fresh:?}); {} new token(s), {} issued in all",
        new_tokens.len(),
        tokens.tokens_issued()
    );
    assert!(!new_tokens.is_empty(), "[{mode}] no new token after expiry");
    // A second token is due only if the first expired during the reads.
    assert!(
        new_tokens.len() == 1 || SystemTime::now() >= new_tokens[0].expires_at,
        "[{mode}] {} tokens for one expiry",
        new_tokens.len()
    );
    let after = counters(&fsd);
    assert_eq!(
        after.backend_errors, before.backend_errors,
        "[{mode}] the expired token cost failed range requests"
    );
    let blobs: Vec<_> = fx.registry.requests()[log_mark..]
        .iter()
        .filter(|e| e.path.contains("/blobs/"))
        .cloned()
        .collect();
    // The refused requests' challenges named the token service: the
    // daemon went there without asking /v2/ for the challenge again.
    let pings: Vec<_> = fx.registry.requests()[log_mark..]
        .iter()
        .filter(|e| e.path == "/v2/" && e.user_agent.starts_with("lode/"))
        .cloned()
        .collect();
    assert!(pings.is_empty(), "[{mode}] {pings:?}");
    let refused = blobs
        .iter()
        .position(|e| e.status == 401)
        .unwrap_or_else(|| panic!("[{mode}] no blob request refused after expiry: {blobs:?}"));
    assert!(
        blobs[refused..]
            .iter()
            .any(|e| e.status == 206 || e.status == 200),
        "[{mode}] no blob served after the 401: {blobs:?}"
    );
    eprintln!(
        "[{mode}] registry after expiry: {} blob request(s) refused (401), {} served",
        blobs.iter().filter(|e| e.status == 401).count(),
        blobs
            .iter()
            .filter(|e| e.status == 206 || e.status == 200)
            .count()
    );
    let log = fsd.log_text();
    for token in tokens.issued() {
        assert!(
            !log.contains(token.token()),
            "[{mode}] the daemon logged a token"
        );
    }

    // The token server down: once the token expires, reads of data not
    // read before fail within the deadline, never hang.
    tokens.stop();
    fx.wait_refused(mode, &latest(tokens));
    let issued_while_down = tokens.tokens_issued();
    let before = counters(&fsd);
    let file = cold(1)[0];
    let (result, took) = timed_read(fsd.join(file_name(file)));
    match result {
        Ok(_) => panic!("[{mode}] read {} without a token", file_name(file)),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "[{mode}] {e}"),
    }
    eprintln!("[{mode}] token server down: EIO after {took:?}");
    assert!(
        took <= FAIL_BOUND,
        "[{mode}] the read took {took:?}, more than {FAIL_BOUND:?}"
    );
    assert!(
        counters(&fsd).backend_errors > before.backend_errors,
        "[{mode}] the refused reads were not counted"
    );
    assert_eq!(tokens.tokens_issued(), issued_while_down, "[{mode}]");

    // Back: the same file reads, with a new token.
    tokens.restart().expect("restart the token server");
    let took = read_ok(&fsd, &[file], "token server back")[0];
    eprintln!("[{mode}] token server back: the file read in {took:?}");
    assert!(
        tokens.tokens_issued() > issued_while_down,
        "[{mode}] read without a new token"
    );
}
