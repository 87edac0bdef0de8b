//! What a driver writes into a queue's registers while it sets the queue up, kept as written
//! and checked when it sets `QueueReady` (virtio-queue's setters silently drop values they
//! refuse, which would leave the queue at its defaults: guest address 0, the largest size).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

/// Alignment of a split queue's descriptor table, available and used rings (virtio 1.1 §2.6).
const DESC_ALIGN: u64 = 16;
const AVAIL_ALIGN: u64 = 2;
const USED_ALIGN: u64 = 4;

/// What the driver wrote into a queue's registers while setting it up, checked and handed to
/// the queue when it sets `QueueReady` (virtio-queue silently drops values it refuses).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct QueueSetup {
    pub(super) size: u32,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
}

impl QueueSetup {
    /// The values `queue` holds now.
    pub(super) fn of(queue: &Queue) -> Self {
        Self {
            size: u32::from(queue.size()),
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
        }
    }

    /// Hands the values to `queue`; why not, if one breaks the rules.
    pub(super) fn apply(&self, queue: &mut Queue) -> Result<(), String> {
        let size = u16::try_from(self.size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s <= queue.max_size())
            .ok_or_else(|| {
                format!(
                    "size {} (not a power of two up to {})",
                    self.size,
                    queue.max_size()
                )
            })?;
        if self.avail == 0 {
            // virtio-queue takes a ring there for a queue never set up and serves nothing.
            return Err("the available ring at guest address 0".into());
        }
        for (what, addr, align) in [
            ("descriptor table", self.desc, DESC_ALIGN),
            ("available ring", self.avail, AVAIL_ALIGN),
            ("used ring", self.used, USED_ALIGN),
        ] {
            if !addr.is_multiple_of(align) {
                return Err(format!("{what} at {addr:#x} (not {align}-byte aligned)"));
            }
        }
        queue.try_set_size(size).map_err(|e| e.to_string())?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| e.to_string())?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| e.to_string())?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

pub(super) fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

pub(super) fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
}
