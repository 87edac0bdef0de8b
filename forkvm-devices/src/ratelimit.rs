//! Warnings a guest can cause, rate-limited: a misbehaving guest must not be able to fill the
//! host's logs. [`guest_warn!`] logs at most [`BURST`] messages per call site in each second and
//! says how many it left out when it logs again. Every warning and error this crate logs goes
//! through it: `forkvm-devices/clippy.toml` disallows `log::warn!` and `log::error!` here.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Messages one call site logs per window at most.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
const WINDOW_MS: u64 = 1000;

/// The state of one call site of [`guest_warn!`].
#[derive(Debug)]
pub struct RateLimit {
    window_start_ms: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limit with nothing logged yet.
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a message may be logged now: `Some(n)` with the number of messages left out since
    /// the last one logged, or `None` (counted as left out).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the first call (monotonic), at least 1 so a fresh window starts at once.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(WINDOW_MS)
}

/// `log::warn!`, rate-limited per call site ([`RateLimit`]).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(left_out) = LIMIT.allow() {
            #[allow(clippy::disallowed_macros)]
            if left_out > 0 {
                log::warn!("{} ({left_out} more like it not logged)", format_args!($($arg)+));
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_the_rest_of_the_window_is_counted_and_reported() {
        let limit = RateLimit::new();
        let t = WINDOW_MS;
        for _ in 0..BURST {
            assert_eq!(limit.allow_at(t), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(limit.allow_at(t + 10), None);
        }
        assert_eq!(
            limit.allow_at(t + WINDOW_MS),
            Some(25),
            "the next window reports them"
        );
        assert_eq!(limit.allow_at(t + WINDOW_MS + 1), Some(0));
    }
}
