//! A budget of log lines per period, for failures that can repeat once per
//! request (a broken image read in a loop, a full cache disk): the first
//! lines of each period are written, the rest are counted and the count is
//! reported by the next line written.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct LogBudget {
    lines: u64,
    period: Duration,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    logged: u64,
    suppressed: u64,
}

impl LogBudget {
    /// At most `lines` lines per `period`.
    pub(crate) const fn new(lines: u64, period: Duration) -> Self {
        Self {
            lines,
            period,
            window: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Counts one event. `Some(n)` when it may be logged, `n` being how many
    /// events were not logged since the last line; `None` when the period's
    /// budget is spent.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if window
            .start
            .is_none_or(|start| now.duration_since(start) >= self.period)
        {
            window.start = Some(now);
            window.logged = 0;
        }
        if window.logged < self.lines {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_budget_are_counted_and_reported_by_the_next_period() {
        let budget = LogBudget::new(3, Duration::from_millis(200));
        let admitted: Vec<_> = (0..10).filter_map(|_| budget.admit()).collect();
        assert_eq!(
            admitted,
            [0, 0, 0],
            "three lines, nothing suppressed before"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(budget.admit(), Some(7), "the seven suppressed are reported");
        assert_eq!(budget.admit(), Some(0));
    }
}
