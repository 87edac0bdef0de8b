//! virtio-balloon (type 5): the guest gives pages back to the host on request (inflate), takes
//! them again (deflate), reports its memory statistics, and reports ranges of free memory that
//! the host may reclaim (free page reporting).
//!
//! The device checks what the guest names and hands the pages it gave up (or reported free) to a
//! [`RamDiscard`], which the VMM implements over the RAM of the balloon's own VM: it frees their
//! backing memory, and the guest reads zeros (or, over a frozen image, the image's contents) if
//! it touches them again. The host drives the device through a [`BalloonHandle`]: it sets the target size, reads what the guest
//! reports, and asks for fresh statistics; those requests reach the device on the VM's event loop
//! through the eventfd of [`VirtioDevice::host_event`].
//!
//! Nothing the guest sends can make the host loop without bound or allocate without bound: a PFN
//! chain holds at most [`MAX_PFNS_PER_CHAIN`] entries, a report at most [`MAX_REPORT_RANGES`]
//! ranges and a statistics buffer at most [`MAX_STATS`] entries are read. A malformed request
//! (a PFN outside guest RAM, a length that is not whole PFNs, an unaligned or overlapping range)
//! is dropped whole: nothing of it is discarded, and the handle counts it in
//! [`BalloonHandle::rejected_requests`]. Buffers outside guest memory (a report's ranges are
//! its buffers) are the transport's business: the device needs a reset, as with every device.
//! The device keeps a bitmap of the pages in the balloon (one bit per page of guest memory), so
//! that [`BalloonHandle::inflated_bytes`] counts a page inflated again without a deflation
//! between only once.

mod device;
mod handle;
mod persist;
#[cfg(test)]
mod tests;

use std::io;

use thiserror::Error;
use vm_memory::ByteValued;

pub use device::Balloon;
pub use handle::{BalloonHandle, BalloonStats};
pub use persist::BalloonState;

/// Virtio device type of the memory balloon.
pub const BALLOON_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Feature bit: the driver posts memory statistics on a stats queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature bit: the guest may deflate the balloon when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: the guest reports free page ranges on a reporting queue.
pub const F_REPORTING: u32 = 5;
/// Size of the pages a PFN counts (`VIRTIO_BALLOON_PFN_SHIFT` = 12), whatever the guest's.
pub const PAGE_SIZE: u64 = 1 << 12;
/// Pages in a MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Most PFNs read from one inflate or deflate chain (Linux sends at most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most ranges read from one free page report (Linux sends at most 32).
pub const MAX_REPORT_RANGES: usize = 256;
/// Most statistics entries read from one stats buffer (Linux 6.x knows 16 tags).
pub const MAX_STATS: usize = 64;

const QUEUE_SIZE: u16 = 256;
/// One statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY_SIZE: usize = 10;

/// `struct virtio_balloon_config` as the driver reads it (virtio 1.2 §5.5.4; Linux
/// `include/uapi/linux/virtio_balloon.h`). virtio-bindings 0.2.7 has no balloon bindings, so
/// this is its layout, field for field; each field holds its little-endian value.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct BalloonConfig {
    /// The host's target, in pages.
    num_pages: u32,
    /// The pages in the guest's balloon (the one field the driver writes).
    actual: u32,
    /// With `VIRTIO_BALLOON_F_FREE_PAGE_HINT`, which the device does not offer.
    free_page_hint_cmd_id: u32,
    /// With `VIRTIO_BALLOON_F_PAGE_POISON`, which the device does not offer.
    poison_val: u32,
}

// SAFETY: `BalloonConfig` is `repr(C)` and made of `u32`s only, so it has no padding and every
// byte pattern is a valid value.
unsafe impl ByteValued for BalloonConfig {}

/// The bytes of the config space the device exposes: `num_pages` and `actual`, up to the fields
/// of the features it does not offer (a read past the end reads zeroes).
const CONFIG_SIZE: usize = std::mem::offset_of!(BalloonConfig, free_page_hint_cmd_id);
const ACTUAL_OFFSET: u64 = std::mem::offset_of!(BalloonConfig, actual) as u64;

/// Tags of the statistics a Linux guest reports (virtio 1.2 §5.5.6.3).
pub mod stat_tag {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor page faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory in bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory in bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory in bytes (as the guest's `MemAvailable`).
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches in bytes.
    pub const DISK_CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// Errors of the host's balloon requests.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BalloonError {
    /// The target is larger than the guest's RAM.
    #[error("a balloon of {requested} pages does not fit in the guest's {max} pages of RAM")]
    TargetTooLarge {
        /// Requested target in 4 KiB pages.
        requested: u64,
        /// Guest RAM in 4 KiB pages.
        max: u64,
    },
}

/// Frees the host memory behind guest RAM: what a balloon does with the pages its guest gives up
/// or reports free. The VMM implements it over the RAM of the balloon's own VM (and nothing
/// else), and gives it to the balloon when it creates it ([`Balloon::new`],
/// [`Balloon::from_state`]).
pub trait RamDiscard: Send + Sync {
    /// Frees the host memory behind `len` bytes of guest RAM at guest-physical `addr`: whole
    /// [`PAGE_SIZE`] pages inside one region of guest memory (the balloon checked them against
    /// the memory it serves). Afterwards the guest reads zeros there or, where its RAM maps a
    /// frozen image privately, the image's contents.
    fn discard(&self, addr: u64, len: u64) -> io::Result<()>;
}
