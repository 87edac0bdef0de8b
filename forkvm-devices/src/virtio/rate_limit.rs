//! Rate limits on a device's queues: token buckets on bytes and on operations (chains served),
//! so that one VM's disk or network traffic cannot starve the other VMs of the process.
//!
//! A [`RateLimit`] holds up to two [`Bucket`]s. The transport asks the [`Limiter`] before each
//! queue turn how much it may do ([`Limiter::allowance`]), caps the turn's
//! [`Budget`](super::Budget) with it, and charges what the device did afterwards. A queue
//! whose bucket is empty is not served: its chains stay in the ring until the transport's timer
//! ([`Limiter::wait`]) says tokens are back. The design is in `docs/rate-limits.md`.
//!
//! The buckets are our own rather than `governor`'s: a virtio request is taken whole and its
//! size is known only once it is parsed, so a bucket must accept a request larger than what it
//! holds (it goes into debt, paid back before the next request), and the transport needs the
//! time until tokens are back to arm a timerfd on the event loop. Time comes from a [`Clock`],
//! which tests replace.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A queue that ran dry resumes once this fraction of its bucket is back (at least one token):
/// at most this many timer wake-ups per refill time.
const RESUME_FRACTION: u64 = 16;

/// A rate limit that cannot hold.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RateLimitError {
    /// A bucket of size 0 would never let anything through.
    #[error("a rate-limit bucket needs a size above 0")]
    ZeroSize,
    /// A bucket refilled in no time limits nothing.
    #[error("a rate-limit bucket needs a refill time above 0")]
    ZeroRefill,
    /// A receive limit for a device that pushes nothing to the guest on its own (only
    /// virtio-net and virtio-vsock do).
    #[error("the device has no receive direction to limit")]
    NoReceiveDirection,
}

/// One token bucket: `size` tokens, refilled from empty in `refill_time` (so `size /
/// refill_time` tokens a second on average), plus `one_time_burst` tokens given once at the
/// start (not refilled). A token is a byte or an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// The most tokens it holds.
    pub size: u64,
    /// Extra tokens available once, before the bucket's own.
    pub one_time_burst: u64,
    /// How long an empty bucket takes to fill.
    pub refill_time: Duration,
}

impl Bucket {
    /// A bucket of `size` tokens refilled in `refill_time`, without a one-time burst.
    pub fn new(size: u64, refill_time: Duration) -> Self {
        Self {
            size,
            one_time_burst: 0,
            refill_time,
        }
    }

    /// The same bucket with `tokens` given once at the start.
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = tokens;
        self
    }

    fn check(&self) -> Result<(), RateLimitError> {
        if self.size == 0 {
            return Err(RateLimitError::ZeroSize);
        }
        if self.refill_time.is_zero() {
            return Err(RateLimitError::ZeroRefill);
        }
        Ok(())
    }
}

/// The limits of one device: on bytes moved and on operations (chains served); `None` is no
/// limit. The default limits nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Bytes moved between guest memory and the host.
    pub bytes: Option<Bucket>,
    /// Requests (descriptor chains) served.
    pub ops: Option<Bucket>,
}

impl RateLimit {
    /// No limit.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Whether it limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Checks both buckets.
    pub fn check(&self) -> Result<(), RateLimitError> {
        self.bytes
            .iter()
            .chain(self.ops.iter())
            .try_for_each(Bucket::check)
    }
}

/// Where the limiter reads the time: monotonic, as a duration since some fixed start.
pub trait Clock: Send + Sync {
    /// The time now.
    fn now(&self) -> Duration;
}

/// The host's monotonic clock.
#[derive(Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that moves only when told: for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Moves the clock `by` forward.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(nanos))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// A bucket's state.
#[derive(Debug)]
struct TokenBucket {
    config: Bucket,
    /// What is left of the one-time burst.
    burst: u64,
    tokens: u64,
    /// Tokens taken beyond what the bucket held: repaid before anything else is let through.
    debt: u64,
    /// The time up to which refills are counted.
    refilled_at: Duration,
}

impl TokenBucket {
    fn new(config: Bucket, now: Duration) -> Self {
        Self {
            config,
            burst: config.one_time_burst,
            tokens: config.size,
            debt: 0,
            refilled_at: now,
        }
    }

    fn refill_nanos(&self) -> u128 {
        self.config.refill_time.as_nanos().max(1)
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.refilled_at).as_nanos();
        let size = u128::from(self.config.size);
        let new = elapsed.saturating_mul(size) / self.refill_nanos();
        if new == 0 {
            return;
        }
        // Time is counted up to the last whole token, so fractions carry over.
        let used = new.saturating_mul(self.refill_nanos()) / size.max(1);
        self.refilled_at = self.refilled_at.saturating_add(Duration::from_nanos(
            u64::try_from(used).unwrap_or(u64::MAX),
        ));
        let mut new = u64::try_from(new).unwrap_or(u64::MAX);
        let repaid = new.min(self.debt);
        self.debt -= repaid;
        new -= repaid;
        self.tokens = self.tokens.saturating_add(new).min(self.config.size);
        if self.tokens == self.config.size {
            self.refilled_at = now;
        }
    }

    fn available(&self) -> u64 {
        if self.debt > 0 {
            0
        } else {
            self.burst.saturating_add(self.tokens)
        }
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        let rest = n - from_burst;
        let from_tokens = rest.min(self.tokens);
        self.tokens -= from_tokens;
        self.debt = self.debt.saturating_add(rest - from_tokens);
    }

    /// How long until the bucket lets something through again (`None`: it does now).
    fn wait(&self, now: Duration) -> Option<Duration> {
        if self.available() > 0 {
            return None;
        }
        let resume = (self.config.size / RESUME_FRACTION).max(1);
        let needed = u128::from(self.debt.saturating_add(resume).saturating_sub(self.tokens));
        let size = u128::from(self.config.size).max(1);
        let nanos = needed.saturating_mul(self.refill_nanos()).div_ceil(size);
        let since = now.saturating_sub(self.refilled_at).as_nanos();
        let left = nanos.saturating_sub(since).max(1);
        Some(Duration::from_nanos(
            u64::try_from(left).unwrap_or(u64::MAX),
        ))
    }
}

/// How much a queue turn may do under the limits: `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    /// Operations (chains).
    pub ops: Option<u64>,
    /// Bytes.
    pub bytes: Option<u64>,
}

impl Allowance {
    /// Whether nothing at all may be done now.
    pub fn is_empty(&self) -> bool {
        self.ops == Some(0) || self.bytes == Some(0)
    }
}

/// A device's buckets and the clock they run on.
pub struct Limiter {
    limit: RateLimit,
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limit", &self.limit)
            .field("bytes", &self.bytes)
            .field("ops", &self.ops)
            .finish_non_exhaustive()
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(Arc::new(MonotonicClock))
    }
}

impl Limiter {
    /// A limiter that limits nothing yet, on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            limit: RateLimit::unlimited(),
            bytes: None,
            ops: None,
            clock,
        }
    }

    /// Replaces the limits (checked); buckets start full, with their one-time bursts.
    pub fn set(&mut self, limit: RateLimit) -> Result<(), RateLimitError> {
        limit.check()?;
        let now = self.clock.now();
        self.limit = limit;
        self.bytes = limit.bytes.map(|b| TokenBucket::new(b, now));
        self.ops = limit.ops.map(|b| TokenBucket::new(b, now));
        Ok(())
    }

    /// Runs the buckets on `clock` from now on.
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
        // The limits in force were checked when they were set.
        let _ = self.set(self.limit);
    }

    /// The limits in force.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn buckets(&mut self) -> impl Iterator<Item = &mut TokenBucket> {
        self.bytes.iter_mut().chain(self.ops.iter_mut())
    }

    /// What a queue turn may do now.
    pub fn allowance(&mut self) -> Allowance {
        let now = self.clock.now();
        self.buckets().for_each(|b| b.refill(now));
        Allowance {
            ops: self.ops.as_ref().map(TokenBucket::available),
            bytes: self.bytes.as_ref().map(TokenBucket::available),
        }
    }

    /// Charges what a turn did: `ops` chains, `bytes` bytes (which may exceed the allowance by
    /// the last request: the bucket goes into debt).
    pub fn charge(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
    }

    /// How long until a queue turn may do something again (`None`: now).
    pub fn wait(&mut self) -> Option<Duration> {
        let now = self.clock.now();
        self.buckets()
            .filter_map(|b| {
                b.refill(now);
                b.wait(now)
            })
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: RateLimit) -> (Limiter, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        let mut limiter = Limiter::new(clock.clone());
        limiter.set(limit).unwrap();
        (limiter, clock)
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_bucket_lets_its_size_through_then_refills_at_its_rate() {
        let (mut l, clock) = limiter(RateLimit {
            bytes: Some(Bucket::new(1000, SECOND)),
            ops: None,
        });
        assert_eq!(
            l.allowance(),
            Allowance {
                ops: None,
                bytes: Some(1000)
            }
        );
        l.charge(1, 1000);
        assert!(l.allowance().is_empty());
        // Resumes when a sixteenth of the bucket (62 bytes) is back.
        assert_eq!(l.wait(), Some(Duration::from_millis(62)));
        clock.advance(Duration::from_millis(250));
        assert_eq!(l.allowance().bytes, Some(250));
        clock.advance(10 * SECOND);
        assert_eq!(l.allowance().bytes, Some(1000), "never more than the size");
        assert_eq!(l.wait(), None);
    }

    #[test]
    fn a_request_larger_than_the_bucket_is_paid_back_before_the_next() {
        let (mut l, clock) = limiter(RateLimit {
            bytes: Some(Bucket::new(100, SECOND)),
            ops: None,
        });
        l.charge(1, 350);
        assert!(l.allowance().is_empty());
        clock.advance(2 * SECOND);
        assert!(l.allowance().is_empty(), "250 owed, 200 repaid");
        clock.advance(SECOND / 2);
        assert_eq!(l.allowance().bytes, Some(0));
        clock.advance(SECOND / 100);
        assert_eq!(l.allowance().bytes, Some(1));
    }

    #[test]
    fn the_one_time_burst_comes_first_and_is_not_refilled() {
        let (mut l, clock) = limiter(RateLimit {
            bytes: None,
            ops: Some(Bucket::new(10, SECOND).with_one_time_burst(5)),
        });
        assert_eq!(l.allowance().ops, Some(15));
        l.charge(15, 0);
        assert!(l.allowance().is_empty());
        clock.advance(10 * SECOND);
        assert_eq!(l.allowance().ops, Some(10));
    }

    #[test]
    fn fractions_of_a_token_carry_over() {
        let (mut l, clock) = limiter(RateLimit {
            bytes: None,
            ops: Some(Bucket::new(3, SECOND)),
        });
        l.charge(3, 0);
        for _ in 0..3 {
            clock.advance(Duration::from_millis(200));
            l.allowance();
        }
        // 600 ms at 3 a second is 1.8 tokens: one, and most of the next.
        assert_eq!(l.allowance().ops, Some(1));
        clock.advance(Duration::from_millis(70));
        assert_eq!(l.allowance().ops, Some(2));
    }

    #[test]
    fn bad_buckets_are_refused_and_unlimited_allows_everything() {
        let mut l = Limiter::default();
        let zero = RateLimit {
            bytes: Some(Bucket::new(0, SECOND)),
            ops: None,
        };
        assert_eq!(l.set(zero), Err(RateLimitError::ZeroSize));
        let instant = RateLimit {
            bytes: None,
            ops: Some(Bucket::new(1, Duration::ZERO)),
        };
        assert_eq!(l.set(instant), Err(RateLimitError::ZeroRefill));
        l.charge(u64::MAX, u64::MAX);
        assert_eq!(l.allowance(), Allowance::default());
        assert_eq!(l.wait(), None);
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let (mut l, clock) = limiter(RateLimit {
            bytes: Some(
                Bucket::new(u64::MAX, Duration::from_nanos(1)).with_one_time_burst(u64::MAX),
            ),
            ops: Some(Bucket::new(1, Duration::MAX)),
        });
        l.charge(u64::MAX, u64::MAX);
        l.charge(u64::MAX, u64::MAX);
        clock.advance(Duration::MAX);
        let _ = l.allowance();
        assert!(l.wait().is_some(), "the ops bucket takes ages");
    }
}
