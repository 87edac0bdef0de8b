//! The entropy device: one request queue of write-only buffers, filled from `getrandom`.

use virtio_queue::Queue;

use super::{MAX_BYTES_PER_REQUEST, QUEUE_SIZE, RNG_DEVICE_TYPE};
use crate::virtio::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    serve_queue,
};

/// The entropy device: one request queue of write-only buffers.
#[derive(Default)]
pub struct Rng {
    buffer: Vec<u8>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        RNG_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
        _rx: &Budget,
    ) -> Result<(), DeviceError> {
        let Some(queue) = queues.get_mut(index) else {
            return Ok(());
        };
        serve_queue(queue, memory, interrupt, budget, |chain| {
            let len = chain.writable_len().min(MAX_BYTES_PER_REQUEST);
            self.buffer.resize(len, 0);
            fill_random(&mut self.buffer)?;
            let written = chain.write(memory, &[&self.buffer])?;
            budget.charge_bytes(written);
            // At most MAX_BYTES_PER_REQUEST, so it fits in u32.
            Ok(written as u32)
        })
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(self.state())
    }
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}
