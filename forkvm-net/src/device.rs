//! The smoltcp side of the link: a [`smoltcp::phy::Device`] over two frame queues. Toward smoltcp
//! it holds the one guest frame being processed; toward the guest it is a bounded queue the
//! virtio-net device drains. When that queue is full, `transmit()` says so (returns `None`) and
//! smoltcp keeps its data in the TCP buffers: nothing is dropped for backpressure.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Frames queued for the guest before smoltcp is told to wait...
pub(crate) const TO_GUEST_SOFT_CAP: usize = 512;
/// ... or bytes (with a large MTU).
const TO_GUEST_SOFT_BYTES: usize = 4 << 20;
/// The queue's hard bound: replies to guest frames (an ACK, a RST, DNS and DHCP answers) may go
/// past the soft cap, up to this; beyond it a frame is dropped and counted.
const TO_GUEST_HARD_CAP: usize = 2048;
/// The hard bound in bytes.
const TO_GUEST_HARD_BYTES: usize = 16 << 20;

/// The frame queues between smoltcp and the guest.
pub(crate) struct Link {
    /// Frames for the guest, oldest first.
    to_guest: VecDeque<Vec<u8>>,
    /// Their bytes.
    to_guest_bytes: usize,
    /// The guest frame smoltcp reads next.
    pub(crate) from_guest: Option<Vec<u8>>,
    /// Frames dropped because the queue was at its hard bound.
    pub(crate) dropped: u64,
    /// Frames queued for the guest in total.
    pub(crate) sent: u64,
    mtu: usize,
    /// The guest sends partial TCP checksums: smoltcp must not verify them.
    pub(crate) from_guest_partial: bool,
    /// The guest takes frames whose TCP checksum was not computed (the device sets
    /// `DATA_VALID`): smoltcp need not compute them.
    pub(crate) to_guest_unchecked: bool,
}

impl Link {
    pub(crate) fn new(mtu: u16) -> Self {
        Self {
            to_guest: VecDeque::new(),
            to_guest_bytes: 0,
            from_guest: None,
            dropped: 0,
            sent: 0,
            mtu: usize::from(mtu),
            from_guest_partial: false,
            to_guest_unchecked: false,
        }
    }

    /// Whether smoltcp may produce more frames for the guest.
    pub(crate) fn has_room(&self) -> bool {
        self.to_guest.len() < TO_GUEST_SOFT_CAP && self.to_guest_bytes < TO_GUEST_SOFT_BYTES
    }

    /// Queues a frame the network built (a reply), up to the hard bound.
    pub(crate) fn push(&mut self, frame: Vec<u8>) {
        if self.to_guest.len() >= TO_GUEST_HARD_CAP
            || self.to_guest_bytes + frame.len() > TO_GUEST_HARD_BYTES
        {
            self.dropped += 1;
        } else {
            self.sent += 1;
            self.to_guest_bytes += frame.len();
            self.to_guest.push_back(frame);
        }
    }

    /// The next frame for the guest.
    pub(crate) fn front(&self) -> Option<&[u8]> {
        self.to_guest.front().map(Vec::as_slice)
    }

    /// Removes the next frame for the guest.
    pub(crate) fn pop(&mut self) {
        if let Some(frame) = self.to_guest.pop_front() {
            self.to_guest_bytes -= frame.len();
        }
    }

    /// Frames queued for the guest.
    pub(crate) fn queued(&self) -> usize {
        self.to_guest.len()
    }

    /// Takes back the frames queued after the first `len` (with their counts).
    pub(crate) fn truncate(&mut self, len: usize) {
        while self.to_guest.len() > len {
            if let Some(frame) = self.to_guest.pop_back() {
                self.to_guest_bytes -= frame.len();
                self.sent -= 1;
            }
        }
    }
}

impl phy::Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.from_guest.take()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if self.has_room() {
            Some(TxToken(self))
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + crate::frames::ETHERNET_HEADER;
        // TCP only: smoltcp carries no UDP of the guest's, and the IPv4 and ICMP checksums are
        // always computed by both sides (the guest verifies IPv4 headers whatever the device
        // says). smoltcp reads these once, when its `Interface` is made (see `Stack::set_offload`).
        caps.checksum.tcp = match (self.from_guest_partial, self.to_guest_unchecked) {
            (false, false) => Checksum::Both,
            (false, true) => Checksum::Rx,
            (true, false) => Checksum::Tx,
            (true, true) => Checksum::None,
        };
        caps
    }
}

/// A guest frame for smoltcp.
pub(crate) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

/// Room for one frame toward the guest.
pub(crate) struct TxToken<'a>(&'a mut Link);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.0.push(frame);
        result
    }
}
