//! [`Vm::fork`]: copies of a running VM that continue from the same instant.
//!
//! The VM is paused; its vCPUs', interrupt controllers', PIT's, clock's and UART's state is read;
//! its RAM is frozen into an image (see [`crate::memory::freeze`]: no guest memory is copied for a
//! VM that was never frozen before, and only what it wrote during the last pre-copy round for one
//! that was); then each child is a new KVM VM over a private mapping of that image, with the state
//! written into fresh vCPUs. The parent resumes (unless it was paused). A paused VM forked again
//! before it resumes reuses what the first fork captured ([`PausedCapture`]): its image and its
//! processor state.
//!
//! A child is built in a KVM VM prepared ahead of time when one is ready ([`crate::prepared`]):
//! its memory slots already map the image's file, its threads are started and its disks' overlay
//! files made, so the fork itself writes state and attaches devices.
//!
//! Virtio devices are frozen with the rest ([`forkvm_devices::virtio::DeviceState`]) and each
//! child gets copies at the same windows and IRQs, with their queues where the driver left them:
//! rng and console continue (a console's pending input goes to every child); block devices fork
//! copy-on-write (the parent keeps writing its image, each child writes its own overlay: see
//! `forkvm_devices::virtio::block::layers`); a child's vsock device has new host endpoints and
//! sends its guest a transport reset, since connections do not survive a fork; a balloon keeps
//! its target and size. Each child is a new generation on its identity page
//! ([`crate::identity`]), which tells its guest that it was forked.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use forkvm_devices::bus::Bus;
use forkvm_devices::legacy::SerialState;
use forkvm_devices::virtio::DeviceState;
use forkvm_devices::virtio::balloon::{Balloon, BalloonHandle};
use forkvm_devices::virtio::block::Block;
use forkvm_devices::virtio::console::Console;
use forkvm_devices::virtio::rng::Rng;
use forkvm_devices::virtio::vsock::Vsock;
use forkvm_devices::virtio::vsock::host::VsockConnector;

use crate::arch::state::{VcpuState, VmState};
use crate::builder::{ConsoleInputDebug, LegacyConfig, legacy_devices, setup_err};
use crate::console::{ConsoleInput, ConsoleOutput};
use crate::error::Error;
use crate::event_loop::EventLoop;
use crate::identity::Identity;
use crate::memory::freeze::{FreezeDraft, FrozenRam};
use crate::prepared::{Shell, ShellShape};
use crate::run_state::RunState;
use crate::vcpu::IoBuses;
use crate::virtio::{FrozenDevice, VirtioDeviceSpec, VirtioPlan};
use crate::vm::{Vm, VmParts};
use forkvm_devices::sync::lock;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

/// How one child of a fork reaches the host: its serial console and input, the host ends of
/// its virtio consoles, and its vsock Unix socket. A [`ConsoleOutput`] converts into a child
/// with only a serial console (its virtio consoles' output is discarded, and host programs
/// reach its vsock device only through [`Vm::vsock_connect`]).
#[derive(Debug)]
pub struct Child {
    console: ConsoleOutput,
    console_input: Option<ConsoleInputDebug>,
    virtio_consoles: VecDeque<(ConsoleOutput, Option<ConsoleInputDebug>)>,
    vsock_uds_path: Option<PathBuf>,
}

impl Child {
    /// A child whose serial console writes to `console`.
    pub fn new(console: ConsoleOutput) -> Self {
        Self {
            console,
            console_input: None,
            virtio_consoles: VecDeque::new(),
            vsock_uds_path: None,
        }
    }

    /// Feeds the child's serial console from `input`.
    pub fn console_input(mut self, input: ConsoleInput) -> Self {
        self.console_input = Some(ConsoleInputDebug(input));
        self
    }

    /// The host end of the child's next virtio console (the first call is for the parent's
    /// first virtio console, and so on): its output, and its input if given.
    pub fn virtio_console(mut self, output: ConsoleOutput, input: Option<ConsoleInput>) -> Self {
        self.virtio_consoles
            .push_back((output, input.map(ConsoleInputDebug)));
        self
    }

    /// Where host programs reach the child's vsock device, as [`crate::Vsock::uds_path`] (the
    /// parent's socket stays the parent's).
    pub fn vsock_uds_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.vsock_uds_path = Some(path.into());
        self
    }
}

impl From<ConsoleOutput> for Child {
    fn from(console: ConsoleOutput) -> Self {
        Self::new(console)
    }
}

/// The processor state of a fork point.
#[derive(Serialize, Deserialize)]
pub(crate) struct CpuState {
    /// Each vCPU's state.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT and clock.
    pub vm: VmState,
}

/// What a fork of a paused VM reuses from the previous fork (or snapshot) of the same pause,
/// as long as nothing changed: the frozen RAM and the processor state.
pub(crate) struct PausedCapture {
    image: Arc<FrozenRam>,
    cpu: Arc<CpuState>,
}

/// What every child of one fork (or a restored snapshot) starts from.
pub(crate) struct ForkPoint {
    /// The frozen RAM.
    pub image: Arc<FrozenRam>,
    /// The vCPUs' and the VM's state.
    pub cpu: Arc<CpuState>,
    /// The UART's registers and pending input.
    pub serial: SerialState,
    /// Whether the VM has the debug-exit port.
    pub debug_exit: bool,
    /// Virtio devices.
    pub devices: Vec<FrozenDevice>,
    /// The identity of the VM it was taken from.
    pub identity: Identity,
}

impl Vm {
    /// Splits this running (or paused) VM into one new running VM per entry of `children`
    /// (each a [`Child`], or just the [`ConsoleOutput`] of its serial console), all continuing
    /// from this instant. Each child has its own vCPU threads, devices and memory: a write by
    /// the parent or any child is never seen by another, and pages nobody writes stay shared.
    /// The parent continues (or stays paused if it was).
    pub fn fork<C: Into<Child>>(
        &self,
        children: impl IntoIterator<Item = C>,
    ) -> Result<Vec<Vm>, Error> {
        let point = self.capture()?;
        let children = children
            .into_iter()
            .map(|child| start_from(self.kvm.clone(), &point, child.into(), self.shells.take()))
            .collect();
        self.refill_shells();
        children
    }

    /// Reads the state and freezes the memory of this running (or paused) VM, pausing it only
    /// meanwhile: what a fork or a snapshot continues from.
    pub(crate) fn capture(&self) -> Result<ForkPoint, Error> {
        let was_paused = self.is_paused();
        // What a freeze can do before the pause (unless a paused VM's capture will be reused):
        // re-map RAM that was never frozen privately, or copy the image private RAM maps and
        // the pages it wrote.
        let draft = if was_paused && lock(&self.paused_capture).is_some() {
            None
        } else {
            Some(self.lock_ram().draft_freeze()?)
        };
        let paused_at = Instant::now();
        self.pause()?;
        let point = self.fork_point(draft);
        if !was_paused {
            // Nothing captured depends on the VM staying paused: the image never changes.
            let _ = self.resume();
        }
        *lock(&self.last_pause) = Some(paused_at.elapsed());
        self.lock_ram().release_replaced();
        point
    }

    /// Reads the paused VM's state and freezes its memory, finishing `draft`.
    fn fork_point(&self, draft: Option<FreezeDraft>) -> Result<ForkPoint, Error> {
        let devices = self
            .devices
            .iter()
            .map(|device| device.freeze())
            .collect::<Result<_, _>>()?;
        let mut paused_capture = lock(&self.paused_capture);
        let reused = match paused_capture.take() {
            // Paused, and neither resumed nor written since the last capture: the image is
            // still the RAM, and the vCPUs and VM have not run.
            Some(reused) => reused,
            None => {
                let vcpus = self
                    .vcpus
                    .iter()
                    .map(|vcpu| VcpuState::capture(&self.kvm, &lock(vcpu).fd))
                    .collect::<Result<_, _>>()?;
                let vm = VmState::capture(&self.vm_fd)?;
                PausedCapture {
                    image: self.lock_ram().freeze_from(draft)?,
                    cpu: Arc::new(CpuState { vcpus, vm }),
                }
            }
        };
        let (image, cpu) = (reused.image.clone(), reused.cpu.clone());
        *paused_capture = Some(reused);
        drop(paused_capture);
        let serial = lock(&self.serial).state();
        Ok(ForkPoint {
            image,
            cpu,
            serial,
            debug_exit: self.debug_exit,
            devices,
            identity: self.identity,
        })
    }
}

/// A new VM, started, that continues from `point` connected to the host as `child` says, built
/// in `shell` if one is given.
pub(crate) fn start_from(
    kvm: Arc<Kvm>,
    point: &ForkPoint,
    mut child: Child,
    shell: Option<Shell>,
) -> Result<Vm, Error> {
    // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as the parent was built with.
    let count = point.cpu.vcpus.len() as u8;
    let shell = match shell {
        Some(shell) => shell,
        None => Shell::new(
            &kvm,
            ShellShape {
                memory_size: point.image.size(),
                vcpus: count,
                // Made ahead of a fork, overlay files save it time; here they would not.
                disks: Vec::new(),
                expected: Some(point.image.file().clone()),
            },
        )?,
    };
    let Shell {
        vm_fd,
        vcpus,
        mut ram,
        identity_page,
        threads,
        mut layer_files,
    } = shell;
    ram.adopt(&point.image)?;
    let identity = point.identity.next()?;
    identity_page.write(&identity)?;
    point.cpu.vm.restore(&vm_fd)?;
    // On this thread, one vCPU after the other: waking each vCPU's thread to write its own state
    // costs more here than the parallel writes save.
    for (vcpu, state) in vcpus.iter().zip(&point.cpu.vcpus) {
        state.restore(&vcpu.fd)?;
    }
    let state = Arc::new(RunState::new().map_err(|e| setup_err("VM run state", e))?);
    let mut event_loop = EventLoop::new(&state)?;
    let (pio, serial) = legacy_devices(
        &vm_fd,
        &state,
        &mut event_loop,
        LegacyConfig {
            console: std::mem::replace(&mut child.console, ConsoleOutput::Discard),
            console_input: child.console_input.take(),
            serial_state: Some(point.serial.clone()),
            debug_exit: point.debug_exit,
        },
    )?;
    let ChildDevices {
        plan,
        vsock,
        balloon,
    } = continue_devices(&point.devices, child, &mut layer_files)?;
    let mut mmio = Bus::new();
    let devices = plan.attach(&vm_fd, &mut mmio, &mut event_loop, &ram.memory)?;
    let vm = Vm::new(VmParts {
        kvm,
        vm_fd,
        ram,
        vcpus,
        buses: Arc::new(IoBuses { pio, mmio }),
        serial,
        debug_exit: point.debug_exit,
        devices,
        event_loop,
        state,
        vsock,
        balloon,
        identity,
        identity_page,
        threads,
    });
    vm.start()?;
    Ok(vm)
}

/// A child's virtio devices, and the handles the VM keeps to its vsock device and balloon.
struct ChildDevices {
    plan: VirtioPlan,
    vsock: Option<VsockConnector>,
    balloon: Option<BalloonHandle>,
}

/// Creates a child's copy of each `frozen` device, connected to the host ends `child` names; its
/// disks' overlays are `layer_files` as long as there are some.
fn continue_devices(
    frozen: &[FrozenDevice],
    mut child: Child,
    layer_files: &mut Vec<File>,
) -> Result<ChildDevices, Error> {
    let (mut vsock, mut balloon) = (None, None);
    let mut devices = Vec::with_capacity(frozen.len());
    for device in frozen {
        let spec = match &device.state.device {
            DeviceState::Rng => VirtioDeviceSpec::new(Box::new(Rng::new())),
            DeviceState::Block(state) => {
                let block = match layer_files.pop() {
                    Some(overlay) => Block::from_state_over(state, overlay),
                    None => Block::from_state(state),
                };
                VirtioDeviceSpec::new(Box::new(
                    block.map_err(|e| setup_err("virtio-blk overlay", e))?,
                ))
            }
            DeviceState::SavedBlock(saved) => {
                // Snapshots turn these back into `Block` before a VM starts from them.
                return Err(setup_err(
                    "virtio-blk",
                    format!("disk {} was not opened", saved.file),
                ));
            }
            DeviceState::Console(state) => {
                let (output, input) = child
                    .virtio_consoles
                    .pop_front()
                    .unwrap_or((ConsoleOutput::Discard, None));
                let console = Console::from_state(state, output.into_writer()?)
                    .map_err(|e| setup_err("virtio-console", e))?;
                VirtioDeviceSpec::console(console, input.map(|i| i.into_fd()).transpose()?)
            }
            DeviceState::Vsock(state) => {
                let device = Vsock::from_state(state, child.vsock_uds_path.as_deref())?;
                vsock = Some(device.connector());
                VirtioDeviceSpec::new(Box::new(device))
            }
            DeviceState::Balloon(state) => {
                let device =
                    Balloon::from_state(state).map_err(|e| setup_err("virtio-balloon", e))?;
                balloon = Some(device.handle());
                VirtioDeviceSpec::new(Box::new(device))
            }
        };
        devices.push((spec, device));
    }
    Ok(ChildDevices {
        plan: VirtioPlan::continued(devices)?,
        vsock,
        balloon,
    })
}
