//! What the link to the registry delivers, learnt from the fetcher's own
//! range requests: the round trip (time to a response's first byte, server
//! time included) and the rate (bytes after the first over the time they
//! took). As BBR does, the round trip is the smallest of the recent samples
//! (queueing only adds to it) and the rate the largest (requests side by
//! side share the link, so each sees less than it).
//!
//! Their product, the bytes the link delivers in one round trip, is what a
//! fetch may add beyond what a reader needs at about no cost in time: less
//! makes the next miss pay another round trip, more only delays the bytes
//! the reader waits for.

use std::sync::Mutex;
use std::time::Duration;

/// Samples kept of each kind.
const WINDOW: usize = 16;
/// A response smaller than this says little about the rate.
const MIN_RATE_SAMPLE: u64 = 128 * 1024;
/// Nor does one whose body arrived faster than this.
const MIN_RATE_TIME: Duration = Duration::from_micros(200);

#[derive(Default)]
struct Samples {
    /// Round trips, seconds; newest last.
    rtts: Vec<f64>,
    /// Rates, bytes per second; newest last.
    rates: Vec<f64>,
}

fn push(list: &mut Vec<f64>, value: f64) {
    if list.len() == WINDOW {
        list.remove(0);
    }
    list.push(value);
}

#[derive(Default)]
pub(crate) struct LinkEstimate {
    samples: Mutex<Samples>,
}

impl LinkEstimate {
    /// Records one completed request: `bytes` in all, the first after
    /// `first_byte`, the last after `total`.
    pub(crate) fn record(&self, bytes: u64, first_byte: Duration, total: Duration) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        push(&mut s.rtts, first_byte.as_secs_f64());
        let body = total.saturating_sub(first_byte);
        if bytes >= MIN_RATE_SAMPLE && body >= MIN_RATE_TIME {
            push(&mut s.rates, bytes as f64 / body.as_secs_f64());
        }
    }

    /// Bytes the link delivers in one round trip; `None` until a request of
    /// each kind was seen.
    pub(crate) fn bytes_per_round_trip(&self) -> Option<u64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let rtt = s.rtts.iter().copied().reduce(f64::min)?;
        let rate = s.rates.iter().copied().reduce(f64::max)?;
        Some((rtt * rate) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn round_trip_is_the_least_and_rate_the_most_seen() {
        let link = LinkEstimate::default();
        assert_eq!(link.bytes_per_round_trip(), None);
        // 20 ms to the first byte, 1 MB in 10 ms more: 100 MB/s.
        link.record(1_000_000, 20 * MS, 30 * MS);
        assert_eq!(link.bytes_per_round_trip(), Some(2_000_000));
        // A request queued behind others, and one sharing the link.
        link.record(1_000_000, 60 * MS, 100 * MS);
        assert_eq!(link.bytes_per_round_trip(), Some(2_000_000));
        // Too small to tell a rate: only its round trip counts.
        link.record(4096, 10 * MS, 10 * MS);
        assert_eq!(link.bytes_per_round_trip(), Some(1_000_000));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let link = LinkEstimate::default();
        link.record(1_000_000, MS, 2 * MS);
        for _ in 0..WINDOW {
            link.record(1_000_000, 10 * MS, 20 * MS);
        }
        assert_eq!(link.bytes_per_round_trip(), Some(1_000_000));
    }
}
