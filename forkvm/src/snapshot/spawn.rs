//! Spawning: a new KVM VM (or a prepared one, [`super::pool`]) over a private mapping of a
//! snapshot's image, with its processor state written into fresh vCPUs and a copy of each
//! virtio device at the same window and IRQ, its queues where the driver left them: rng and
//! console continue (a console's pending input goes to every child); block devices fork
//! copy-on-write (the parent keeps writing its image, each child writes its own overlay: see
//! `docs/design/block-cow.md`); a child's vsock device has new host endpoints and sends its
//! guest a transport reset, since connections do not survive a fork; a balloon keeps its target
//! and size. Each child is a new generation on its identity page ([`crate::identity`]).

use std::fs::File;
use std::sync::Arc;

use forkvm_devices::chain::ErrorChain;
use forkvm_devices::virtio::balloon::BalloonHandle;
use forkvm_devices::virtio::persist::{ContinueError, HostEnds};
use forkvm_devices::virtio::vsock::host::VsockConnector;
use kvm_ioctls::Kvm;

use super::Snapshot;
use super::child::Child;
use super::pool::{Shell, ShellShape};
use crate::console::{ConsoleInput, ConsoleOutput};
use crate::error::{Error, setup_err};
use crate::machine::{self, LegacyConfig, Machine, MachineSpec};
use crate::memory::{Expected, GuestRam};
use crate::network::{PreparedNetwork, VmNetwork};
use crate::phases;
use crate::virtio::{VirtioDeviceSpec, VirtioPlan};
use crate::vstate::ThreadSetup;

/// The machine of a new VM that continues from `point`, connected to the host as `child` says,
/// built in `shell` if one is given (its KVM VM must come from `kvm`).
pub(crate) fn machine_from(
    kvm: Arc<Kvm>,
    setup: ThreadSetup,
    point: &Snapshot,
    mut child: Child,
    shell: Option<Shell>,
) -> Result<Machine, Error> {
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
                expected: Some(Expected::Image(point.image.clone())),
                // Likewise its network: made below.
                network: None,
                seccomp: setup.seccomp,
            },
        )?,
    };
    let Shell {
        vm_fd,
        vcpus,
        ram,
        identity_page,
        threads,
        mut layer_files,
        network: mut prepared_network,
    } = shell;
    let span = phases::span("spawn.adopt");
    let ram = ram.adopt(&point.image)?;
    drop(span);
    let span = phases::span("spawn.state");
    let identity = point.identity.next()?;
    identity_page.write(&identity)?;
    point.cpu.vm.restore(&vm_fd)?;
    // On this thread, one vCPU after the other: waking each vCPU's thread to write its own state
    // costs more here than the parallel writes save.
    for (vcpu, state) in vcpus.iter().zip(&point.cpu.vcpus) {
        state.restore(&vcpu.fd)?;
    }
    drop(span);
    let span = phases::span("spawn.devices");
    let ChildDevices {
        plan,
        vsock,
        balloon,
        network,
    } = continue_devices(
        point,
        &mut child,
        &mut layer_files,
        &mut prepared_network,
        &ram,
    )?;
    drop(span);
    let _span = phases::span("spawn.assemble");
    let machine = machine::assemble(MachineSpec {
        kvm,
        vm_fd,
        ram,
        vcpus,
        setup,
        legacy: LegacyConfig {
            console: std::mem::replace(&mut child.console, ConsoleOutput::Discard),
            console_input: child.console_input.take(),
            serial_state: Some(point.serial.clone()),
            debug_exit: point.debug_exit,
        },
        virtio: plan,
        vsock,
        vsock_uds: child.vsock_uds_path.is_some(),
        balloon,
        network,
        identity,
        identity_page,
        threads,
    })?;
    Ok(machine)
}

/// A child's virtio devices, and the handles the VM keeps to its vsock device and balloon.
struct ChildDevices {
    plan: VirtioPlan,
    vsock: Option<VsockConnector>,
    balloon: Option<BalloonHandle>,
    network: Option<VmNetwork>,
}

/// Creates a child's copy of each device of `point`, connected to the host ends `child` names
/// (each console takes the child's next virtio console); its disks' overlays are `layer_files`
/// as long as there are some, its balloon frees pages of `ram`, the child's own RAM (which
/// has adopted the image), and its network device gets a network of its own (the child's, or
/// one like the snapshot's source's). Each device says what it needs and rebuilds itself
/// ([`forkvm_devices::virtio::DeviceState::into_device`]).
fn continue_devices(
    point: &Snapshot,
    child: &mut Child,
    layer_files: &mut Vec<File>,
    prepared_network: &mut Option<PreparedNetwork>,
    ram: &GuestRam,
) -> Result<ChildDevices, Error> {
    let (mut vsock, mut balloon, mut network) = (None, None, None);
    let mut devices = Vec::with_capacity(point.devices.len());
    for device in &point.devices {
        let needs = device.state.device.needs();
        let mut ends = HostEnds::default();
        if needs.console {
            let (output, input) = child
                .virtio_consoles
                .pop_front()
                .unwrap_or((ConsoleOutput::Discard, None));
            ends.console_output = Some(output.into_writer()?);
            ends.console_input = input.map(ConsoleInput::into_fd).transpose()?;
        }
        if needs.overlay_bytes.is_some() && !layer_files.is_empty() {
            ends.overlay = Some(layer_files.remove(0));
        }
        if needs.vsock_uds {
            ends.vsock_uds_path = child.vsock_uds_path.clone();
        }
        if needs.ram_discard {
            ends.ram_discard = Some(ram.discarder());
        }
        if needs.network && network.is_none() {
            // A network prepared ahead was made like the snapshot's: not for the child's own.
            let (config, prepared) = match child.network.take() {
                Some(own) => (own, None),
                None => (
                    point.network.clone().unwrap_or_default(),
                    prepared_network.take(),
                ),
            };
            let span = phases::span("devices.network");
            let (backend, handle) = config.backend(&point.network_connections, prepared)?;
            drop(span);
            ends.net_backend = Some(backend);
            network = Some(VmNetwork { config, handle });
        }
        let (continued, handles) = device.state.device.into_device(ends).map_err(|e| match e {
            ContinueError::Vsock(e) => Error::Vsock(e),
            e => setup_err("virtio device of a child", ErrorChain(&e)),
        })?;
        vsock = vsock.or(handles.vsock);
        balloon = balloon.or(handles.balloon);
        devices.push((VirtioDeviceSpec::new(continued), device));
    }
    Ok(ChildDevices {
        plan: VirtioPlan::continued(devices)?,
        vsock,
        balloon,
        network,
    })
}
