//! The transport's side of a device's rate limit: the [`Limiter`], which queues wait for
//! tokens, and the timerfd that wakes the event loop when they are back.
//!
//! The timer is never read: the event loop sees it readable, and re-arming or disarming it
//! (which `timerfd_settime` does) clears it, so a stale wake-up cannot block the loop in a read.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::virtio::Budget;
use crate::virtio::rate_limit::{Allowance, Clock, Limiter, RateLimit, RateLimitError};

/// The longest the timer is armed for at once (then the wait is worked out again): a bucket
/// refilled over years would not fit a timerfd.
const MAX_TIMER: Duration = Duration::from_secs(3600);

/// A device's limiter and timer.
pub(super) struct Throttle {
    limiter: Limiter,
    timer: TimerFd,
    /// Queues with work left, waiting for tokens.
    waiting: Vec<bool>,
}

impl Throttle {
    /// No limit yet, for a device of `queues` queues.
    pub(super) fn new(queues: usize) -> std::io::Result<Self> {
        Ok(Self {
            limiter: Limiter::default(),
            timer: TimerFd::new()?,
            waiting: vec![false; queues],
        })
    }

    pub(super) fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    pub(super) fn limit(&self) -> RateLimit {
        self.limiter.limit()
    }

    /// Replaces the limits; returns the queues that waited for tokens (to serve again).
    pub(super) fn set(&mut self, limit: RateLimit) -> Result<Vec<usize>, RateLimitError> {
        self.limiter.set(limit)?;
        Ok(self.take_waiting())
    }

    pub(super) fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.limiter.set_clock(clock);
    }

    /// What a turn of queue `index` may do, or `Err(retry)` when nothing: the queue then waits
    /// for the timer, or, if the timer cannot be armed (`retry`), must be signalled again.
    pub(super) fn allowance(&mut self, index: usize) -> Result<Allowance, bool> {
        let allowance = self.limiter.allowance();
        if allowance.is_empty() {
            return Err(!self.wait(index));
        }
        Ok(allowance)
    }

    /// Charges what the turn of queue `index` used. Returns whether the queue should be served
    /// again at once (it left work and tokens remain, or the timer cannot be armed); if it left
    /// work without tokens, it waits for the timer.
    pub(super) fn after_turn(&mut self, index: usize, budget: &Budget) -> bool {
        let (ops, bytes) = budget.used();
        self.limiter.charge(ops, bytes);
        if !budget.more() {
            return false;
        }
        if self.limiter.wait().is_some() {
            return !self.wait(index);
        }
        true
    }

    /// What may be done now, without waiting (the receive direction: the device is called
    /// anyway, for its host-side work, and holds back what the allowance does not cover).
    pub(super) fn allowance_now(&mut self) -> Allowance {
        self.limiter.allowance()
    }

    /// Charges what the receive direction pushed; if the device held data back
    /// ([`Budget::more`]), it waits (as queue 0) for the timer.
    pub(super) fn after_push(&mut self, budget: &Budget) {
        let (ops, bytes) = budget.used();
        self.limiter.charge(ops, bytes);
        if budget.more() {
            // If the timer cannot be armed (warned), the device resumes at its next event.
            let _ = self.wait(0);
        }
    }

    /// Arms the timer to fire at once for what waited (after the limit changed), so that it is
    /// served on the event loop.
    pub(super) fn resume_soon(&mut self) {
        let _ = self.wait(0);
    }

    /// Queue `index` waits for tokens; the timer is armed for when they are back. Returns
    /// whether it was: if not, the queue is not left waiting (its caller signals it again: a
    /// busy retry rather than a device that never resumes).
    fn wait(&mut self, index: usize) -> bool {
        let after = self.limiter.wait().unwrap_or(Duration::from_nanos(1));
        // Re-arming also moves a timer armed for another queue: the wait is the limiter's,
        // the same for every queue of the device.
        if let Err(e) = self
            .timer
            .reset(after.clamp(Duration::from_nanos(1), MAX_TIMER), None)
        {
            crate::ratelimit::guest_warn!("virtio: cannot arm the rate-limit timer: {e}");
            return false;
        }
        if let Some(w) = self.waiting.get_mut(index) {
            *w = true;
        }
        true
    }

    /// The timer fired: returns the queues to serve again.
    pub(super) fn on_timer(&mut self) -> Vec<usize> {
        // Disarming clears the expiration, so epoll stops reporting it.
        if let Err(e) = self.timer.clear() {
            crate::ratelimit::guest_warn!("virtio: cannot clear the rate-limit timer: {e}");
        }
        self.take_waiting()
    }

    fn take_waiting(&mut self) -> Vec<usize> {
        self.waiting
            .iter_mut()
            .enumerate()
            .filter_map(|(i, w)| std::mem::take(w).then_some(i))
            .collect()
    }
}
