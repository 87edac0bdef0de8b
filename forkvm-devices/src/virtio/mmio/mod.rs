//! The virtio-mmio transport, version 2: the register window through which a driver discovers
//! a device, negotiates features, programs its queues and drives its status.
//!
//! Every register write is checked against the status state machine of the virtio 1.x spec
//! (§2.1, §3.1, §4.2.2). The rules, and what breaking each one does:
//!
//! - Status: bits are only added (0 resets); `DRIVER` needs `ACKNOWLEDGE`, `FEATURES_OK` needs
//!   both, and `DRIVER_OK` needs `FEATURES_OK` already accepted (the driver must read it back,
//!   §3.1.1: `0x0f` written from reset is refused). A write that breaks the order is ignored;
//!   bits the spec does not define for the driver (and `DEVICE_NEEDS_RESET`) are dropped.
//! - Features only between `DRIVER` and `FEATURES_OK`; `FEATURES_OK` stays clear for features
//!   not offered or without `VERSION_1`. Late writes are ignored.
//! - Queue registers only between `FEATURES_OK` and `DRIVER_OK`, on a queue not ready. The
//!   values are checked when the driver sets `QueueReady`: a size that is 0, above
//!   `QueueNumMax` or not a power of two, or a descriptor table, available or used ring not
//!   aligned to 16, 2 and 4 bytes (§2.7), or an available ring at guest address 0 (which
//!   virtio-queue takes for a queue never set up), leaves the queue not ready and the device in
//!   `DEVICE_NEEDS_RESET`.
//! - At `DRIVER_OK`, a ready queue outside guest memory: `DEVICE_NEEDS_RESET`.
//! - Once live, what the driver puts in its queues is read through
//!   [`chains`](super::chains) (virtio-blk: its own reader, same rules). An available index
//!   more than a queue ahead, a chain that loops, leaves the table or guest memory, or uses a
//!   feature not negotiated (indirect descriptors: no device offers them) is an error of the
//!   driver: `DEVICE_NEEDS_RESET`, with a configuration interrupt, and no queue is served again
//!   until the driver resets the device. A well-formed request a device does not support
//!   (virtio-blk discard or write-zeroes not negotiated, an unknown type) completes with the
//!   device's own status for it (`VIRTIO_BLK_S_UNSUPP`).
//! - Work is bounded: one notification serves a queue within a [`Budget`] (descriptors walked,
//!   bytes moved); what is left is served on the event loop's next turn (the transport signals
//!   the queue's eventfd again), so a flood of chains never holds the loop, nor `Vm::pause`.
//! - A device may be rate-limited ([`MmioTransport::set_rate_limit`]): each turn is also capped
//!   by its token buckets, and a queue left without tokens is served again when the
//!   transport's timer says they are back ([`rate_limit`](super::rate_limit)). A device that
//!   pushes host data to the guest (net, vsock) has a second, independent limit on that
//!   direction ([`MmioTransport::set_rx_rate_limit`], `limits.rs`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::rate_limit::RateLimit;
use super::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, INT_CONFIG, Interrupt, VIRTIO_F_VERSION_1,
    VirtioDevice,
};
use crate::bus::BusDevice;
use crate::chain::ErrorChain;
use crate::sync::lock;
use setup::{QueueSetup, set_high, set_low};
use throttle::Throttle;

mod limits;
mod setup;
mod throttle;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue-notify register, where KVM ioeventfds are attached.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x6d76_6b66; // "fkvm"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets in the window (virtio 1.1 §4.2.2).
pub mod reg {
    /// Magic value, "virt".
    pub const MAGIC: u64 = 0x000;
    /// Device version (2: virtio 1.x).
    pub const VERSION: u64 = 0x004;
    /// Virtio device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// The 32 feature bits the device offers, at `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 device feature bits `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// The 32 feature bits the driver accepts, at `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 driver feature bits `DRIVER_FEATURES` sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// The queue the queue registers address.
    pub const QUEUE_SEL: u64 = 0x030;
    /// The selected queue's largest size.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// The selected queue's size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is live.
    pub const QUEUE_READY: u64 = 0x044;
    /// The driver notifies a queue (written with its index).
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    /// Why the device interrupted (bit 0 used buffers, bit 1 configuration).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// The driver acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (the virtio status bits).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Changes whenever the configuration space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio 1.1 §2.1).
pub const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
/// The driver knows how to drive the device.
pub const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
/// Feature negotiation is complete.
pub const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
/// The driver is ready; the device is live.
pub const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
/// The device hit an error it cannot recover from without a reset.
pub const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
/// The driver gave up on the device.
pub const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
/// The status bits a driver may write (`DEVICE_NEEDS_RESET` is the device's).
const DRIVER_STATUS_BITS: u32 = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED;

/// A virtio device with its virtio-mmio register state and queues.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    /// What the driver wrote into each queue's registers, checked at `QueueReady`.
    setups: Vec<QueueSetup>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    throttle: Throttle,
    /// The receive direction's limit, for a device that has one.
    rx_throttle: Option<Throttle>,
}

/// The registers a driver programmed and the position of every queue: with a device's
/// [`DeviceState`], what a forked copy of a virtio device continues from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<SavedQueue>,
    interrupt_status: u32,
    /// The device's rate limit (its buckets start full in a copy).
    #[serde(default)]
    rate_limit: RateLimit,
    /// The limit on what it pushes to the guest (a snapshot from before it: none).
    #[serde(default)]
    rx_rate_limit: RateLimit,
}

/// One queue's [`QueueState`], serializable.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct SavedQueue(#[serde(with = "QueueStateDef")] QueueState);

/// `QueueState` for serde (virtio-queue offers none), field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// A virtio device frozen at a fork: transport registers, queues and the device's own state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioState {
    /// Registers and queues.
    pub transport: TransportState,
    /// The device behind them.
    pub device: DeviceState,
}

impl MmioTransport {
    /// Wraps `device`, whose queues live in `memory` and whose interrupt is `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<Self, std::io::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| {
                Queue::new(*max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        let throttle = Throttle::new(queues.len())?;
        let rx_throttle = if device.has_receive_direction() {
            Some(Throttle::new(1)?)
        } else {
            None
        };
        Ok(Self {
            device,
            memory,
            interrupt,
            setups: queues.iter().map(QueueSetup::of).collect(),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            throttle,
            rx_throttle,
        })
    }

    /// Freezes the transport and its device (the VM must be paused): what a copy continues from.
    pub fn freeze(&mut self) -> Result<VirtioState, DeviceError> {
        Ok(VirtioState {
            transport: TransportState {
                status: self.status,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                driver_features: self.driver_features,
                queue_sel: self.queue_sel,
                queues: self.queues.iter().map(|q| SavedQueue(q.state())).collect(),
                interrupt_status: self.interrupt.status(),
                rate_limit: self.throttle.limit(),
                rx_rate_limit: self.rx_rate_limit().unwrap_or_default(),
            },
            device: self.device.freeze()?,
        })
    }

    /// A transport that continues from `state` with `device` (created from the frozen device
    /// state): the driver finds its registers and queues as it left them. The device is told the
    /// features the driver accepted, a pending interrupt is raised again, and every queue is
    /// marked notified so that requests the driver made just before the fork are served.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Interrupt,
        state: &TransportState,
    ) -> Result<Self, std::io::Error> {
        let mut transport = Self::new(device, memory, interrupt)?;
        if state.queues.len() != transport.queues.len() {
            return Err(std::io::Error::other(format!(
                "{} queues saved for a device with {}",
                state.queues.len(),
                transport.queues.len()
            )));
        }
        transport.queues = state
            .queues
            .iter()
            .zip(&transport.queues)
            .map(|(q, fresh)| {
                // A saved queue keeps its device's size limit (the state may come from a file).
                if q.0.max_size != fresh.max_size() {
                    return Err(std::io::Error::other(format!(
                        "queue state of {} entries at most for a queue of {}",
                        q.0.max_size,
                        fresh.max_size()
                    )));
                }
                Queue::try_from(q.0).map_err(|e| std::io::Error::other(format!("queue state: {e}")))
            })
            .collect::<Result<_, _>>()?;
        transport.setups = transport.queues.iter().map(QueueSetup::of).collect();
        transport.status = state.status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport
            .throttle
            .set(state.rate_limit)
            .map_err(std::io::Error::other)?;
        if !state.rx_rate_limit.is_unlimited() {
            transport
                .set_rx_rate_limit(state.rx_rate_limit)
                .map_err(std::io::Error::other)?;
        }
        if state.status & S_FEATURES_OK != 0 {
            transport.device.ack_features(state.driver_features);
        }
        if state.interrupt_status != 0 {
            transport.interrupt.raise(state.interrupt_status);
        }
        for event in &transport.queue_events {
            event.write(1)?;
        }
        Ok(transport)
    }

    /// One eventfd per queue, signalled when the driver notifies that queue; register each as a
    /// KVM ioeventfd on [`QUEUE_NOTIFY_OFFSET`] with the queue index as data.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// What a copy of the device will need from the host at a fork.
    pub fn fork_needs(&self) -> crate::virtio::persist::HostNeeds {
        self.device.fork_needs()
    }

    /// Reads the device's configuration space from `offset`, as the driver would.
    pub fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    fn is_active(&self) -> bool {
        self.status & (S_DRIVER_OK | S_NEEDS_RESET | S_FAILED) == S_DRIVER_OK
    }

    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        crate::ratelimit::guest_warn!(
            "virtio device type {}: {why}; needs reset",
            self.device.device_type()
        );
        if self.status & S_NEEDS_RESET == 0 {
            self.status |= S_NEEDS_RESET;
            self.interrupt.raise(INT_CONFIG);
        }
    }

    /// Serves queue `index` after a notification: the device processes what the driver made
    /// available, within one turn's [`Budget`]; if it left work, the queue's eventfd is
    /// signalled again so that the event loop comes back to it after its other events. A device
    /// error moves the device into `DEVICE_NEEDS_RESET`.
    pub fn process_queue(&mut self, index: usize) {
        if !self.is_active() {
            return;
        }
        if !self.queues.get(index).is_some_and(Queue::ready) {
            return;
        }
        let allowance = match self.throttle.allowance(index) {
            Ok(allowance) => allowance,
            Err(retry) => {
                if retry {
                    self.signal(index);
                }
                return;
            }
        };
        let budget = Budget::within(allowance);
        let rx = self.rx_budget();
        let result = self.device.process_queue(
            index,
            &mut self.queues,
            &self.memory,
            &self.interrupt,
            &budget,
            &rx,
        );
        self.after_rx(&rx);
        let again = self.throttle.after_turn(index, &budget);
        match result {
            Err(e) => self.needs_reset(&format_args!("queue {index}: {}", ErrorChain(&e))),
            Ok(()) if again => self.signal(index),
            Ok(()) => {}
        }
    }

    /// Signals queue `index`'s eventfd: the event loop serves it on its next turn.
    fn signal(&self, index: usize) {
        if let Some(event) = self.queue_events.get(index) {
            // An eventfd write fails only when its counter would overflow: then it is
            // signalled anyway.
            let _ = event.write(1);
        }
    }

    /// The device's host-side event fd, if it has one (see [`VirtioDevice::host_event`]).
    pub fn host_event(&self) -> Option<RawFd> {
        self.device.host_event()
    }

    /// Lets the device do host-side work. It gets its queues only while it is live (an empty
    /// slice otherwise), so it always drains its host events but touches guest memory only when
    /// the driver allows. A device error moves it into `DEVICE_NEEDS_RESET`.
    pub fn process_host_event(&mut self) {
        let rx = self.rx_budget();
        let queues: &mut [Queue] = if self.is_active() {
            &mut self.queues
        } else {
            &mut []
        };
        let result = self
            .device
            .process_host_event(queues, &self.memory, &self.interrupt, &rx);
        self.after_rx(&rx);
        if let Err(e) = result {
            self.needs_reset(&format_args!("host event: {}", ErrorChain(&e)));
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only after feature negotiation, before `DRIVER_OK`, and only
    /// while the selected queue is not ready.
    fn queue_config_writable(&mut self) -> Option<&mut Queue> {
        let in_setup = self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) == S_FEATURES_OK;
        self.selected_queue().filter(|q| in_setup && !q.ready())
    }

    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.setups = self.queues.iter().map(QueueSetup::of).collect();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        // Bits the driver may not set are dropped (NEEDS_RESET is kept as the device has it).
        let new = new & DRIVER_STATUS_BITS;
        let current = self.status & DRIVER_STATUS_BITS;
        // The driver only adds bits; dropping one (other than by a reset) is ignored.
        if new & current != current {
            return;
        }
        let added = new & !current;
        let ordered = |bit: u32, needs: u32| added & bit == 0 || new & needs == needs;
        // DRIVER_OK only once FEATURES_OK was accepted and could be read back (§3.1.1).
        let driver_ok_ordered = added & S_DRIVER_OK == 0 || current & S_FEATURES_OK != 0;
        if !ordered(S_DRIVER, S_ACKNOWLEDGE)
            || !ordered(S_FEATURES_OK, S_ACKNOWLEDGE | S_DRIVER)
            || !ordered(S_DRIVER_OK, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
            || !driver_ok_ordered
        {
            return;
        }
        let mut new = new | (self.status & S_NEEDS_RESET);
        if added & S_FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.ack_features(self.driver_features);
            } else {
                // Left clear: the driver reads it back and gives up on the device (§3.1.1).
                new &= !S_FEATURES_OK;
            }
        }
        self.status = new;
        if added & S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let bad = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.memory));
        if let Some(index) = bad {
            self.needs_reset(&format_args!(
                "queue {index} lies outside guest memory or is malformed"
            ));
            return;
        }
        // Served on the event loop, as a notification is: never on the vCPU thread that wrote
        // the status, whose seccomp filter allows no device I/O (`forkvm::seccomp`).
        for event in &self.queue_events {
            // An eventfd's counter does not overflow from one write per activation.
            let _ = event.write(1);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let driver_may_negotiate = self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) == S_DRIVER;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if driver_may_negotiate => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            // Kept as written; checked when the driver sets QueueReady.
            reg::QUEUE_NUM => self.queue_setup(|s| s.size = value),
            reg::QUEUE_READY => self.set_queue_ready(value),
            reg::QUEUE_DESC_LOW => self.queue_setup(|s| set_low(&mut s.desc, value)),
            reg::QUEUE_DESC_HIGH => self.queue_setup(|s| set_high(&mut s.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.queue_setup(|s| set_low(&mut s.avail, value)),
            reg::QUEUE_DRIVER_HIGH => self.queue_setup(|s| set_high(&mut s.avail, value)),
            reg::QUEUE_DEVICE_LOW => self.queue_setup(|s| set_low(&mut s.used, value)),
            reg::QUEUE_DEVICE_HIGH => self.queue_setup(|s| set_high(&mut s.used, value)),
            reg::QUEUE_NOTIFY => {
                // Reached only without a KVM ioeventfd (tests, or a host without the capability).
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }

    /// Records a queue register the driver wrote, if it may write it now.
    fn queue_setup(&mut self, set: impl FnOnce(&mut QueueSetup)) {
        let index = self.queue_sel as usize;
        if self.queue_config_writable().is_some()
            && let Some(setup) = self.setups.get_mut(index)
        {
            set(setup);
        }
    }

    /// `QueueReady`: 1 checks what the driver wrote and makes the queue live, anything else
    /// takes it down. A queue set up against the rules stays down and the device needs a reset.
    fn set_queue_ready(&mut self, value: u32) {
        let in_setup = self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) == S_FEATURES_OK;
        let index = self.queue_sel as usize;
        let (Some(queue), Some(setup)) = (self.queues.get_mut(index), self.setups.get(index))
        else {
            return;
        };
        if !in_setup {
            return;
        }
        if value != 1 {
            queue.set_ready(false);
            return;
        }
        match setup.apply(queue) {
            Ok(()) => queue.set_ready(true),
            Err(why) => {
                queue.set_ready(false);
                self.needs_reset(&format_args!("queue {index} set up with {why}"));
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) {
            *bytes = if offset.is_multiple_of(4) {
                self.read_register(offset)
            } else {
                u32::MAX
            }
            .to_le_bytes();
        } else {
            // Registers are 32 bits wide and aligned (§4.2.2.2); anything else reads as ones.
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & S_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

/// Event-loop subscriber that serves a transport's queues when their eventfds fire, and its
/// device's host-side work when the device's [`VirtioDevice::host_event`] fd is readable.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    events: Vec<EventFd>,
    host_event: Option<RawFd>,
    timer: RawFd,
    rx_timer: Option<RawFd>,
}

/// Event data that marks the device's host-side event fd (queue events carry their index).
const HOST_EVENT_DATA: u32 = u32::MAX;
/// Event data that marks the transport's rate-limit timer.
const TIMER_DATA: u32 = u32::MAX - 1;
/// Event data that marks the receive direction's rate-limit timer.
const RX_TIMER_DATA: u32 = u32::MAX - 2;

impl QueueEvents {
    /// Watches the queue eventfds of `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<Self> {
        let events = lock(&transport)
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()?;
        let host_event = lock(&transport).host_event();
        let timer = lock(&transport).rate_limit_timer();
        let rx_timer = lock(&transport).rx_rate_limit_timer();
        Ok(Self {
            transport,
            events,
            host_event,
            timer,
            rx_timer,
        })
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                crate::ratelimit::guest_warn!("virtio: cannot watch queue {index}: {e:?}");
            }
        }
        if let Some(fd) = self.host_event {
            // The fd belongs to the device inside `transport`, which this subscriber keeps alive.
            let events = Events::with_data_raw(fd, HOST_EVENT_DATA, EventSet::IN);
            if let Err(e) = ops.add(events) {
                crate::ratelimit::guest_warn!(
                    "virtio: cannot watch the device's host events: {e:?}"
                );
            }
        }
        // The timer belongs to `transport` too.
        let timer = Events::with_data_raw(self.timer, TIMER_DATA, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            crate::ratelimit::guest_warn!("virtio: cannot watch the rate-limit timer: {e:?}");
        }
        if let Some(fd) = self.rx_timer
            && let Err(e) = ops.add(Events::with_data_raw(fd, RX_TIMER_DATA, EventSet::IN))
        {
            crate::ratelimit::guest_warn!("virtio: cannot watch the receive limit's timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == HOST_EVENT_DATA && Some(events.fd()) == self.host_event {
            lock(&self.transport).process_host_event();
            return;
        }
        if events.data() == TIMER_DATA && events.fd() == self.timer {
            lock(&self.transport).rate_limit_timer_fired();
            return;
        }
        if events.data() == RX_TIMER_DATA && Some(events.fd()) == self.rx_timer {
            lock(&self.transport).rx_rate_limit_timer_fired();
            return;
        }
        let index = events.data() as usize;
        if let Some(event) = self
            .events
            .get(index)
            .filter(|e| e.as_raw_fd() == events.fd())
        {
            let _ = event.read();
            lock(&self.transport).process_queue(index);
        }
    }
}

mod check;
#[cfg(test)]
mod tests;
