//! Host input for the console: the bounded queue it waits in for the guest's receive buffers
//! ([`ConsoleInputQueue`]), filled from a host fd by the event loop's feeder ([`ConsoleSink`]).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{INPUT_BUFFER_SIZE, RX_QUEUE};
use crate::input::InputSink;
use crate::sync::lock;
use crate::virtio::mmio::MmioTransport;

/// Input waiting for the guest, shared by the device and its input feeder.
#[derive(Clone)]
pub struct ConsoleInputQueue {
    pub(super) bytes: Arc<Mutex<VecDeque<u8>>>,
    /// Signalled when the device took bytes out, so the feeder may read again.
    pub(super) drained: Arc<EventFd>,
}

impl ConsoleInputQueue {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            bytes: Arc::default(),
            drained: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Queues host input for the guest (at most [`INPUT_BUFFER_SIZE`] bytes wait; the rest is
    /// refused); returns how many bytes were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut pending = self.lock();
        let n = bytes.len().min(INPUT_BUFFER_SIZE - pending.len());
        pending.extend(&bytes[..n]);
        n
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        lock(&self.bytes)
    }
}

/// A console's input queue as an [`InputSink`]: delivered bytes wait in the queue and go to
/// the guest as soon as it has receive buffers.
pub struct ConsoleSink {
    transport: Arc<Mutex<MmioTransport>>,
    input: ConsoleInputQueue,
}

impl ConsoleSink {
    /// Delivers into `input`, the queue of the console behind `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>, input: ConsoleInputQueue) -> Self {
        Self { transport, input }
    }
}

impl InputSink for ConsoleSink {
    fn room(&self) -> usize {
        INPUT_BUFFER_SIZE - self.input.lock().len()
    }

    fn deliver(&mut self, bytes: &[u8]) {
        self.input.push(bytes);
        lock(&self.transport).process_queue(RX_QUEUE);
    }

    fn room_made(&self) -> &EventFd {
        &self.input.drained
    }
}
