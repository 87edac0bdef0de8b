//! Dropping a [`Vm`]: it is told to end and the call returns; its threads, devices, KVM VM,
//! vCPUs and RAM are released on the reaper's threads ([`crate::reaper`]), except the names it
//! holds on the host (a vsock socket path, published ports, a TAP interface), which are given
//! back before the drop returns.

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use forkvm_devices::sync::lock;
use forkvm_devices::virtio::balloon::BalloonHandle;
use forkvm_devices::virtio::vsock::host::VsockConnector;
use kvm_ioctls::VmFd;

use super::{Extensions, Inner, Phase, Vm, capture};
use crate::exit::GuestExit;
use crate::identity::IdentityPage;
use crate::memory::GuestRam;
use crate::network::VmNetwork;
use crate::snapshot::pool::ShellPool;
use crate::virtio::AttachedDevice;
use crate::vstate::run_state::RunState;
use crate::vstate::threads::SpareThreads;
use crate::vstate::vcpu::{IoBuses, SharedVcpu};
use forkvm_devices::legacy::SerialPort;

/// What a VM holds in the kernel, in the order it is released: the KVM VM (with its memory
/// slots) before the mappings under them.
pub(super) struct KernelParts {
    pub vm_fd: VmFd,
    pub ram: Mutex<GuestRam>,
    pub identity_page: IdentityPage,
}

/// What a dropped VM leaves to the reaper's threads ([`crate::reaper`]), released in this
/// order: its threads (waited for), its devices, network and other host ends (unless dropping
/// gave them back already), its prepared children (KVM VMs too), vCPUs and kernel parts. Tearing
/// a KVM VM down takes milliseconds here (its memory slots' metadata, its MMU) and each thread's
/// end goes past the MMU notifier of every VM in the process, so dropping many VMs would
/// otherwise hold the caller for seconds.
pub(super) struct Teardown {
    state: Arc<RunState>,
    phase: Phase,
    ends: HostEnds,
    shells: Arc<ShellPool>,
    vcpus: Vec<SharedVcpu>,
    kernel: Option<KernelParts>,
    /// The rest of the VM (emptied above), freed here rather than by the caller.
    rest: Option<Box<Inner>>,
}

/// A dropped VM's RAM and identity page, unmapped once its KVM VM is gone.
struct Unmap(Option<(Mutex<GuestRam>, IdentityPage)>);

impl Drop for Unmap {
    fn drop(&mut self) {
        let _span = crate::phases::span("teardown.unmap");
        drop(self.0.take());
    }
}

/// A dropped VM's devices and what else the host sees of it, with what the VM kept for its
/// callers.
#[derive(Default)]
#[expect(dead_code, reason = "the fields are held to be released")]
struct HostEnds {
    devices: Vec<AttachedDevice>,
    vsock: Option<VsockConnector>,
    balloon: Option<BalloonHandle>,
    network: Option<VmNetwork>,
    extensions: Extensions,
    last_capture: Option<capture::LastCapture>,
    spare_threads: SpareThreads,
    /// References to what the VM's own fields hold, so that their last holder is likely the
    /// reaper rather than the caller's drop (see [`Vm::drop`] on the heap).
    buses: Option<Arc<IoBuses>>,
    serial: Option<Arc<Mutex<SerialPort>>>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        // The VM has been told to end: its threads go first (nothing below may go while they
        // run), then a child being prepared, if any; then the fields, in declaration order.
        let span = crate::phases::span("teardown.threads");
        self.state.wait();
        if let Phase::Running { event_thread } = std::mem::replace(&mut self.phase, Phase::Ended) {
            let _ = event_thread.join();
        }
        drop(span);
        let span = crate::phases::span("teardown.ends");
        drop(std::mem::take(&mut self.ends));
        drop(span);
        let span = crate::phases::span("teardown.shells");
        self.shells.close();
        drop(span);
        let span = crate::phases::span("teardown.vcpus");
        drop(std::mem::take(&mut self.vcpus));
        drop(span);
        if let Some(KernelParts {
            vm_fd,
            ram,
            identity_page,
        }) = self.kernel.take()
        {
            let span = crate::phases::span("teardown.vm");
            drop(vm_fd);
            drop(span);
            // Unmapping RAM goes past the MMU notifier of every KVM VM left in the process: it
            // waits behind the VMs queued for teardown meanwhile, so that after a mass drop it
            // finds few left.
            crate::reaper::drop_later(Unmap(Some((ram, identity_page))));
        }
    }
}

impl Drop for Vm {
    /// Ends the VM and returns; its threads, devices, KVM VM, vCPUs, RAM and prepared children
    /// are released in the background ([`crate::pending_releases`],
    /// [`crate::wait_for_releases`]). A VM holding names on the host — a vsock socket path,
    /// published ports, a TAP interface — is an exception: dropping it waits for its threads and
    /// gives those back before it returns, so that the next VM can take them at once.
    fn drop(&mut self) {
        let _span = crate::phases::span("vm.drop");
        let span = crate::phases::span("vm.drop.refill");
        self.shells.stop_refilling();
        drop(span);
        let mut ends = HostEnds::default();
        if self.host_names {
            self.stop();
        } else {
            let span = crate::phases::span("vm.drop.finish");
            self.state.finish(GuestExit::Stopped);
            drop(span);
            ends = HostEnds {
                devices: std::mem::take(&mut self.devices),
                vsock: self.vsock.take(),
                balloon: self.balloon.take(),
                network: self.network.take(),
                extensions: std::mem::take(&mut self.extensions),
                last_capture: lock(&self.last_capture).take(),
                spare_threads: std::mem::take(&mut *lock(&self.spare_threads)),
                buses: Some(self.buses.clone()),
                serial: Some(self.serial.clone()),
            };
        }
        // SAFETY: `kernel` is taken once, here in `drop`, and never used again.
        let kernel = unsafe { ManuallyDrop::take(&mut self.kernel) };
        let phase = std::mem::replace(&mut *self.lock_phase(), Phase::Ended);
        let _span = crate::phases::span("vm.drop.send");
        let teardown = Teardown {
            state: self.state.clone(),
            phase,
            ends,
            shells: self.shells.clone(),
            vcpus: std::mem::take(&mut self.vcpus),
            kernel: Some(kernel),
            rest: None,
        };
        // Into the box the VM was made with: growing the heap here would wait behind every
        // other change to the process's mappings, which a mass drop makes many of (the exiting
        // threads' stacks, the unmapped RAM; see `crate::reaper`'s queue).
        let slot = self.teardown.get_mut().ok().and_then(Option::take);
        let mut teardown = match slot {
            Some(slot) => Box::write(slot, teardown),
            None => Box::new(teardown),
        };
        let host_names = self.host_names;
        // SAFETY: `inner` is taken once, here in `drop`, and never used again.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        if host_names {
            // The rest (its buses hold the devices) goes now, with the names on the host.
            crate::reaper::drop_boxed_later(teardown);
            drop(inner);
        } else {
            teardown.rest = Some(inner);
            crate::reaper::drop_boxed_later(teardown);
        }
    }
}
