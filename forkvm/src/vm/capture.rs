//! Capturing a VM into a [`Snapshot`], and the verbs built on it: fork, snapshot to a
//! directory, restore, and children prepared ahead of forks.
//!
//! A capture takes the VM's capture lock (one capture at a time) and a pause hold of its own, so
//! no other thread's `resume`, fork or snapshot can let the VM run while its state is read and
//! its RAM frozen. A VM that has not run (and whose memory the host has not written) since the
//! last capture is still exactly that capture, which is reused: its run epoch and write count
//! are unchanged.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use forkvm_devices::sync::lock;

use super::Vm;
use crate::arch::state::{VcpuState, VmState};
use crate::error::Error;
use crate::memory::freeze::FreezeDraft;
use crate::network::NetworkHandle;
use crate::phases;
use crate::snapshot::pool::{Shell, ShellShape};
use crate::snapshot::{Child, CpuState, LoadOptions, Snapshot, SnapshotParts};
use crate::vstate::ThreadSetup;
use kvm_ioctls::Kvm;

/// The last capture, and what the VM had done when it was taken: a capture of a VM with the same
/// run epoch and host-write count is the same.
pub(super) struct LastCapture {
    run_epoch: u64,
    writes: u64,
    snapshot: Arc<Snapshot>,
}

impl Vm {
    /// Captures this running (or paused) VM: reads its processor and device state and freezes
    /// its memory, holding it paused only meanwhile (a VM paused by someone else stays paused).
    /// The snapshot can be spawned from ([`Snapshot::spawn`]), saved ([`Snapshot::save`]) or
    /// held for later, whatever this VM does meanwhile. Captures of one VM from several
    /// threads are taken one after the other.
    pub fn capture(&self) -> Result<Arc<Snapshot>, Error> {
        let _span = phases::span("capture");
        let mut last = lock(&self.last_capture);
        // What a freeze can do before the pause (unless the last capture will be reused):
        // re-map RAM that was never frozen privately, or copy the image private RAM maps and
        // the pages it wrote.
        let draft = if self.is_paused() && last.is_some() {
            None
        } else {
            let _span = phases::span("capture.draft");
            Some(self.lock_ram().draft_freeze()?)
        };
        let paused_at = Instant::now();
        let span = phases::span("capture.pause");
        let hold = self.pause_guard()?;
        drop(span);
        let (run_epoch, writes) = (
            self.state.run_epoch(),
            self.host_writes.load(Ordering::SeqCst),
        );
        let reused = last
            .as_ref()
            .filter(|l| l.run_epoch == run_epoch && l.writes == writes)
            .map(|l| l.snapshot.clone());
        let snapshot = match reused {
            Some(snapshot) => snapshot,
            None => Arc::new(self.read_snapshot(draft)?),
        };
        let span = phases::span("capture.resume");
        drop(hold);
        drop(span);
        *lock(&self.last_pause) = Some(paused_at.elapsed());
        let span = phases::span("capture.release_replaced");
        self.lock_ram().release_replaced();
        drop(span);
        // Kept only while the VM stays paused (by someone else): once it ran, it differs.
        let _span = phases::span("capture.replace_last");
        *last = (self.state.run_epoch() == run_epoch).then(|| LastCapture {
            run_epoch,
            writes,
            snapshot: snapshot.clone(),
        });
        Ok(snapshot)
    }

    /// Reads the paused VM's state and freezes its memory, finishing `draft`.
    fn read_snapshot(&self, draft: Option<FreezeDraft>) -> Result<Snapshot, Error> {
        let span = phases::span("capture.devices");
        let devices = self
            .devices
            .iter()
            .map(|device| device.freeze())
            .collect::<Result<_, _>>()?;
        drop(span);
        let span = phases::span("capture.vcpus");
        let vcpus = self
            .vcpus
            .iter()
            .map(|vcpu| VcpuState::capture(&self.kvm, &lock(vcpu).fd))
            .collect::<Result<_, _>>()?;
        drop(span);
        let span = phases::span("capture.vm_state");
        let vm = VmState::capture(&self.kernel.vm_fd)?;
        drop(span);
        let span = phases::span("capture.freeze");
        let image = self.lock_ram().freeze_from(draft)?;
        drop(span);
        let serial = lock(&self.serial).state();
        Ok(Snapshot::new(SnapshotParts {
            kvm: Some(self.kvm.clone()),
            setup: self.state.setup(),
            image,
            cpu: Arc::new(CpuState { vcpus, vm }),
            serial,
            debug_exit: self.debug_exit,
            devices,
            identity: self.identity,
            network: self
                .network
                .as_ref()
                .map(|network| network.config.for_child(network.handle.as_ref())),
            network_connections: self
                .network
                .as_ref()
                .and_then(|network| network.handle.as_ref())
                .map(NetworkHandle::tcp_connections)
                .unwrap_or_default(),
        }))
    }

    /// Splits this running (or paused) VM into one new running VM per entry of `children`
    /// (each a [`Child`], or just the [`crate::ConsoleOutput`] of its serial console), all
    /// continuing from this instant: [`Vm::capture`], then [`Snapshot::spawn`] for each. Each
    /// child has its own vCPU threads, devices and memory: a write by the parent or any child is
    /// never seen by another, and pages nobody writes stay shared. The parent continues (or
    /// stays paused if it was). Children prepared with [`Vm::prepare_forks`] are used first.
    pub fn fork<C: Into<Child>>(
        &self,
        children: impl IntoIterator<Item = C>,
    ) -> Result<Vec<Vm>, Error> {
        let _span = phases::span("fork");
        let snapshot = self.capture()?;
        let children = children
            .into_iter()
            .map(|child| {
                let setup = self.state.setup();
                let shell = self.shells.take();
                phases::count("fork.prepared", u64::from(shell.is_some()));
                let _span = phases::span("fork.spawn");
                snapshot.spawn_in(self.kvm.clone(), setup, child.into(), shell)
            })
            .collect();
        let span = phases::span("fork.refill_start");
        self.refill_shells();
        drop(span);
        children
    }

    /// Writes this running (or paused) VM's complete state to `dir`: [`Vm::capture`], then
    /// [`Snapshot::save`]. The VM is paused only while it is captured; it continues (or stays
    /// paused) while the files are written.
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<(), Error> {
        self.capture()?.save(dir)
    }

    /// Starts a new VM from the snapshot in `dir`, connected to the host as `child` says:
    /// [`Snapshot::load`], then [`Snapshot::spawn`]. Its devices continue as a fork child's do,
    /// so vsock connections are gone and its guest gets a transport reset. Restoring the same
    /// snapshot again gives another independent VM. A directory kept ready
    /// ([`Vm::keep_restores_ready`]) is not loaded again: the VM starts in a prepared child.
    pub fn restore(dir: impl AsRef<Path>, child: impl Into<Child>) -> Result<Vm, Error> {
        match crate::snapshot::ready::get(dir.as_ref()) {
            Some(snapshot) => snapshot.spawn(child),
            None => Snapshot::load(dir)?.spawn(child),
        }
    }

    /// [`Vm::restore`] with `options` (see [`LoadOptions`]): the memory and disk files checked
    /// against their checksums, or the memory copied into a sealed file, for a directory that
    /// others may change while the VM runs. The directory is loaded anew even if it is kept
    /// ready.
    pub fn restore_with(
        dir: impl AsRef<Path>,
        child: impl Into<Child>,
        options: LoadOptions,
    ) -> Result<Vm, Error> {
        Snapshot::load_with(dir, options)?.spawn(child)
    }

    /// Keeps `n` children prepared for [`Vm::restore`]s of the snapshot in `dir`: loads it once
    /// and keeps it loaded, with `n` children made ahead and refilled in the background after
    /// each restore ([`Snapshot::keep_ready`]), so that each restore only loads processor and
    /// device state into a ready KVM VM (under a millisecond here, whatever the memory size).
    /// Costs meanwhile: the snapshot's memory file stays mapped and each prepared child holds a
    /// KVM VM and its threads. A directory whose `state.json` or `memory` file is replaced (a
    /// new snapshot saved there) is loaded again by the next restore, as without this. 0 lets
    /// the directory go.
    pub fn keep_restores_ready(dir: impl AsRef<Path>, n: usize) -> Result<(), Error> {
        crate::snapshot::ready::keep(dir.as_ref(), n)
    }

    /// How many children are prepared for restores of `dir` ([`Vm::keep_restores_ready`]): 0
    /// for a directory not kept ready, or whose files were replaced since.
    pub fn restores_ready(dir: impl AsRef<Path>) -> usize {
        crate::snapshot::ready::get(dir.as_ref()).map_or(0, |snapshot| snapshot.prepared())
    }

    /// Creates `n` more children ahead of time (KVM VMs with memory slots, interrupt
    /// controllers and vCPUs), so that the next forks only map memory and load state.
    /// [`Vm::prepared_forks`] tells how many are ready.
    pub fn prepare_forks(&self, n: usize) -> Result<(), Error> {
        self.shells.prepare(&self.kvm, &self.shell_shape(), n)
    }

    /// Keeps `n` children prepared (see [`Vm::prepare_forks`]): creates what is missing on a
    /// background thread now, and again after each fork that used some. 0 stops refilling
    /// (children already prepared stay ready).
    pub fn keep_forks_ready(&self, n: usize) {
        self.shells.set_target(n);
        self.refill_shells();
    }

    /// How many children are prepared.
    pub fn prepared_forks(&self) -> usize {
        self.shells.len()
    }

    /// Starts the refill thread if the pool is short and none runs.
    fn refill_shells(&self) {
        self.shells.refill(self.kvm.clone(), || self.shell_shape());
    }

    /// The shape of this VM's children.
    fn shell_shape(&self) -> ShellShape {
        let (memory_size, expected) = {
            let ram = self.lock_ram();
            (ram.size(), ram.next_image())
        };
        ShellShape {
            memory_size,
            // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as the VM was built with.
            vcpus: self.vcpus.len() as u8,
            disks: self
                .devices
                .iter()
                .filter_map(|device| device.disk_size())
                .collect(),
            expected,
            network: self
                .network
                .as_ref()
                .map(|network| network.config.for_child(network.handle.as_ref())),
            seccomp: self.state.setup().seccomp,
        }
    }
}

/// Spawning lives with the VM handle it returns (the snapshot module knows machines, not VMs).
impl Snapshot {
    /// Starts a new VM that continues from this snapshot, connected to the host as `child` says
    /// (a [`Child`], or just the [`crate::ConsoleOutput`] of its serial console). Uses a child
    /// prepared with [`Snapshot::prepare`] when one is ready.
    pub fn spawn(&self, child: impl Into<Child>) -> Result<Vm, Error> {
        let (kvm, setup) = self.host()?;
        let shell = self.take_prepared();
        self.spawn_in(kvm, setup, child.into(), shell)
    }

    /// [`Snapshot::spawn`] with the KVM handle `kvm`, its threads set up as `setup` says (the
    /// kick handler installed) and the prepared child `shell`, if any.
    pub(crate) fn spawn_in(
        &self,
        kvm: Arc<Kvm>,
        setup: ThreadSetup,
        child: Child,
        shell: Option<Shell>,
    ) -> Result<Vm, Error> {
        let vm = Vm::new(self.machine(kvm, setup, child, shell)?);
        let _span = crate::phases::span("spawn.start");
        vm.start()?;
        Ok(vm)
    }
}
