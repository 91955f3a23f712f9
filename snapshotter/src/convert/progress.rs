//! Progress display: indicatif bars when a person watches stderr; otherwise
//! hidden bars (the conversion logs `tracing` lines instead).

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Debug)]
pub(crate) struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Self {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A bar counting `len` bytes.
    pub fn bytes(&self, len: u64, prefix: String) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        multi.add(ProgressBar::new(len).with_style(style).with_prefix(prefix))
    }

    /// A spinner for a step without a known size.
    pub fn spinner(&self, message: String) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new_spinner().with_message(message));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}
