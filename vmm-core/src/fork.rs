//! [`Vm::fork`]: copies of a running VM that continue from the same instant.
//!
//! The VM is paused; its vCPUs', interrupt controllers', PIT's, clock's and UART's state is read;
//! its RAM is frozen into an image (see [`crate::memory::freeze`]: no guest memory is copied for a
//! VM that was never frozen before); then each child is a new KVM VM over a private mapping of
//! that image, with the state written into fresh vCPUs. The parent resumes (unless it was paused)
//! and runs on over the same image.
//!
//! Creating a child's KVM VM (memory slots, interrupt controllers, PIT) and vCPUs is the part
//! of a fork that grows with memory size on some hosts (KVM allocates per-page slot metadata up
//! front). [`Vm::prepare_forks`] does it ahead of time: a prepared child is a KVM VM with its
//! slots over placeholder RAM, into which the frozen image is mapped in place at fork time.
//!
//! Not yet carried over: virtio devices (a VM that has any is refused), and the notice to the
//! guest that it was forked.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use forkvm_devices::bus::Bus;
use forkvm_devices::legacy::SerialState;

use crate::arch::probe::host_caps;
use crate::arch::state::{VcpuState, VmState};
use crate::builder::{LegacyConfig, create_vcpus, create_vm, legacy_devices, setup_err};
use crate::console::ConsoleOutput;
use crate::error::Error;
use crate::event_loop::EventLoop;
use crate::memory::GuestRam;
use crate::memory::freeze::FrozenRam;
use crate::run_state::RunState;
use crate::vcpu::{IoBuses, Vcpu};
use crate::vm::{Vm, VmParts};
use forkvm_devices::sync::lock;
use kvm_ioctls::{Kvm, VmFd};

/// A child VM created ahead of a fork: memory slots over placeholder RAM, interrupt
/// controllers, PIT, and vCPUs with their CPUID.
pub(crate) struct Shell {
    // Declared before `ram`, so the VM (and its memory slots) is destroyed before the mapping.
    vm_fd: VmFd,
    vcpus: Vec<Vcpu>,
    ram: GuestRam,
}

impl Shell {
    /// A shell for a VM of `memory_size` bytes and `vcpus` vCPUs.
    pub(crate) fn new(kvm: &Kvm, memory_size: u64, vcpus: u8) -> Result<Self, Error> {
        let ram = GuestRam::placeholder(memory_size)?;
        let vm_fd = create_vm(kvm, &ram)?;
        let vcpus = create_vcpus(kvm, &vm_fd, &host_caps(kvm)?, vcpus, |_, _| Ok(()))?;
        Ok(Self { vm_fd, vcpus, ram })
    }
}

/// What every child of one fork (or a restored snapshot) starts from.
pub(crate) struct ForkPoint {
    /// The frozen RAM.
    pub image: Arc<FrozenRam>,
    /// Each vCPU's state.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// The UART's registers and pending input.
    pub serial: SerialState,
    /// Whether the VM has the debug-exit port.
    pub debug_exit: bool,
}

impl Vm {
    /// Splits this running (or paused) VM into `consoles.len()` new running VMs that continue
    /// from this instant, each writing its serial console to its entry of `consoles`. Each child
    /// has its own vCPU threads, devices and memory: a write by the parent or any child is never
    /// seen by another, and pages nobody writes stay shared. The parent continues (or stays
    /// paused if it was). VMs with virtio devices cannot be forked yet.
    pub fn fork(&self, consoles: Vec<ConsoleOutput>) -> Result<Vec<Vm>, Error> {
        let point = self.capture()?;
        consoles
            .into_iter()
            .map(|console| {
                let shell = lock(&self.shells).pop();
                start_from(self.kvm.clone(), &point, console, shell)
            })
            .collect()
    }

    /// Creates `n` more children ahead of time (KVM VMs with memory slots, interrupt
    /// controllers, PIT and vCPUs), so that the next forks only map memory and load state. Call
    /// it while the VM runs, e.g. right after starting it; [`Vm::prepared_forks`] tells how many
    /// are ready.
    pub fn prepare_forks(&self, n: usize) -> Result<(), Error> {
        let size = self.memory_size();
        // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as the VM was built with.
        let vcpus = self.vcpus.len() as u8;
        for _ in 0..n {
            let shell = Shell::new(&self.kvm, size, vcpus)?;
            lock(&self.shells).push(shell);
        }
        Ok(())
    }

    /// How many children [`Vm::prepare_forks`] has ready.
    pub fn prepared_forks(&self) -> usize {
        lock(&self.shells).len()
    }

    /// Reads the state and freezes the memory of this running (or paused) VM, pausing it only
    /// meanwhile: what a fork or a snapshot continues from.
    pub(crate) fn capture(&self) -> Result<ForkPoint, Error> {
        let was_paused = self.is_paused();
        let paused_at = Instant::now();
        self.pause()?;
        let point = self.fork_point();
        if !was_paused {
            // Nothing captured depends on the VM staying paused: the image never changes.
            let _ = self.resume();
        }
        *lock(&self.last_pause) = Some(paused_at.elapsed());
        point
    }

    /// Reads the paused VM's state and freezes its memory.
    fn fork_point(&self) -> Result<ForkPoint, Error> {
        if !self.devices.is_empty() {
            return Err(Error::ForkUnsupported {
                what: "VMs with virtio devices",
            });
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| VcpuState::capture(&self.kvm, &lock(vcpu).fd))
            .collect::<Result<_, _>>()?;
        let vm = VmState::capture(&self.vm_fd)?;
        let serial = lock(&self.serial).state();
        let image = {
            let mut ram = self.lock_ram();
            match ram.frozen() {
                // Paused and unwritten since the last fork: the image is still the RAM.
                Some(image) if self.image_current.load(Ordering::SeqCst) => image.clone(),
                _ => ram.freeze()?,
            }
        };
        self.image_current.store(true, Ordering::SeqCst);
        Ok(ForkPoint {
            image,
            vcpus,
            vm,
            serial,
            debug_exit: self.debug_exit,
        })
    }
}

/// A new VM, started, that continues from `point` with its serial console on `console`, built
/// in `shell` if one is given.
pub(crate) fn start_from(
    kvm: Arc<Kvm>,
    point: &ForkPoint,
    console: ConsoleOutput,
    shell: Option<Shell>,
) -> Result<Vm, Error> {
    // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as the parent was built with.
    let count = point.vcpus.len() as u8;
    let shell = match shell {
        Some(shell) => shell,
        None => Shell::new(&kvm, point.image.size(), count)?,
    };
    let Shell {
        vm_fd,
        vcpus,
        mut ram,
    } = shell;
    ram.adopt(&point.image)?;
    point.vm.restore(&vm_fd)?;
    for (vcpu, state) in vcpus.iter().zip(&point.vcpus) {
        state.restore(&vcpu.fd)?;
    }
    let state = Arc::new(RunState::new().map_err(|e| setup_err("VM run state", e))?);
    let mut event_loop = EventLoop::new(&state)?;
    let (pio, serial) = legacy_devices(
        &vm_fd,
        &state,
        &mut event_loop,
        LegacyConfig {
            console,
            console_input: None,
            serial_state: Some(point.serial.clone()),
            debug_exit: point.debug_exit,
        },
    )?;
    let vm = Vm::new(VmParts {
        kvm,
        vm_fd,
        ram,
        vcpus,
        buses: Arc::new(IoBuses {
            pio,
            mmio: Bus::new(),
        }),
        serial,
        debug_exit: point.debug_exit,
        devices: Vec::new(),
        event_loop,
        state,
        vsock: None,
        balloon: None,
    });
    vm.start()?;
    Ok(vm)
}
