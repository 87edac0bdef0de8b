//! virtio-net (device type 1): an Ethernet link between the guest and a [`NetBackend`] (forkvm's
//! user-mode network in crate `forkvm-net`, or a TAP device).
//!
//! One receive queue and one transmit queue, no control queue: the device offers `VERSION_1`,
//! `MAC`, `STATUS` (the link is always up) and `MRG_RXBUF`, so every buffer starts with the
//! 12-byte virtio 1.x header ([`NET_HDR_LEN`]); with a backend that can take them, also the
//! checksum offloads `CSUM` and `GUEST_CSUM` (`csum.rs`). No segmentation offloads. The transmit path (`tx.rs`) copies each
//! frame out of guest memory before the backend sees it; the receive path (`rx.rs`) leaves a frame
//! in the backend until the guest's buffers can hold all of it, and drops (and counts) only a
//! frame that no set of buffers the guest can post would ever hold.

pub mod backend;
mod csum;
mod device;
mod persist;
mod rx;
#[cfg(test)]
mod tests;
mod tx;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use backend::{NetBackend, Unconnected};
pub use device::Net;
pub use persist::NetState;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;

/// Virtio device type of the network device.
pub const NET_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// The receive queue (host → guest).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (guest → host).
pub const TX_QUEUE: usize = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header in front of every frame (virtio 1.x: `num_buffers` always present).
pub const NET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
const _: () = assert!(NET_HDR_LEN == 12);
/// Largest Ethernet frame (without the virtio-net header) the device carries either way: the
/// largest IP packet (65535 bytes) behind an Ethernet header with one VLAN tag (18 bytes). Without
/// segmentation offloads a guest sends at most its MTU plus the Ethernet header; a transmit chain
/// longer than [`NET_HDR_LEN`] + this is malformed, a received frame longer than this is dropped.
pub const MAX_FRAME_LEN: usize = 65_535 + 18;
/// Most descriptors in one chain. A Linux guest uses at most 19 per transmitted frame; a longer
/// chain is malformed (it bounds the work one chain can make the device do).
pub const MAX_CHAIN_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// What the device counts, shared with whoever watches it ([`Net::stats`]).
#[derive(Clone, Debug, Default)]
pub struct NetStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
}

impl NetStats {
    /// Frames the guest transmitted (handed to the backend).
    pub fn tx_frames(&self) -> u64 {
        self.0.tx_frames.load(Ordering::Relaxed)
    }

    /// Frames the guest transmitted that were dropped: their partial checksum could not be
    /// completed (its fields lie outside the frame).
    pub fn tx_dropped(&self) -> u64 {
        self.0.tx_dropped.load(Ordering::Relaxed)
    }

    /// Frames delivered into the guest's receive buffers.
    pub fn rx_frames(&self) -> u64 {
        self.0.rx_frames.load(Ordering::Relaxed)
    }

    /// Frames for the guest dropped because no receive buffers it can post would hold them.
    pub fn rx_dropped(&self) -> u64 {
        self.0.rx_dropped.load(Ordering::Relaxed)
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
