//! The transport's rate limits: one on what the guest asks for through its queues, and, for a
//! device that pushes host data to the guest on its own (net, vsock), an independent one on
//! that receive direction. Each has its own buckets and timer (`throttle.rs`); the design is
//! in `docs/rate-limits.md`.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::MmioTransport;
use crate::virtio::Budget;
use crate::virtio::rate_limit::{Clock, RateLimit, RateLimitError};

impl MmioTransport {
    /// Replaces the device's rate limit (buckets start full); queues that waited for tokens are
    /// served again on the event loop's next turn.
    pub fn set_rate_limit(&mut self, limit: RateLimit) -> Result<(), RateLimitError> {
        for index in self.throttle.set(limit)? {
            self.signal(index);
        }
        Ok(())
    }

    /// The device's rate limit.
    pub fn rate_limit(&self) -> RateLimit {
        self.throttle.limit()
    }

    /// Replaces the limit on what the device pushes to the guest (buckets start full); if data
    /// waited for tokens, the device delivers it on the event loop's next turn. Refused for a
    /// device without a receive direction.
    pub fn set_rx_rate_limit(&mut self, limit: RateLimit) -> Result<(), RateLimitError> {
        let throttle = self
            .rx_throttle
            .as_mut()
            .ok_or(RateLimitError::NoReceiveDirection)?;
        if !throttle.set(limit)?.is_empty() {
            // Through the timer, so that the device is served on the event loop.
            throttle.resume_soon();
        }
        Ok(())
    }

    /// The limit on what the device pushes to the guest; `None` for a device without a receive
    /// direction.
    pub fn rx_rate_limit(&self) -> Option<RateLimit> {
        self.rx_throttle.as_ref().map(|t| t.limit())
    }

    /// Runs both rate limits on `clock` (tests move time by hand); the buckets start full.
    pub fn set_rate_limit_clock(&mut self, clock: Arc<dyn Clock>) {
        if let Some(rx) = &mut self.rx_throttle {
            rx.set_clock(clock.clone());
        }
        self.throttle.set_clock(clock);
    }

    /// The timerfd that fires when a rate-limited queue has tokens again; the event loop
    /// watches it and then calls [`Self::rate_limit_timer_fired`].
    pub fn rate_limit_timer(&self) -> RawFd {
        self.throttle.timer_fd()
    }

    /// The rate-limit timer fired: queues that waited for tokens are signalled (and served on
    /// the event loop's next turn, within what the buckets then allow).
    pub fn rate_limit_timer_fired(&mut self) {
        for index in self.throttle.on_timer() {
            self.signal(index);
        }
    }

    /// The timerfd that fires when the receive direction has tokens again (for a device that has
    /// one); the event loop watches it and then calls [`Self::rx_rate_limit_timer_fired`].
    pub fn rx_rate_limit_timer(&self) -> Option<RawFd> {
        self.rx_throttle.as_ref().map(|t| t.timer_fd())
    }

    /// The receive direction's timer fired: if the device held data back for want of tokens, it
    /// does its host-side work again, within what the buckets now allow.
    pub fn rx_rate_limit_timer_fired(&mut self) {
        let waited = self
            .rx_throttle
            .as_mut()
            .is_some_and(|t| !t.on_timer().is_empty());
        if waited {
            self.process_host_event();
        }
    }

    /// What the device may push to the guest now: its receive direction's allowance (never a
    /// reason not to call the device, which must do its host-side work anyway).
    pub(super) fn rx_budget(&mut self) -> Budget {
        match &mut self.rx_throttle {
            Some(throttle) => Budget::unlimited_within(throttle.allowance_now()),
            None => Budget::unlimited(),
        }
    }

    /// Charges what the device pushed; if it held data back, the timer is armed for when
    /// tokens are back.
    pub(super) fn after_rx(&mut self, rx: &Budget) {
        if let Some(throttle) = &mut self.rx_throttle {
            throttle.after_push(rx);
        }
    }
}
