//! The console device: guest output from the transmit queue to the host sink, queued host input
//! into the guest's receive buffers.

use std::io::{self, Write};
use std::os::fd::{OwnedFd, RawFd};

use virtio_queue::{Queue, QueueT};

use super::input::{ConsoleInputQueue, HostInput};
use super::{CONSOLE_DEVICE_TYPE, MAX_TX_CHAIN, QUEUE_SIZE, RX_QUEUE};
use crate::virtio::chains::next_chain;
use crate::virtio::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, serve_queue,
};

/// The console device.
pub struct Console {
    pub(super) output: Box<dyn Write + Send>,
    pub(super) input: ConsoleInputQueue,
    /// The host fd that fills `input`, if any.
    pub(super) host_input: Option<HostInput>,
    pub(super) chunk: Vec<u8>,
}

impl Console {
    /// A console writing the guest's output to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> io::Result<Self> {
        Ok(Self {
            output,
            input: ConsoleInputQueue::new()?,
            host_input: None,
            chunk: Vec::new(),
        })
    }

    /// This console, fed from the host fd `source` (a pipe, terminal or socket): the device reads
    /// it on the VM's event loop (through [`VirtioDevice::host_event`]) while its input queue has
    /// room, until the end of input.
    pub fn with_input(mut self, source: OwnedFd) -> io::Result<Self> {
        self.host_input = Some(HostInput::new(source, &self.input)?);
        Ok(self)
    }

    /// The input queue, which host input waits in for the guest's receive buffers.
    pub fn input(&self) -> ConsoleInputQueue {
        self.input.clone()
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        serve_queue(queue, memory, interrupt, budget, |chain| {
            let len = chain.readable_len().min(MAX_TX_CHAIN);
            self.chunk.resize(len, 0);
            let read = chain.read(memory, &mut self.chunk)?;
            budget.charge_bytes(read);
            if let Err(e) = self
                .output
                .write_all(&self.chunk)
                .and_then(|()| self.output.flush())
            {
                // The guest's output is dropped, as a serial line with nobody listening would.
                crate::ratelimit::guest_warn!("virtio-console: output dropped: {e}");
            }
            Ok(0)
        })
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        let input = self.input.clone();
        let mut pending = input.lock();
        let mut took = false;
        let mut result = Ok(());
        while !pending.is_empty() {
            let chain = match next_chain(queue, memory, budget) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            let head = chain.head();
            let (front, back) = pending.as_slices();
            let n = match chain.write(memory, &[front, back]) {
                Ok(n) => n,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            budget.charge_bytes(n);
            pending.drain(..n);
            // `n` is at most INPUT_BUFFER_SIZE.
            queue.add_used(memory, head, n as u32)?;
            took = true;
        }
        drop(pending);
        if took {
            let _ = input.drained.write(1);
            if queue.needs_notification(memory)? {
                interrupt.raise(INT_USED_RING);
            }
        }
        result
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
        budget: &Budget,
        _rx: &Budget,
    ) -> Result<(), DeviceError> {
        let Some(queue) = queues.get_mut(index) else {
            return Ok(());
        };
        match index {
            RX_QUEUE => self.receive(queue, memory, interrupt, budget),
            _ => self.transmit(queue, memory, interrupt, budget),
        }
    }

    fn host_event(&self) -> Option<RawFd> {
        self.host_input.as_ref().map(HostInput::fd)
    }

    fn process_host_event(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        _rx: &Budget,
    ) -> Result<(), DeviceError> {
        let Some(host_input) = &mut self.host_input else {
            return Ok(());
        };
        // Read even while the device is not live: the input waits in the queue for the driver.
        if !host_input.process(&self.input) {
            return Ok(());
        }
        match queues.get_mut(RX_QUEUE).filter(|queue| queue.ready()) {
            // Host input is bounded by the input queue's size, not by the guest.
            Some(queue) => self.receive(queue, memory, interrupt, &Budget::per_turn()),
            None => Ok(()),
        }
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Console(self.state()))
    }
}
