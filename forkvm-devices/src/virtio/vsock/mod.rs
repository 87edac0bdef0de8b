//! virtio-vsock (type 19): stream sockets between the guest and host programs.
//!
//! The guest's packets arrive on the transmit queue; the device answers and delivers host data
//! on the receive queue. Each connection joins a guest port to a host Unix socket
//! ([`connection`]); the host side — the listener in Firecracker's hybrid style and in-process
//! connections — is [`host`]. Every socket lives in one epoll set whose fd the VM's event loop
//! watches, so the device never blocks and never polls.
//!
//! What a guest controls is checked: packets that do not parse (bad chain, bad length, outside
//! guest memory) are dropped; packets for another CID, another socket type, an unknown
//! connection or in the wrong state are answered with a reset; a guest that sends beyond its
//! credit has its connection reset; receive buffers that cannot hold a packet put the device
//! into `DEVICE_NEEDS_RESET`. The host holds at most [`MAX_CONNECTIONS`] connections with at most
//! [`connection::TX_BUFFER_SIZE`] bytes buffered each, and at most [`MAX_CONTROL_PACKETS`]
//! pending control packets.

pub mod connection;
mod device;
pub mod host;
mod muxer;
pub mod packet;
mod persist;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::io;

pub use device::Vsock;
pub use persist::VsockState;

/// `struct virtio_vsock_config` as the driver reads it (virtio 1.2 §5.10.4; Linux
/// `include/uapi/linux/virtio_vsock.h`, packed). virtio-bindings 0.2.7 has no vsock bindings, so
/// this is its layout; the field holds its little-endian value.
#[derive(Clone, Copy, Default)]
#[repr(C, packed)]
struct VsockConfig {
    /// The guest's context ID.
    guest_cid: u64,
}

// SAFETY: `VsockConfig` is `repr(C, packed)` and holds one `u64`, so it has no padding and every
// byte pattern is a valid value.
unsafe impl vm_memory::ByteValued for VsockConfig {}

/// Virtio device type of the socket device.
pub const VSOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// The receive queue (device → guest packets).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (guest → device packets).
pub const TX_QUEUE: usize = 1;
/// The event queue (transport events: a forked child's device sends a transport reset).
pub const EVENT_QUEUE: usize = 2;
/// The event a forked child's guest receives: every connection it had is gone
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, virtio 1.2 §5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet, and largest receive data buffer accepted (Linux uses 64 KiB).
pub const MAX_PACKET_DATA: u32 = 64 << 10;
/// Most open connections; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets waiting for receive buffers; a guest that posts none while asking for
/// answers loses the excess (only resets of unknown connections can pile up that far).
pub const MAX_CONTROL_PACKETS: usize = 4 * MAX_CONNECTIONS;
/// First port given to host-initiated connections (as in Firecracker: above the usual guest
/// ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events handled per host event.
const EVENTS_PER_ROUND: usize = 32;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0–2) or not a 32-bit value Linux accepts.
    #[error("guest CID {0} is invalid: use a value from 3 to 4294967294")]
    InvalidCid(u64),
    /// The host sockets could not be set up.
    #[error("cannot set up the vsock host side")]
    Host(#[from] io::Error),
}
