//! virtio-rng (entropy device, type 4): fills the guest's buffers from the host's `getrandom`.

mod device;
mod persist;
#[cfg(test)]
mod tests;

pub use device::{Rng, fill_random};

/// Virtio device type of the entropy device.
pub const RNG_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request, so one request cannot make the host fill gigabytes.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
