//! virtio-console (type 3), one port without multiport: the guest's `hvc0`. Output goes to the
//! same kinds of sinks as the serial console; input comes from a host fd through the event loop.
//!
//! Input is held in a bounded buffer ([`INPUT_BUFFER_SIZE`]) until the guest posts receive
//! buffers; while it is full the event loop stops reading the fd, so a fast producer never makes
//! the host buffer without bound.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{
    DeviceError, DeviceState, GuestMemoryMmap, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice,
    serve_queue,
};
use crate::input::InputSink;
use crate::sync::lock;

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

/// Input waiting for the guest, shared by the device and its input feeder.
#[derive(Clone)]
pub struct ConsoleInputQueue {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    /// Signalled when the device took bytes out, so the feeder may read again.
    drained: Arc<EventFd>,
}

impl ConsoleInputQueue {
    fn new() -> io::Result<Self> {
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

    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        lock(&self.bytes)
    }
}

/// A console at a fork: the host input its guest has not taken yet (every child gets it).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    pending_input: Vec<u8>,
}

/// The console device.
pub struct Console {
    output: Box<dyn Write + Send>,
    input: ConsoleInputQueue,
    chunk: Vec<u8>,
}

impl Console {
    /// A console writing the guest's output to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> io::Result<Self> {
        Ok(Self {
            output,
            input: ConsoleInputQueue::new()?,
            chunk: Vec::new(),
        })
    }

    /// A console that continues from `state`, writing the guest's output to `output`.
    pub fn from_state(state: &ConsoleState, output: Box<dyn Write + Send>) -> io::Result<Self> {
        let console = Self::new(output)?;
        console.input.push(&state.pending_input);
        Ok(console)
    }

    /// The input queue a [`ConsoleSink`] fills.
    pub fn input(&self) -> ConsoleInputQueue {
        self.input.clone()
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        serve_queue(queue, memory, interrupt, |chain| {
            let mut reader = chain.reader(memory)?;
            let len = reader.available_bytes().min(MAX_TX_CHAIN);
            self.chunk.resize(len, 0);
            reader.read_exact(&mut self.chunk)?;
            if let Err(e) = self
                .output
                .write_all(&self.chunk)
                .and_then(|()| self.output.flush())
            {
                // The guest's output is dropped, as a serial line with nobody listening would.
                log::warn!("virtio-console: output dropped: {e}");
            }
            Ok(0)
        })
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let input = self.input.clone();
        let mut pending = input.lock();
        let mut took = false;
        while !pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = chain.writer(memory)?;
            let n = writer.available_bytes().min(pending.len());
            let (front, back) = pending.as_slices();
            let from_front = n.min(front.len());
            writer.write_all(&front[..from_front])?;
            writer.write_all(&back[..n - from_front])?;
            pending.drain(..n);
            // `n` is at most INPUT_BUFFER_SIZE.
            queue.add_used(memory, head, n as u32)?;
            took = true;
        }
        drop(pending);
        if took {
            let _ = input.drained.write(1);
            if queue.needs_notification(memory)? {
                interrupt.raise(super::INT_USED_RING);
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        CONSOLE_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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
    ) -> Result<(), DeviceError> {
        let queue = &mut queues[index];
        match index {
            RX_QUEUE => self.receive(queue, memory, interrupt),
            _ => self.transmit(queue, memory, interrupt),
        }
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Console(ConsoleState {
            pending_input: self.input.lock().iter().copied().collect(),
        }))
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_util::SharedWriter;
    use crate::virtio::test_driver::{BUF, Driver};

    fn console() -> (Driver, SharedWriter, ConsoleInputQueue) {
        let out = SharedWriter::default();
        let console = Console::new(Box::new(out.clone())).unwrap();
        let input = console.input();
        let mut d = Driver::new(Box::new(console));
        d.start();
        (d, out, input)
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let (mut d, out, _) = console();
        d.memory.write_slice(b"hello, ", GuestAddress(BUF)).unwrap();
        d.memory
            .write_slice(b"host\n", GuestAddress(BUF + 0x100))
            .unwrap();
        d.select(TX_QUEUE as u16);
        d.chain(0, &[(BUF, 7, false), (BUF + 0x100, 5, false)]);
        d.notify();
        assert_eq!(d.used(0), (1, 0));
        assert_eq!(&*out.contents(), b"hello, host\n");
    }

    #[test]
    fn host_input_waits_for_receive_buffers_and_is_never_lost() {
        let (mut d, _, input) = console();
        assert_eq!(input.push(b"abcdef"), 6);
        d.transport.process_queue(RX_QUEUE);
        assert_eq!(d.used(0).0, 0, "no receive buffer yet");
        d.chain(0, &[(BUF, 4, true)]);
        d.notify();
        assert_eq!(d.used(0), (1, 4));
        assert_eq!(
            input.drained.read().unwrap(),
            1,
            "the feeder is told there is room"
        );
        d.chain(1, &[(BUF + 0x100, 64, true)]);
        d.notify();
        assert_eq!(d.used(1), (2, 2));
        let mut got = [0u8; 6];
        d.memory
            .read_slice(&mut got[..4], GuestAddress(BUF))
            .unwrap();
        d.memory
            .read_slice(&mut got[4..], GuestAddress(BUF + 0x100))
            .unwrap();
        assert_eq!(&got, b"abcdef");
        assert!(input.lock().is_empty());
    }

    #[test]
    fn host_input_survives_a_driver_reset() {
        // Every driver resets the device as it starts: input typed before then must wait for
        // it, as on a serial line.
        let (mut d, _, input) = console();
        input.push(b"early");
        d.write(crate::virtio::mmio::reg::STATUS, 0);
        d.start();
        d.chain(0, &[(BUF, 64, true)]);
        d.notify();
        assert_eq!(d.used(0), (1, 5));
        let mut got = [0u8; 5];
        d.memory.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(&got, b"early");
    }
}
