//! The one assembly of a VM's machine, used by the builder and by every VM spawned from a
//! snapshot: its run state and event loop, the legacy port devices (UART, i8042, debug exit) and
//! the virtio devices attached to their windows, put together with a KVM VM, its RAM and vCPUs
//! made by the caller ([`crate::vstate`]). What comes out is handed to [`crate::Vm`].

use std::sync::{Arc, Mutex, Weak};

use forkvm_devices::bus::Bus;
use forkvm_devices::input::InputFeeder;
use forkvm_devices::legacy::{
    DEBUG_EXIT_PORT, DebugExit, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_LEN, SerialPort, SerialSink, SerialState,
};
use forkvm_devices::trigger::{ExitTrigger, IrqTrigger};
use forkvm_devices::virtio::balloon::BalloonHandle;
use forkvm_devices::virtio::vsock::host::VsockConnector;
use kvm_ioctls::{Kvm, VmFd};

use crate::console::{ConsoleInput, ConsoleOutput, Delivery, take_deliveries};
use crate::error::{Error, kvm_err, setup_err};
use crate::exit::GuestExit;
use crate::identity::{Identity, IdentityPage};
use crate::memory::GuestRam;
use crate::network::VmNetwork;
use crate::virtio::{AttachedDevice, VirtioPlan};
use crate::vstate::ThreadSetup;
use crate::vstate::event_loop::EventLoop;
use crate::vstate::run_state::RunState;
use crate::vstate::threads::SpareThreads;
use crate::vstate::vcpu::{IoBuses, Vcpu};

/// What a caller brings to the assembly: the KVM VM with its RAM and vCPUs in place, the host
/// ends of the legacy devices and the virtio devices to attach.
pub(crate) struct MachineSpec {
    pub kvm: Arc<Kvm>,
    pub vm_fd: VmFd,
    pub ram: GuestRam,
    pub vcpus: Vec<Vcpu>,
    /// The kick signal (its handler installed) and seccomp policy of the VM's threads.
    pub setup: ThreadSetup,
    pub legacy: LegacyConfig,
    pub virtio: VirtioPlan,
    pub vsock: Option<VsockConnector>,
    /// Whether the vsock device listens on a socket path of the host.
    pub vsock_uds: bool,
    pub balloon: Option<BalloonHandle>,
    pub network: Option<VmNetwork>,
    pub identity: Identity,
    pub identity_page: IdentityPage,
    /// Threads started ahead for the event loop and the vCPUs (none: [`crate::Vm::start`]
    /// starts them).
    pub threads: SpareThreads,
}

/// Everything a VM is made of, assembled: what [`crate::Vm`] takes over.
pub(crate) struct Machine {
    pub kvm: Arc<Kvm>,
    pub vm_fd: VmFd,
    pub ram: GuestRam,
    pub vcpus: Vec<Vcpu>,
    pub buses: Arc<IoBuses>,
    pub serial: Arc<Mutex<SerialPort>>,
    pub debug_exit: bool,
    pub devices: Vec<AttachedDevice>,
    pub event_loop: EventLoop,
    pub state: Arc<RunState>,
    pub vsock: Option<VsockConnector>,
    pub vsock_uds: bool,
    pub balloon: Option<BalloonHandle>,
    pub network: Option<VmNetwork>,
    pub identity: Identity,
    pub identity_page: IdentityPage,
    pub threads: SpareThreads,
    /// The deliveries of its consoles' callbacks, drained by [`crate::Vm::wait`].
    pub console_deliveries: Vec<Weak<Delivery>>,
}

/// Puts `spec` together: a run state and event loop, the legacy devices on the port bus, the
/// virtio devices on the MMIO bus.
pub(crate) fn assemble(spec: MachineSpec) -> Result<Machine, Error> {
    let state = Arc::new(RunState::new(spec.setup).map_err(|e| setup_err("VM run state", e))?);
    let mut event_loop = EventLoop::new(&state)?;
    let debug_exit = spec.legacy.debug_exit;
    let (pio, serial) = legacy_devices(&spec.vm_fd, &state, &mut event_loop, spec.legacy)?;
    let mut mmio = Bus::new();
    let span = crate::phases::span("assemble.virtio");
    let devices = spec
        .virtio
        .attach(&spec.vm_fd, &mut mmio, &mut event_loop, &spec.ram.memory)?;
    drop(span);
    Ok(Machine {
        kvm: spec.kvm,
        vm_fd: spec.vm_fd,
        ram: spec.ram,
        vcpus: spec.vcpus,
        buses: Arc::new(IoBuses { pio, mmio }),
        serial,
        debug_exit,
        devices,
        event_loop,
        state,
        vsock: spec.vsock,
        vsock_uds: spec.vsock_uds,
        balloon: spec.balloon,
        network: spec.network,
        identity: spec.identity,
        identity_page: spec.identity_page,
        threads: spec.threads,
        // Made in this build or fork, on this thread: the virtio consoles' before this call,
        // the serial console's in it.
        console_deliveries: take_deliveries(),
    })
}

/// What the legacy devices of a new VM start from.
pub(crate) struct LegacyConfig {
    /// Where the UART's output goes.
    pub console: ConsoleOutput,
    /// Where its input comes from.
    pub console_input: Option<ConsoleInput>,
    /// The registers of the UART it continues (a fork), or `None` for a fresh one.
    pub serial_state: Option<SerialState>,
    /// Whether the debug-exit port is there.
    pub debug_exit: bool,
}

/// Puts the legacy devices on a new port-I/O bus: the UART (irqfd on IRQ 4, input fed by the
/// event loop), the i8042 whose reset ends the VM, and the debug-exit port when asked for.
/// Returns the bus and the UART.
fn legacy_devices(
    vm: &VmFd,
    state: &Arc<RunState>,
    event_loop: &mut EventLoop,
    config: LegacyConfig,
) -> Result<(Bus, Arc<Mutex<SerialPort>>), Error> {
    let mut pio = Bus::new();
    let serial_irq = IrqTrigger::new().map_err(|e| setup_err("serial IRQ", e))?;
    vm.register_irqfd(serial_irq.eventfd(), SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial_out = config.console.into_writer()?;
    let serial = Arc::new(Mutex::new(
        SerialPort::from_state(
            &config.serial_state.unwrap_or_default(),
            serial_irq,
            serial_out,
        )
        .map_err(|e| setup_err("serial port", e))?,
    ));
    insert(&mut pio, serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    if let Some(input) = config.console_input {
        let fd = input.into_fd()?;
        let feeder = InputFeeder::new(
            SerialSink::new(serial.clone()).map_err(|e| setup_err("console input", e))?,
            fd,
        );
        event_loop.add(Arc::new(Mutex::new(feeder)));
    }
    let reset_state = state.clone();
    let reset = ExitTrigger::new(move || reset_state.finish(GuestExit::Reset));
    insert(
        &mut pio,
        Arc::new(Mutex::new(I8042::new(reset))),
        I8042_PORT_BASE,
        I8042_PORT_LEN,
    )?;
    if config.debug_exit {
        let exit_state = state.clone();
        let device = DebugExit::new(move |status| {
            exit_state.finish(GuestExit::PoweredOff {
                status: Some(status),
            })
        });
        insert(&mut pio, Arc::new(Mutex::new(device)), DEBUG_EXIT_PORT, 4)?;
    }
    Ok((pio, serial))
}

fn insert(
    bus: &mut Bus,
    device: forkvm_devices::bus::SharedDevice,
    base: u16,
    len: u16,
) -> Result<(), Error> {
    bus.insert(device, u64::from(base), u64::from(len))
        .map_err(|e| setup_err("port I/O bus", e))
}
