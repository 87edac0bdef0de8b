//! Virtio devices over the virtio-mmio transport (virtio 1.x, MMIO version 2).
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features, queues, config space)
//! and how it serves its queues once the driver has set them up. [`mmio::MmioTransport`] owns the
//! device and the queue state the driver programs through its registers, validates every value
//! the guest writes, and moves the device into `DEVICE_NEEDS_RESET` when the guest breaks the
//! rules. Queue notifications arrive on one eventfd per queue (a KVM ioeventfd in a VM) and are
//! served on the VM's event loop, each within a [`Budget`] (the rest on the loop's next turn);
//! interrupts leave through an irqfd. Devices read the driver's chains through [`chains`], which
//! checks them once (no indirect descriptors, no loops, buffers inside guest memory).

pub mod balloon;
pub mod block;
pub mod chains;
pub mod console;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rate_limit;
#[cfg(test)]
mod rate_limit_tests;
pub mod rng;
#[cfg(test)]
mod rules_tests;
pub mod saved;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_driver;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};

pub use chains::{Budget, Chain, ChainError};

use crate::trigger::IrqTrigger;

/// Guest memory as devices access it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Feature bit every forkvm device offers: virtio 1.x, no legacy interface.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a device could not serve its queues; the transport answers with `DEVICE_NEEDS_RESET`.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The guest's queue structures are unusable (bad addresses, indexes or chains).
    #[error("virtqueue error")]
    Queue(#[from] virtio_queue::Error),
    /// A descriptor chain or the available ring breaks the rules (see [`chains`]).
    #[error("unusable descriptor chain")]
    Chain(#[from] ChainError),
    /// A request was malformed.
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// The host side of the device failed.
    #[error("host I/O failed")]
    Io(#[from] std::io::Error),
}

/// The interrupt line of one device, with the interrupt status register the driver reads.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq: Arc<IrqTrigger>,
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl Interrupt {
    /// An interrupt raised through `irq`.
    pub fn new(irq: IrqTrigger) -> Self {
        Self {
            status: Arc::default(),
            irq: Arc::new(irq),
        }
    }

    /// The line to register with KVM as an irqfd.
    pub fn irq(&self) -> &IrqTrigger {
        &self.irq
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = vm_superio::Trigger::trigger(&*self.irq) {
            crate::ratelimit::guest_warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Serves the chains the driver made available on `queue` with `serve`, which returns how many
/// bytes it wrote into the chain's buffers (and charges the bytes it moved to `budget`), until
/// none is left or `budget` is spent; then interrupts the driver if it asked to be told.
pub fn serve_queue(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &Interrupt,
    budget: &Budget,
    mut serve: impl FnMut(Chain<'_>) -> Result<u32, DeviceError>,
) -> Result<(), DeviceError> {
    let mut used_any = false;
    while let Some(chain) = chains::next_chain(queue, memory, budget)? {
        let head = chain.head();
        let written = serve(chain)?;
        queue.add_used(memory, head, written)?;
        used_any = true;
    }
    if used_any && queue.needs_notification(memory)? {
        interrupt.raise(INT_USED_RING);
    }
    Ok(())
}

/// Answers a read of `data.len()` bytes at `offset` of a device's configuration space `config`;
/// bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (e.g. 4 for entropy).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes device configuration space; devices without writable fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Told the features the driver accepted, when it sets `FEATURES_OK` (they are a subset of
    /// [`Self::features`]).
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }
    /// Serves the available buffers of queue `index`, one of `queues` (called on the event loop
    /// after a notify). Devices whose work spans queues (vsock) reach the others through
    /// `queues`; a queue the driver did not make ready yields no chains. The device takes
    /// chains through [`chains::next_chain`] (or [`serve_queue`]) with `budget`, and charges it
    /// the bytes it moves; when the budget runs out the transport calls again on the event
    /// loop's next turn. What the device pushes into its receive queue on the way (host data
    /// the guest's new buffers can now take) counts against `rx` instead (see
    /// [`Self::has_receive_direction`]).
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
        rx: &Budget,
    ) -> Result<(), DeviceError>;
    /// Whether the device delivers host data to the guest on its own (frames, socket data):
    /// then the transport's receive rate limit applies to it. Such a device charges each
    /// packet it delivers to the `rx` budget it is given (an operation, and its bytes); when
    /// `rx` is spent it stops delivering, leaves the data where it is (a host socket, the
    /// backend's queue), and calls [`Budget::leave_more`]: the transport then calls
    /// [`Self::process_host_event`] again once tokens are back.
    fn has_receive_direction(&self) -> bool {
        false
    }
    /// An fd that becomes readable when the host side has work for the device (a socket that
    /// connected or has data, a request from the VM handle); the event loop watches it and then
    /// calls [`Self::process_host_event`].
    fn host_event(&self) -> Option<RawFd> {
        None
    }
    /// Does the host-side work announced by [`Self::host_event`]. `queues` is empty while the
    /// device is not live: the device must still consume the event (or stop watching its
    /// source), so that the event loop does not spin, and keep what it owes the guest for later.
    /// What it delivers to the guest counts against `rx` ([`Self::has_receive_direction`]).
    fn process_host_event(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        let _ = (queues, memory, interrupt, rx);
        Ok(())
    }
    /// Returns to the state before the driver's first access (the transport resets the queues).
    fn reset(&mut self) {}
    /// What a copy of this device will need from the host when the VM forks (a disk's overlay
    /// size), so that children prepared ahead can have it ready.
    fn fork_needs(&self) -> persist::HostNeeds {
        persist::HostNeeds::default()
    }
    /// What a copy of this device continues from at a fork (called while the VM is paused, so it
    /// must be cheap; queue state is the transport's). The device keeps serving its own VM.
    fn freeze(&mut self) -> Result<DeviceState, DeviceError>;
}

/// A device's own state at a fork: what each child's copy of it is created from (by the VMM,
/// which gives each copy its host ends: console output, vsock sockets, balloon handle).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// virtio-rng keeps no state.
    Rng,
    /// virtio-blk: the disk frozen at the fork; each child writes to its own overlay.
    #[serde(skip)]
    Block(block::BlockState),
    /// virtio-blk as a snapshot records it (its disk saved to a file of the snapshot).
    SavedBlock(block::SavedBlock),
    /// virtio-console: host input the guest had not taken yet.
    Console(console::ConsoleState),
    /// virtio-vsock: the guest's CID (connections do not survive a fork).
    Vsock(vsock::VsockState),
    /// virtio-balloon: its target, size and held statistics buffer.
    Balloon(balloon::BalloonState),
    /// virtio-net: its MAC address (flows do not survive a fork).
    Net(net::NetState),
}
