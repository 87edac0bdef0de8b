//! Checks of a transport state read back from a snapshot ([`TransportState::check_saved`]):
//! every register and queue value the transport would use as a size, an index or an address.

use virtio_queue::Queue;

use super::TransportState;
use crate::virtio::rate_limit::{RateLimit, RateLimitError};
use crate::virtio::saved::SavedStateError;
use crate::virtio::{INT_CONFIG, INT_USED_RING};

/// More queues than any device of this crate has (vsock has three).
const MAX_QUEUES: usize = 16;

impl TransportState {
    /// The limit on what the device pushes to the guest (unlimited for a device without a
    /// receive direction).
    pub fn rx_rate_limit(&self) -> RateLimit {
        self.rx_rate_limit
    }

    /// Checks a state read back from a snapshot: a status byte, known interrupt bits, rate
    /// limits that can hold, at most [`MAX_QUEUES`] queues, each a valid virtio queue (sizes,
    /// alignment), and the rings of a ready queue all in guest RAM (`in_ram(addr, len)`), with
    /// no address arithmetic that overflows. (`queue_sel` may be any value: the transport reads
    /// it through `get`, as the driver may write any.)
    pub fn check_saved(&self, in_ram: &dyn Fn(u64, u64) -> bool) -> Result<(), SavedStateError> {
        if self.status > 0xff {
            return Err(SavedStateError::new(
                "status",
                format_args!("{:#x}", self.status),
                "not a virtio status byte",
            ));
        }
        if self.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(SavedStateError::new(
                "interrupt_status",
                format_args!("{:#x}", self.interrupt_status),
                "interrupt bits no transport raises",
            ));
        }
        for (name, limit) in [
            ("rate_limit", &self.rate_limit),
            ("rx_rate_limit", &self.rx_rate_limit),
        ] {
            if let Err(e) = limit.check() {
                return Err(SavedStateError::new(
                    name,
                    format_args!("{limit:?}"),
                    match e {
                        RateLimitError::ZeroSize => "a bucket of size 0",
                        RateLimitError::ZeroRefill => "a bucket refilled in no time",
                        RateLimitError::NoReceiveDirection => "not a limit",
                    },
                ));
            }
        }
        if self.queues.len() > MAX_QUEUES {
            return Err(SavedStateError::new(
                "queues",
                format_args!("{} queues", self.queues.len()),
                "more queues than any device has",
            ));
        }
        for (index, saved) in self.queues.iter().enumerate() {
            let state = saved.0;
            let field = |name: &str| format!("queues[{index}].{name}");
            if Queue::try_from(state).is_err() {
                return Err(SavedStateError::new(
                    field("size"),
                    format_args!(
                        "{} of {} (rings at {:#x}, {:#x}, {:#x})",
                        state.size,
                        state.max_size,
                        state.desc_table,
                        state.avail_ring,
                        state.used_ring
                    ),
                    "not a valid virtio queue (sizes, ring alignment)",
                ));
            }
            if !state.ready {
                continue;
            }
            // Each ring's length for `size` entries, event index fields included (virtio 1.2
            // §2.7): at most 16 * 32768 bytes, no overflow.
            let size = u64::from(state.size);
            for (name, addr, len) in [
                ("desc_table", state.desc_table, 16 * size),
                ("avail_ring", state.avail_ring, 6 + 2 * size),
                ("used_ring", state.used_ring, 6 + 8 * size),
            ] {
                if addr.checked_add(len).is_none() || !in_ram(addr, len) {
                    return Err(SavedStateError::new(
                        field(name),
                        format_args!("{addr:#x}"),
                        "a ready queue's ring outside guest RAM",
                    ));
                }
            }
        }
        Ok(())
    }
}
