//! What a virtio-net device talks to: a [`NetBackend`] takes the Ethernet frames the guest sends
//! and holds the frames for the guest until the device has receive buffers for them.
//!
//! The device never drops a frame it was given and never makes the backend drop one: a backend
//! whose queue toward the guest is full stops producing (a user-mode stack keeps the data in its
//! TCP buffers), and the device drains that queue whenever the guest adds receive buffers. The
//! one exception is a frame no receive buffers the guest can post would hold (longer than
//! [`super::MAX_FRAME_LEN`], than a whole ring of its buffers, or without `MRG_RXBUF` than one
//! buffer): the device consumes it and counts it as dropped, or the queue would be wedged behind
//! it forever.

use std::os::fd::RawFd;

/// The host side of a virtio-net device. Runs on the VM's event loop, called by the device only.
pub trait NetBackend: Send {
    /// Takes one Ethernet frame the guest transmitted (without the virtio-net header), copied out
    /// of guest memory by the device. Never blocks; a frame it cannot use is dropped and counted
    /// by the backend (a NIC on a wire would lose it the same way).
    fn transmit(&mut self, frame: &[u8]);
    /// The next frame for the guest, if one is ready (without the virtio-net header); the same
    /// frame until [`Self::consume_receive`], which the device calls once it has written the
    /// frame into guest buffers (or dropped it: see the module docs).
    fn peek_receive(&mut self) -> Option<&[u8]>;
    /// Removes the frame [`Self::peek_receive`] returned.
    fn consume_receive(&mut self);
    /// An fd that becomes readable when the backend has host-side work (host sockets, timers,
    /// requests from the VM handle); the device's event loop watches it and then calls
    /// [`Self::process`].
    fn event_fd(&self) -> Option<RawFd>;
    /// Does the backend's host-side work: what `event_fd` announced and what the frames given to
    /// [`Self::transmit`] since the last call started. Consumes the event so the loop does not spin.
    fn process(&mut self);
    /// Whether the backend can take frames from the guest whose TCP/UDP checksum is partial
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`: the guest left it for the device to complete) and give
    /// the guest frames whose checksum it did not compute. Only then does the device offer
    /// `VIRTIO_NET_F_CSUM` and `VIRTIO_NET_F_GUEST_CSUM`. A backend that passes frames on to a
    /// real network (TAP) says no: a partial checksum would reach that network wrong.
    fn checksum_offload(&self) -> bool {
        false
    }
    /// Told (by a backend that said [`Self::checksum_offload`]) what the driver accepted, when it
    /// acks its features (also when a device continues from its state, and `false, false` at a
    /// reset): with `from_guest_partial` the TCP/UDP checksums of frames from the guest may be
    /// partial or anything (the backend must not check them), with `to_guest_unchecked` the
    /// device tells the guest that frames for it were checked (`VIRTIO_NET_HDR_F_DATA_VALID`),
    /// so the backend need not compute their TCP/UDP checksums.
    fn set_checksum_offload(&mut self, from_guest_partial: bool, to_guest_unchecked: bool) {
        let _ = (from_guest_partial, to_guest_unchecked);
    }
    /// The link's MTU, if the backend sets one (68 to 65535): the device then offers
    /// `VIRTIO_NET_F_MTU` with it, and the guest's driver brings the interface up with that MTU.
    /// `None` (the default): the guest chooses (Linux: 1500).
    fn mtu(&self) -> Option<u16> {
        None
    }
}

/// A backend with no network behind it: it drops what the guest sends and has nothing for it.
/// A device built without a network gets this (its link is up, and nothing answers).
#[derive(Debug, Default)]
pub struct Unconnected;

impl NetBackend for Unconnected {
    fn transmit(&mut self, _frame: &[u8]) {}
    fn peek_receive(&mut self) -> Option<&[u8]> {
        None
    }
    fn consume_receive(&mut self) {}
    fn event_fd(&self) -> Option<RawFd> {
        None
    }
    fn process(&mut self) {}
}
