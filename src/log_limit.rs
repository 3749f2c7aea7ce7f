//! Rate limiting of log lines that hostile or failing peers can cause at
//! request rate (a guest sending bad chains, a full LUN failing every
//! write): a burst, then silence for the rest of the window, and the next
//! line that gets through says how many were suppressed.

use std::time::{Duration, Instant};

/// Limits one kind of log line: [`LogLimiter::BURST`] lines per
/// [`LogLimiter::WINDOW`], then the rest are counted, not logged.
#[derive(Debug)]
pub struct LogLimiter {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// Lines allowed per window.
    pub const BURST: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(5);

    /// A limiter whose first window starts now.
    pub fn new() -> Self {
        LogLimiter {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns Some(number of lines suppressed before this one) if a line
    /// may be logged, None if it must be dropped.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window_start) > Self::WINDOW {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The suffix for a line that follows suppressed ones: "" or
/// " (N similar lines suppressed)".
pub fn suppressed_note(suppressed: u64) -> String {
    if suppressed > 0 {
        format!(" ({suppressed} similar lines suppressed)")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_silence_then_the_count() {
        let mut l = LogLimiter::new();
        let t0 = l.window_start;
        for _ in 0..LogLimiter::BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), None);
        let later = t0 + LogLimiter::WINDOW + Duration::from_millis(1);
        assert_eq!(l.allow_at(later), Some(2));
        assert_eq!(l.allow_at(later), Some(0));
        assert_eq!(suppressed_note(2), " (2 similar lines suppressed)");
        assert_eq!(suppressed_note(0), "");
    }
}
