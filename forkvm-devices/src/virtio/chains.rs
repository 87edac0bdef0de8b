//! The driver's descriptor chains as every device but virtio-blk (which has its own ring reader,
//! `block/ring.rs`, held to the same rules) takes them: checked once, then used only through
//! the checked copy, within a per-turn budget.
//!
//! [`next_chain`] pops the next chain the driver made available and walks it once into a
//! [`Chain`]: the descriptors in order, each read a single time, so a guest rewriting them
//! meanwhile changes nothing the device sees. A chain that breaks a rule ends the pass with a
//! [`ChainError`] (the transport then sets `DEVICE_NEEDS_RESET`):
//!
//! - an available index more than a queue's worth ahead of the device's;
//! - a descriptor outside the table, a chain longer than the queue (or looping);
//! - `VIRTQ_DESC_F_INDIRECT`: no forkvm device offers `VIRTIO_F_INDIRECT_DESC`;
//! - a non-empty buffer outside guest memory.
//!
//! virtio-queue's own `DescriptorChain` follows indirect tables of up to 65,535 entries whether
//! or not they were negotiated; devices here read descriptors only through [`Chain`] (vsock
//! hands `virtio-vsock` the raw chain too, which reads at most its first two descriptors).
//!
//! A [`Budget`] bounds the work one queue notification does: at most
//! [`MAX_DESCRIPTORS_PER_TURN`] descriptors and [`MAX_BYTES_PER_TURN`] bytes moved. When it runs
//! out with chains still available, [`next_chain`] yields nothing and marks the budget; the
//! transport then signals the queue again, so the rest is served on the event loop's next turn,
//! after whatever else (a pause, another device) is waiting. A rate-limited device's budget is
//! also capped by what its buckets allow ([`Budget::within`], see
//! [`rate_limit`](super::rate_limit)); the budget counts the operations (chains) and bytes a
//! turn used, for the transport to charge the buckets.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMemoryMmap;
use super::rate_limit::Allowance;

/// Most descriptors one notification of one queue walks before the rest waits for the next
/// turn of the event loop (four chains of a full 256-entry queue; 1,024 one-descriptor chains).
pub const MAX_DESCRIPTORS_PER_TURN: usize = 1024;
/// Most bytes a device moves between guest memory and the host for one notification of one
/// queue before the rest waits for the next turn (at least one chain is always served).
pub const MAX_BYTES_PER_TURN: usize = 256 << 10;

/// Why a chain (or the available ring) cannot be used: an error of the driver.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The available index claims more new entries than the ring holds.
    #[error("available index {idx} is more than {size} ahead of {next}")]
    AvailIndex {
        /// The driver's available index.
        idx: u16,
        /// The device's next available entry.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain names a descriptor outside the table.
    #[error("descriptor index {index} outside a table of {size}")]
    OutsideTable {
        /// The index named.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain loops or is longer than the queue.
    #[error("descriptor chain from {head} loops or is longer than the queue")]
    TooLong {
        /// The chain's head.
        head: u16,
    },
    /// An indirect descriptor: `VIRTIO_F_INDIRECT_DESC` was not negotiated.
    #[error("indirect descriptor {index} (VIRTIO_F_INDIRECT_DESC was not negotiated)")]
    Indirect {
        /// The indirect descriptor's index.
        index: u16,
    },
    /// A buffer outside guest memory.
    #[error("buffer of {len} bytes at {addr:#x} outside guest memory")]
    OutsideMemory {
        /// The buffer's guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The rings or the table could not be read.
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// What one notification of one queue may still do (see the module docs). Shared by reference
/// between a device's loop and the closures that serve each chain, hence the cells.
#[derive(Debug)]
pub struct Budget {
    descriptors: Cell<usize>,
    bytes: Cell<usize>,
    /// What the rate limits still allow this turn (`u64::MAX` without a limit).
    limited_ops: Cell<u64>,
    limited_bytes: Cell<u64>,
    /// What the turn used.
    ops_used: Cell<u64>,
    bytes_used: Cell<u64>,
    more: Cell<bool>,
}

impl Budget {
    /// A fresh budget for one turn: [`MAX_DESCRIPTORS_PER_TURN`], [`MAX_BYTES_PER_TURN`].
    pub fn per_turn() -> Self {
        Self::within(Allowance::default())
    }

    /// A fresh budget for one turn, capped also by what a rate limiter allows.
    pub fn within(allowance: Allowance) -> Self {
        Self {
            descriptors: Cell::new(MAX_DESCRIPTORS_PER_TURN),
            bytes: Cell::new(MAX_BYTES_PER_TURN),
            limited_ops: Cell::new(allowance.ops.unwrap_or(u64::MAX)),
            limited_bytes: Cell::new(allowance.bytes.unwrap_or(u64::MAX)),
            ops_used: Cell::new(0),
            bytes_used: Cell::new(0),
            more: Cell::new(false),
        }
    }

    /// A budget that never runs out, for paths whose work the host bounds rather than the
    /// guest (frames or socket data waiting for the guest's receive buffers).
    pub fn unlimited() -> Self {
        Self::unlimited_within(Allowance::default())
    }

    /// A budget bounded only by what a rate limiter allows: for what the host pushes to the
    /// guest (the receive direction's limit), whose work the host bounds.
    pub fn unlimited_within(allowance: Allowance) -> Self {
        Self {
            descriptors: Cell::new(usize::MAX),
            bytes: Cell::new(usize::MAX),
            ..Self::within(allowance)
        }
    }

    /// Counts `bytes` moved between guest memory and the host.
    pub fn charge_bytes(&self, bytes: usize) {
        self.bytes.set(self.bytes.get().saturating_sub(bytes));
        self.charge_limited_bytes(bytes);
    }

    /// Counts `bytes` against the rate limit only, for a device that bounds its turn's bytes
    /// itself (virtio-blk, whose turn may move more than [`MAX_BYTES_PER_TURN`]).
    pub fn charge_limited_bytes(&self, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.limited_bytes
            .set(self.limited_bytes.get().saturating_sub(bytes));
        self.bytes_used
            .set(self.bytes_used.get().saturating_add(bytes));
    }

    /// Counts one operation (a chain taken).
    pub fn charge_op(&self) {
        self.limited_ops
            .set(self.limited_ops.get().saturating_sub(1));
        self.ops_used.set(self.ops_used.get().saturating_add(1));
    }

    /// The operations and bytes charged so far.
    pub fn used(&self) -> (u64, u64) {
        (self.ops_used.get(), self.bytes_used.get())
    }

    /// Counts `descriptors` walked.
    pub fn charge_descriptors(&self, descriptors: usize) {
        self.descriptors
            .set(self.descriptors.get().saturating_sub(descriptors));
    }

    /// Whether the budget is spent: no further chain should be started this turn.
    pub fn spent(&self) -> bool {
        self.descriptors.get() == 0
            || self.bytes.get() == 0
            || self.limited_ops.get() == 0
            || self.limited_bytes.get() == 0
    }

    /// Notes that work was left for the next turn.
    pub fn leave_more(&self) {
        self.more.set(true);
    }

    /// Whether a device stopped with work left because the budget was spent: the transport
    /// signals the queue again.
    pub fn more(&self) -> bool {
        self.more.get()
    }
}

/// A chain the driver made available, walked once and checked (see the module docs).
pub struct Chain<'m> {
    head: u16,
    descriptors: Vec<Descriptor>,
    raw: DescriptorChain<&'m GuestMemoryMmap>,
}

/// Whether the driver made chains available on `queue` that the device has not taken.
fn has_available(queue: &Queue, memory: &GuestMemoryMmap) -> Result<bool, ChainError> {
    let idx = queue
        .avail_idx(memory, Ordering::Acquire)
        .map_err(|e| match e {
            virtio_queue::Error::GuestMemory(e) => ChainError::Memory(e),
            _ => ChainError::Memory(vm_memory::GuestMemoryError::InvalidGuestAddress(
                GuestAddress(queue.avail_ring()),
            )),
        })?;
    Ok(idx.0 != queue.next_avail())
}

/// The next chain the driver made available on `queue`, checked: `None` when there is none, the
/// queue is not ready, or `budget` is spent (then marked if chains are left for the next turn).
/// The chain and the descriptors walked are charged to `budget`; the bytes the device moves are
/// the device's to charge.
pub fn next_chain<'m>(
    queue: &mut Queue,
    memory: &'m GuestMemoryMmap,
    budget: &Budget,
) -> Result<Option<Chain<'m>>, ChainError> {
    if !queue.ready() || queue.avail_ring() == 0 {
        // virtio-queue treats a ring at address 0 as a queue never set up.
        return Ok(None);
    }
    if budget.spent() {
        if has_available(queue, memory)? {
            budget.leave_more();
        }
        return Ok(None);
    }
    let size = queue.size();
    let next = queue.next_avail();
    let popped = queue.iter(memory).map(|mut chains| chains.next());
    let raw = match popped {
        Ok(raw) => raw,
        Err(virtio_queue::Error::QueueNotReady) => None,
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let idx = queue
                .avail_idx(memory, Ordering::Acquire)
                .map(|i| i.0)
                .unwrap_or(next);
            return Err(ChainError::AvailIndex { idx, next, size });
        }
        Err(virtio_queue::Error::GuestMemory(e)) => return Err(ChainError::Memory(e)),
        Err(_) => {
            return Err(ChainError::Memory(
                vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(queue.avail_ring())),
            ));
        }
    };
    let Some(raw) = raw else {
        return Ok(None);
    };
    let head = raw.head_index();
    let descriptors = walk(memory, GuestAddress(queue.desc_table()), size, head)?;
    budget.charge_descriptors(descriptors.len());
    budget.charge_op();
    Ok(Some(Chain {
        head,
        descriptors,
        raw,
    }))
}

/// Reads the chain at `head` of the table at `table` (of `size` descriptors), checking each
/// descriptor as the module docs say.
fn walk(
    memory: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut descriptors = Vec::new();
    let mut index = head;
    loop {
        if descriptors.len() == usize::from(size) {
            return Err(ChainError::TooLong { head });
        }
        if index >= size {
            return Err(ChainError::OutsideTable { index, size });
        }
        let addr = table
            .checked_add(u64::from(index) * 16)
            .ok_or(ChainError::OutsideTable { index, size })?;
        let desc: Descriptor = memory.read_obj(addr).map_err(ChainError::Memory)?;
        if desc.refers_to_indirect_table() {
            return Err(ChainError::Indirect { index });
        }
        let len = desc.len();
        // An empty buffer names no memory (drivers leave its address at 0).
        if len != 0 && !usize::try_from(len).is_ok_and(|len| memory.check_range(desc.addr(), len)) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().raw_value(),
                len,
            });
        }
        descriptors.push(desc);
        if !desc.has_next() {
            return Ok(descriptors);
        }
        index = desc.next();
    }
}

impl<'m> Chain<'m> {
    /// The head descriptor's index: the chain's ID in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The checked descriptors, in order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// virtio-queue's view of the same chain, for code that needs it (virtio-vsock's packet
    /// parser, which reads at most two descriptors of it).
    pub fn raw(&mut self) -> &mut DescriptorChain<&'m GuestMemoryMmap> {
        &mut self.raw
    }

    fn buffers(&self, writable: bool) -> impl Iterator<Item = &Descriptor> {
        self.descriptors
            .iter()
            .filter(move |d| d.is_write_only() == writable && d.len() > 0)
    }

    /// Bytes in the device-readable buffers.
    pub fn readable_len(&self) -> usize {
        self.buffers(false)
            .map(|d| d.len() as usize)
            .fold(0, usize::saturating_add)
    }

    /// Bytes in the device-writable buffers.
    pub fn writable_len(&self) -> usize {
        self.buffers(true)
            .map(|d| d.len() as usize)
            .fold(0, usize::saturating_add)
    }

    /// Fills `buf` from the start of the device-readable buffers (fewer bytes if they hold
    /// fewer); returns how many bytes were read.
    pub fn read(&self, memory: &GuestMemoryMmap, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        for desc in self.buffers(false) {
            if done == buf.len() {
                break;
            }
            let n = (buf.len() - done).min(desc.len() as usize);
            memory
                .read_slice(&mut buf[done..done + n], desc.addr())
                .map_err(ChainError::Memory)?;
            done += n;
        }
        Ok(done)
    }

    /// Writes `parts`, one after the other, into the device-writable buffers, as far as they
    /// hold; returns how many bytes were written.
    pub fn write(&self, memory: &GuestMemoryMmap, parts: &[&[u8]]) -> Result<usize, ChainError> {
        let mut buffers = self.buffers(true);
        let (mut at, mut room) = (GuestAddress(0), 0usize);
        let mut written = 0;
        for part in parts {
            let mut data = *part;
            while !data.is_empty() {
                if room == 0 {
                    let Some(desc) = buffers.next() else {
                        return Ok(written);
                    };
                    (at, room) = (desc.addr(), desc.len() as usize);
                }
                let (now, rest) = data.split_at(data.len().min(room));
                memory.write_slice(now, at).map_err(ChainError::Memory)?;
                room -= now.len();
                written += now.len();
                // Inside the checked buffer: `room` bytes remain after `at + now.len()`.
                at = at.unchecked_add(now.len() as u64);
                data = rest;
            }
        }
        Ok(written)
    }
}
