//! virtio-console (type 3), one port without multiport: the guest's `hvc0`. Output goes to the
//! same kinds of sinks as the serial console; input comes from a host fd ([`Console::with_input`])
//! that the device reads on the VM's event loop, through [`VirtioDevice::host_event`] like every
//! device's host-side work.
//!
//! Input is held in a bounded buffer ([`INPUT_BUFFER_SIZE`]) until the guest posts receive
//! buffers; while it is full the device stops watching the fd, so a fast producer never makes
//! the host buffer without bound.
//!
//! [`VirtioDevice::host_event`]: crate::virtio::VirtioDevice::host_event

mod device;
mod input;
mod persist;
#[cfg(test)]
mod tests;

pub use device::Console;
pub use input::ConsoleInputQueue;
pub use persist::ConsoleState;

/// Virtio device type of the console.
pub const CONSOLE_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Most input bytes held for the guest.
pub const INPUT_BUFFER_SIZE: usize = 64 << 10;
/// The receive queue (host → guest).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (guest → host).
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit chain (a chain longer than this is cut).
const MAX_TX_CHAIN: usize = 64 << 10;
