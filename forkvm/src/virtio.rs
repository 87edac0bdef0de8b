//! Places virtio devices in a VM: one MMIO window and one IRQ each (from `vm-allocator`), the
//! KVM ioeventfds and irqfd that connect them, the event-loop subscriber that serves their
//! queues, and the `virtio_mmio.device=` entries that tell the guest kernel where they are.
//! A forked child's devices are placed where its parent's were and continue from their frozen
//! state ([`FrozenDevice`]).

use std::sync::{Arc, Mutex, MutexGuard};

use forkvm_devices::bus::Bus;
use forkvm_devices::trigger::IrqTrigger;
use forkvm_devices::virtio::mmio::{
    MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, QueueEvents, TransportState, VirtioState,
};
use forkvm_devices::virtio::rate_limit::RateLimit;
use forkvm_devices::virtio::{Interrupt, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::error::{Error, kvm_err};
use crate::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestMemoryMmap;
use crate::vstate::event_loop::EventLoop;
use forkvm_devices::sync::lock;

/// First IRQ given to virtio devices (0–4 are the PIT, keyboard, cascade and serial ports).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last IRQ: the in-kernel IOAPIC has 24 pins.
pub const LAST_VIRTIO_IRQ: u32 = 23;

/// Whether a device may sit at window `base` with `irq`: one of the virtio area's windows, and
/// one of the virtio IRQs.
pub(crate) fn is_virtio_slot(base: u64, irq: u32) -> bool {
    let window_ok = (VIRTIO_MMIO_START..VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE).contains(&base)
        && base.is_multiple_of(MMIO_WINDOW_SIZE);
    window_ok && (FIRST_VIRTIO_IRQ..=LAST_VIRTIO_IRQ).contains(&irq)
}

/// A virtio device to attach. Whatever host-side work it has (console input, vsock sockets,
/// balloon requests) reaches it through its [`VirtioDevice::host_event`].
pub struct VirtioDeviceSpec {
    /// The device.
    pub device: Box<dyn VirtioDevice>,
    /// Its rate limit (a continued device keeps the one it was frozen with instead).
    pub rate_limit: RateLimit,
    /// Its limit on what it pushes to the guest (net and vsock only; likewise kept by a
    /// continued device).
    pub rx_rate_limit: RateLimit,
}

impl VirtioDeviceSpec {
    /// `device`, to attach, without a rate limit.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self {
            device,
            rate_limit: RateLimit::unlimited(),
            rx_rate_limit: RateLimit::unlimited(),
        }
    }

    /// The same device, limited by `limit`.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// The same device, its receive direction limited by `limit` (attaching a device without
    /// one fails unless `limit` is unlimited).
    pub fn with_rx_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rx_rate_limit = limit;
        self
    }
}

/// A virtio device and where it will appear in the guest.
struct Placed {
    spec: VirtioDeviceSpec,
    base: u64,
    irq: u32,
    /// For a forked child's device: the registers and queues it continues from.
    transport: Option<TransportState>,
}

/// A virtio device frozen at a fork, and where it sits in the guest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct FrozenDevice {
    /// Guest-physical base of its window.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// Transport and device state.
    pub state: VirtioState,
}

impl FrozenDevice {
    /// The size in bytes of a block device's disk (`None` for other devices): what a prepared
    /// child's overlay file is made for.
    pub(crate) fn disk_size(&self) -> Option<u64> {
        self.state.device.needs().overlay_bytes
    }
}

/// What kind of virtio device a VM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceKind {
    /// virtio-net.
    Net,
    /// virtio-blk.
    Block,
    /// virtio-console.
    Console,
    /// virtio-rng.
    Entropy,
    /// virtio-balloon.
    Balloon,
    /// virtio-vsock.
    Vsock,
    /// Another virtio device type.
    Other(u32),
}

impl DeviceKind {
    /// The kind of virtio device type `id`.
    pub fn from_virtio_id(id: u32) -> Self {
        match id {
            1 => Self::Net,
            2 => Self::Block,
            3 => Self::Console,
            4 => Self::Entropy,
            5 => Self::Balloon,
            19 => Self::Vsock,
            other => Self::Other(other),
        }
    }

    /// The virtio device type number (1 net, 2 block, 3 console, 4 entropy, 5 balloon, 19 vsock).
    pub fn virtio_id(self) -> u32 {
        match self {
            Self::Net => 1,
            Self::Block => 2,
            Self::Console => 3,
            Self::Entropy => 4,
            Self::Balloon => 5,
            Self::Vsock => 19,
            Self::Other(id) => id,
        }
    }
}

/// What the VM handle reports about one of its virtio devices.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// What the device is.
    pub kind: DeviceKind,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The driver's status register (0 until a driver touches it; bit 0x40 = needs reset).
    pub status: u32,
    /// Its rate limit (see [`crate::Vm::set_rate_limit`]).
    pub rate_limit: RateLimit,
    /// Its limit on what it pushes to the guest (see [`crate::Vm::set_rx_rate_limit`]); `None`
    /// for a device without a receive direction (only net and vsock have one).
    pub rx_rate_limit: Option<RateLimit>,
}

/// Virtio devices with their windows and IRQs chosen, not yet attached to a VM.
pub struct VirtioPlan {
    placed: Vec<Placed>,
}

impl VirtioPlan {
    /// Gives each device a window and an IRQ.
    pub fn new(devices: Vec<VirtioDeviceSpec>) -> Result<Self, Error> {
        let place_err = |e: vm_allocator::Error| Error::Setup {
            what: "virtio device placement",
            reason: e.to_string(),
        };
        let mut windows =
            AddressAllocator::new(VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE).map_err(place_err)?;
        let mut irqs = IdAllocator::new(FIRST_VIRTIO_IRQ, LAST_VIRTIO_IRQ).map_err(place_err)?;
        let placed = devices
            .into_iter()
            .map(|spec| {
                let window = windows.allocate(
                    MMIO_WINDOW_SIZE,
                    MMIO_WINDOW_SIZE,
                    AllocPolicy::FirstMatch,
                )?;
                Ok(Placed {
                    spec,
                    base: window.start(),
                    irq: irqs.allocate_id()?,
                    transport: None,
                })
            })
            .collect::<Result<Vec<_>, vm_allocator::Error>>()
            .map_err(place_err)?;
        Ok(Self { placed })
    }

    /// Devices that continue `frozen` ones (each paired with the device created from its
    /// state), at the same windows and IRQs: the devices of a forked child or a restored
    /// snapshot. Windows and IRQs read back from a snapshot are checked: each window must be one
    /// of the virtio area's, each IRQ one of the virtio IRQs, and none used twice.
    pub(crate) fn continued(
        devices: Vec<(VirtioDeviceSpec, &FrozenDevice)>,
    ) -> Result<Self, Error> {
        let mut seen = std::collections::HashSet::new();
        let placed = devices
            .into_iter()
            .map(|(spec, frozen)| {
                let (base, irq) = (frozen.base, frozen.irq);
                if !is_virtio_slot(base, irq) || !seen.insert(base) || !seen.insert(u64::from(irq))
                {
                    return Err(Error::Setup {
                        what: "virtio device placement",
                        reason: format!(
                            "window {base:#x} with IRQ {irq} is not a free virtio slot"
                        ),
                    });
                }
                Ok(Placed {
                    spec,
                    base,
                    irq,
                    transport: Some(frozen.state.transport.clone()),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { placed })
    }

    /// The kernel command-line entries announcing the devices.
    pub fn cmdline(&self) -> String {
        self.placed
            .iter()
            .map(|p| {
                format!(
                    "virtio_mmio.device={}K@{:#x}:{}",
                    MMIO_WINDOW_SIZE >> 10,
                    p.base,
                    p.irq
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Connects every device to the VM: MMIO window on `mmio`, irqfd, one ioeventfd per queue,
    /// queue service and host-side work on `event_loop`.
    pub fn attach(
        self,
        vm: &VmFd,
        mmio: &mut Bus,
        event_loop: &mut EventLoop,
        memory: &GuestMemoryMmap,
    ) -> Result<Vec<AttachedDevice>, Error> {
        self.placed
            .into_iter()
            .map(|placed| placed.attach(vm, mmio, event_loop, memory))
            .collect()
    }
}

impl Placed {
    fn attach(
        self,
        vm: &VmFd,
        mmio: &mut Bus,
        event_loop: &mut EventLoop,
        memory: &GuestMemoryMmap,
    ) -> Result<AttachedDevice, Error> {
        let Placed {
            spec:
                VirtioDeviceSpec {
                    device,
                    rate_limit,
                    rx_rate_limit,
                },
            base,
            irq,
            transport,
        } = self;
        let setup_err = |e: std::io::Error| Error::Setup {
            what: "virtio device",
            reason: e.to_string(),
        };
        let line = IrqTrigger::new().map_err(setup_err)?;
        vm.register_irqfd(line.eventfd(), irq)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let interrupt = Interrupt::new(line);
        let transport = match transport {
            Some(state) => MmioTransport::restore(device, memory.clone(), interrupt, &state),
            None => MmioTransport::new(device, memory.clone(), interrupt).and_then(|mut t| {
                t.set_rate_limit(rate_limit)
                    .map_err(std::io::Error::other)?;
                if !rx_rate_limit.is_unlimited() {
                    t.set_rx_rate_limit(rx_rate_limit)
                        .map_err(std::io::Error::other)?;
                }
                Ok(t)
            }),
        }
        .map_err(setup_err)?;
        for (index, event) in transport.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm.register_ioevent(event, &notify, index as u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|e| Error::Setup {
                what: "MMIO bus",
                reason: e.to_string(),
            })?;
        event_loop.add(Arc::new(Mutex::new(
            QueueEvents::new(transport.clone()).map_err(setup_err)?,
        )));
        Ok(AttachedDevice {
            transport,
            base,
            irq,
        })
    }
}

/// A virtio device attached to a running VM.
pub struct AttachedDevice {
    transport: Arc<Mutex<MmioTransport>>,
    base: u64,
    irq: u32,
}

impl AttachedDevice {
    /// Where the device is and what state its driver left it in.
    pub fn info(&self) -> DeviceInfo {
        let transport = self.lock();
        DeviceInfo {
            kind: DeviceKind::from_virtio_id(transport.device_type()),
            mmio_base: self.base,
            irq: self.irq,
            status: transport.status(),
            rate_limit: transport.rate_limit(),
            rx_rate_limit: transport.rx_rate_limit(),
        }
    }

    /// Replaces the device's rate limit (its buckets start full).
    pub(crate) fn set_rate_limit(&self, limit: RateLimit) -> Result<(), Error> {
        self.lock()
            .set_rate_limit(limit)
            .map_err(Error::InvalidRateLimit)
    }

    /// Replaces the limit on what the device pushes to the guest (its buckets start full).
    pub(crate) fn set_rx_rate_limit(&self, limit: RateLimit) -> Result<(), Error> {
        self.lock()
            .set_rx_rate_limit(limit)
            .map_err(Error::InvalidRateLimit)
    }

    /// The size in bytes of a block device's disk (`None` for other devices): what a fork
    /// child's overlay file is made for, as the device says.
    pub(crate) fn disk_size(&self) -> Option<u64> {
        self.lock().fork_needs().overlay_bytes
    }

    /// Freezes the device (the VM must be paused): what a forked child's copy continues from.
    pub(crate) fn freeze(&self) -> Result<FrozenDevice, Error> {
        let mut transport = self.lock();
        let state = transport.freeze().map_err(|source| Error::DeviceFreeze {
            device_type: transport.device_type(),
            source,
        })?;
        Ok(FrozenDevice {
            base: self.base,
            irq: self.irq,
            state,
        })
    }

    fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        lock(&self.transport)
    }
}

#[cfg(test)]
mod tests {
    use forkvm_devices::virtio::rng::Rng;

    use super::*;

    fn rngs(n: usize) -> Vec<VirtioDeviceSpec> {
        (0..n)
            .map(|_| VirtioDeviceSpec::new(Box::new(Rng::new())))
            .collect()
    }

    #[test]
    fn each_device_gets_its_own_window_irq_and_command_line_entry() {
        let plan = VirtioPlan::new(rngs(2)).unwrap();
        assert_eq!(
            plan.cmdline(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(VirtioPlan::new(Vec::new()).unwrap().cmdline(), "");
    }

    #[test]
    fn more_devices_than_irqs_is_an_error() {
        let pins = (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as usize;
        assert!(VirtioPlan::new(rngs(pins)).is_ok());
        let err = VirtioPlan::new(rngs(pins + 1)).err().expect("out of IRQs");
        assert!(err.to_string().contains("virtio device placement"), "{err}");
    }
}
