//! [`Vm::fork`]: copies of a running VM that continue from the same instant.
//!
//! The VM is paused; its vCPUs', interrupt controllers', PIT's, clock's and UART's state is read;
//! its RAM is frozen into an image (see [`crate::memory::freeze`]: no guest memory is copied for a
//! VM that was never frozen before); then each child is a new KVM VM over a private mapping of
//! that image, with the state written into fresh vCPUs. The parent resumes (unless it was paused)
//! and runs on over the same image.
//!
//! Not yet carried over: virtio devices (a VM that has any is refused), and the notice to the
//! guest that it was forked.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use forkvm_devices::bus::Bus;
use forkvm_devices::legacy::SerialState;

use crate::arch::probe::host_caps;
use crate::arch::state::{VcpuState, VmState};
use crate::builder::{LegacyConfig, create_vcpus, create_vm, legacy_devices, setup_err};
use crate::console::ConsoleOutput;
use crate::error::Error;
use crate::event_loop::EventLoop;
use crate::memory::freeze::FrozenRam;
use crate::run_state::RunState;
use crate::vcpu::IoBuses;
use crate::vm::{Vm, VmParts};
use kvm_ioctls::Kvm;

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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Vm {
    /// Splits this running (or paused) VM into `consoles.len()` new running VMs that continue
    /// from this instant, each writing its serial console to its entry of `consoles`. Each child
    /// has its own vCPU threads, devices and memory: a write by the parent or any child is never
    /// seen by another, and pages nobody writes stay shared. The parent continues (or stays
    /// paused if it was). VMs with virtio devices cannot be forked yet.
    pub fn fork(&self, consoles: Vec<ConsoleOutput>) -> Result<Vec<Vm>, Error> {
        let was_paused = self.is_paused();
        self.pause()?;
        let point = self.fork_point();
        if !was_paused {
            // The children do not depend on the parent running again, nor it on them.
            let _ = self.resume();
        }
        let point = point?;
        consoles
            .into_iter()
            .map(|console| start_from(self.kvm.clone(), &point, console))
            .collect()
    }

    /// Reads the paused VM's state and freezes its memory.
    pub(crate) fn fork_point(&self) -> Result<ForkPoint, Error> {
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

/// A new VM, started, that continues from `point` with its serial console on `console`.
pub(crate) fn start_from(
    kvm: Arc<Kvm>,
    point: &ForkPoint,
    console: ConsoleOutput,
) -> Result<Vm, Error> {
    let caps = host_caps(&kvm)?;
    let ram = point.image.map()?;
    let vm_fd = create_vm(&kvm, &ram)?;
    point.vm.restore(&vm_fd)?;
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
    // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as the parent was built with.
    let count = point.vcpus.len() as u8;
    let vcpus = create_vcpus(&kvm, &vm_fd, &caps, count, |id, fd| {
        point.vcpus[usize::from(id)].restore(fd)
    })?;
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
