//! A virtio driver for tests and benchmarks: programs a transport through its registers and
//! builds descriptor chains in guest memory, the way a guest would.
// Test support (built for tests and the `test-utils` feature only): a broken test set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
pub use super::mmio::{S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, reg};
use super::{GuestMemoryMmap, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::bus::BusDevice;
use crate::trigger::IrqTrigger;

/// Guest memory size.
pub const MEM_SIZE: usize = 0x10_0000;
/// Descriptor table of queue 0.
pub const DESC: u64 = 0x1000;
/// Available ring of queue 0.
pub const AVAIL: u64 = 0x2000;
/// Used ring of queue 0.
pub const USED: u64 = 0x3000;
/// Where tests put data buffers.
pub const BUF: u64 = 0x8000;
/// Queue size the driver programs (room for 42 three-descriptor requests).
pub const QUEUE_SIZE: u16 = 128;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;

/// Distance between the ring areas of consecutive queues.
pub const QUEUE_STRIDE: u64 = 0x1_0000;

/// A transport and the guest memory its driver works in.
pub struct Driver {
    /// The device under test, behind its transport.
    pub transport: MmioTransport,
    /// The guest memory holding queues and buffers.
    pub memory: GuestMemoryMmap,
    /// The queue the ring helpers work on (its rings lie `QUEUE_STRIDE` apart from queue 0's).
    queue: u16,
}

impl Driver {
    /// A driver for `device` in fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self::with_memory(device, memory)
    }

    /// A driver for `device` in `memory` (at least [`MEM_SIZE`] bytes from address 0).
    pub fn with_memory(device: Box<dyn VirtioDevice>, memory: GuestMemoryMmap) -> Self {
        let interrupt = Interrupt::new(IrqTrigger::new().unwrap());
        let transport = MmioTransport::new(device, memory.clone(), interrupt).unwrap();
        Self {
            transport,
            memory,
            queue: 0,
        }
    }

    /// A 32-bit register read.
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// A 32-bit register write.
    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Resets the device and negotiates `features`; returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, S_ACKNOWLEDGE);
        self.write(reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.write(reg::STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        self.read(reg::STATUS)
    }

    /// Programs the selected queue with [`QUEUE_SIZE`] entries at the given addresses and marks it ready.
    pub fn setup_queue(&mut self, desc: u64, avail: u64, used: u64) {
        self.program_queue(u32::from(QUEUE_SIZE), desc, avail, used);
    }

    /// Programs the selected queue with `size` entries (whatever the value) at the given
    /// addresses and writes 1 to `QueueReady`.
    pub fn program_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.write(reg::QUEUE_SEL, u32::from(self.queue));
        self.write(reg::QUEUE_NUM, size);
        for (low, value) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            self.write(low, value as u32);
            self.write(low + 4, (value >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }

    /// Negotiates VERSION_1 plus `extra` features, sets up every queue and goes live.
    pub fn start_with(&mut self, extra: u64) {
        assert_ne!(
            self.negotiate((1 << VIRTIO_F_VERSION_1) | extra) & S_FEATURES_OK,
            0
        );
        for q in 0..self.transport.queue_events().len() as u16 {
            self.select(q);
            let base = self.base();
            self.setup_queue(DESC + base, AVAIL + base, USED + base);
        }
        self.select(0);
        self.write(
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        self.serve_activation();
    }

    /// Lets the "event loop" serve what going live signalled: every queue, once. A queue may
    /// also hold a signal from before a reset (work a turn left for the next one, which a real
    /// event loop would have served by then): it is served with the activation's.
    pub fn serve_activation(&mut self) {
        for q in 0..self.transport.queue_events().len() {
            assert!(self.transport.queue_events()[q].read().unwrap() >= 1);
            self.transport.process_queue(q);
        }
    }

    /// Makes the ring helpers (and `setup_queue`) work on queue `q`.
    pub fn select(&mut self, q: u16) {
        self.queue = q;
    }

    fn base(&self) -> u64 {
        QUEUE_STRIDE * u64::from(self.queue)
    }

    /// Negotiates VERSION_1 only, sets up queue 0 and goes live.
    pub fn start(&mut self) {
        self.start_with(0);
    }

    /// Writes descriptor `index`.
    pub fn descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + self.base() + 16 * u64::from(index);
        self.memory.write_obj(addr, GuestAddress(at)).unwrap();
        self.memory.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.memory.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a chain of (address, length, device-writable) buffers starting at descriptor
    /// `head` and makes it available.
    pub fn chain(&self, head: u16, parts: &[(u64, u32, bool)]) {
        for (i, (addr, len, writable)) in parts.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == parts.len();
            let flags = if *writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.descriptor(index, *addr, *len, flags, index + 1);
        }
        self.make_available(head);
    }

    /// Puts the chain starting at descriptor `head` in the available ring.
    pub fn make_available(&self, head: u16) {
        let avail = AVAIL + self.base();
        let idx: u16 = self.memory.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.memory
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Notifies the selected queue and lets the "event loop" serve it: one turn, then as many
    /// more as the transport asks for (by signalling the queue again).
    pub fn notify(&mut self) {
        self.notify_once();
        while self.turn_pending() {
            self.serve_turn();
        }
    }

    /// Notifies the selected queue and lets the "event loop" take one turn at it.
    pub fn notify_once(&mut self) {
        let q = usize::from(self.queue);
        self.write(reg::QUEUE_NOTIFY, q as u32);
        self.serve_turn();
    }

    /// Whether the selected queue's eventfd is signalled (the event loop would serve it).
    pub fn turn_pending(&self) -> bool {
        let q = usize::from(self.queue);
        // Reading clears it; signal it again for `serve_turn`.
        match self.transport.queue_events()[q].read() {
            Ok(n) => {
                self.transport.queue_events()[q].write(n).unwrap();
                true
            }
            Err(_) => false,
        }
    }

    /// One turn of the "event loop" at the selected queue: takes its signal and serves it. The
    /// signal may count several notifications (an eventfd adds them up: a turn at another queue
    /// may have signalled this one too), served in one turn as the event loop does.
    pub fn serve_turn(&mut self) {
        let q = usize::from(self.queue);
        assert!(self.transport.queue_events()[q].read().unwrap() >= 1);
        self.transport.process_queue(q);
    }

    /// The used ring's index and the length of used element `n`.
    pub fn used(&self, n: u16) -> (u16, u32) {
        let used = USED + self.base();
        let idx: u16 = self.memory.read_obj(GuestAddress(used + 2)).unwrap();
        let len: u32 = self
            .memory
            .read_obj(GuestAddress(used + 4 + 8 * u64::from(n) + 4))
            .unwrap();
        (idx, len)
    }
}
