//! The transmit path: each chain the guest makes available on the transmit queue is checked and
//! copied out of guest memory in one pass (what the backend gets is what was checked, whatever
//! the guest writes into the shared buffers afterwards), stripped of its virtio-net header and
//! handed to the backend.

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::{MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, NET_HDR_LEN, NetBackend, NetStats, csum};
use crate::virtio::chains::next_chain;
use crate::virtio::{Budget, Chain, DeviceError, GuestMemoryMmap, INT_USED_RING, Interrupt};

/// Longest transmit chain: the header and the largest frame.
pub(super) const MAX_TX_CHAIN_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

fn bad(why: String) -> DeviceError {
    DeviceError::BadRequest(why)
}

/// The transmit path's buffer, reused from frame to frame (at most [`MAX_TX_CHAIN_LEN`] bytes).
#[derive(Default)]
pub(super) struct Transmitter {
    buf: Vec<u8>,
}

impl Transmitter {
    /// Sends the frames available on `queue` to `backend` within `budget` (the rest on the
    /// event loop's next turn, so a guest that keeps adding cannot hold the loop) and interrupts
    /// the driver once if it asked to be told. With `complete_checksums`, partial checksums are
    /// completed first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn transmit(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
        backend: &mut dyn NetBackend,
        stats: &NetStats,
        complete_checksums: bool,
    ) -> Result<(), DeviceError> {
        let mut used_any = false;
        while let Some(chain) = next_chain(queue, memory, budget)? {
            let head = chain.head();
            self.read_chain(&chain, memory)?;
            budget.charge_bytes(self.buf.len());
            // read_chain checked that the buffer holds at least the header.
            let (header, frame) = self.buf.split_at_mut(NET_HDR_LEN);
            match complete_checksums.then(|| csum::complete(header, frame)) {
                Some(Err(bad)) => {
                    crate::ratelimit::guest_warn!(
                        "virtio-net: frame of {} bytes dropped: its checksum fields (start {}, \
                         offset {}) lie outside it",
                        bad.len,
                        bad.start,
                        bad.offset
                    );
                    NetStats::count(&stats.0.tx_dropped);
                }
                _ => {
                    backend.transmit(frame);
                    NetStats::count(&stats.0.tx_frames);
                }
            }
            queue.add_used(memory, head, 0)?;
            used_any = true;
        }
        if used_any && queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }

    /// Copies the header and frame of `chain` into the buffer; refuses a chain with a
    /// device-writable descriptor, a buffer outside guest memory, more than
    /// [`MAX_CHAIN_DESCRIPTORS`] descriptors, or a length below [`NET_HDR_LEN`] or above
    /// [`MAX_TX_CHAIN_LEN`].
    fn read_chain(
        &mut self,
        chain: &Chain<'_>,
        memory: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        self.buf.clear();
        for (n, descriptor) in chain.descriptors().iter().enumerate() {
            if n >= MAX_CHAIN_DESCRIPTORS {
                return Err(bad(format!(
                    "transmit chain of more than {MAX_CHAIN_DESCRIPTORS} descriptors"
                )));
            }
            if descriptor.is_write_only() {
                return Err(bad("device-writable descriptor in a transmit chain".into()));
            }
            let start = self.buf.len();
            let end = usize::try_from(descriptor.len())
                .ok()
                .and_then(|len| start.checked_add(len))
                .filter(|end| *end <= MAX_TX_CHAIN_LEN)
                .ok_or_else(|| {
                    bad(format!(
                        "transmit chain longer than {MAX_TX_CHAIN_LEN} bytes"
                    ))
                })?;
            self.buf.resize(end, 0);
            // In bounds: the buffer was just resized to `end` >= `start`.
            memory
                .read_slice(&mut self.buf[start..], descriptor.addr())
                .map_err(|e| DeviceError::Queue(virtio_queue::Error::GuestMemory(e)))?;
        }
        if self.buf.len() < NET_HDR_LEN {
            return Err(bad(format!(
                "transmit chain of {} bytes, shorter than the virtio-net header",
                self.buf.len()
            )));
        }
        Ok(())
    }
}
