//! [`Snapshot`]: a VM's complete state at one instant, which users hold, spawn new VMs from,
//! save to a directory and load again.
//!
//! [`crate::Vm::capture`] takes one: the VM is held paused only while its processor and device
//! state is read and its RAM frozen into an image (see `docs/design/memory-freeze.md`); the
//! image never changes afterwards, so a snapshot can be spawned from at any time, any number of
//! times, whatever its source VM does meanwhile. [`crate::Vm::fork`] is capture plus spawns,
//! [`crate::Vm::snapshot`] capture plus [`Snapshot::save`], [`crate::Vm::restore`]
//! [`Snapshot::load`] plus a spawn.
//!
//! A spawned VM continues from the snapshot with its devices ([`spawn`]): rng and console
//! continue, disks fork copy-on-write, vsock connections are reset, and the VM is the next
//! generation on its identity page. Children prepared ahead ([`Snapshot::prepare`]) have their
//! KVM VM, vCPUs, threads and disk overlays made and their RAM already mapping the image.
//!
//! A snapshot directory is not trusted when it is loaded (someone else may have written it):
//! [`disk`] says what a load checks, [`files`] how files are opened and how a save replaces a
//! snapshot without ever leaving none, [`state`] the bounds of the state file, [`checksum`] the
//! checksums; the design is in `docs/design/snapshot-files.md`.

mod checksum;
mod child;
mod disk;
mod files;
pub(crate) mod pool;
pub(crate) mod ready;
pub(crate) mod spawn;
mod state;

use std::path::Path;
use std::sync::{Arc, Mutex};

use forkvm_devices::legacy::SerialState;
use forkvm_devices::sync::lock;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::arch::state::{VcpuState, VmState};
use crate::error::Error;
use crate::identity::Identity;
use crate::machine::Machine;
use crate::memory::Expected;
use crate::memory::freeze::FrozenRam;
use crate::network::{GuestConnection, Network};
use crate::virtio::FrozenDevice;
use crate::vstate::ThreadSetup;

pub use crate::error::{FileProblem, SnapshotError};
pub use checksum::CHECKSUM_FILE;
pub use child::Child;
pub use disk::{DISK_FILE_PREFIX, LoadOptions, MEMORY_FILE, STATE_FILE};
pub(crate) use pool::Shell;
use pool::{ShellPool, ShellShape};
pub use state::SNAPSHOT_FORMAT;

/// The processor state of a snapshot.
#[derive(Serialize, Deserialize)]
pub(crate) struct CpuState {
    /// Each vCPU's state.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers and clock (and a PIT, for VMs that had one).
    pub vm: VmState,
}

/// A VM's complete state at one instant: frozen RAM, vCPUs, interrupt controllers, clock,
/// UART and virtio devices. Taken by [`Vm::capture`], or read from a directory by
/// [`Snapshot::load`]; every VM spawned from it continues from that instant on its own.
/// Cheap to hold: its RAM is an image shared with the VMs spawned from it.
pub struct Snapshot {
    /// The KVM handle spawned VMs are made with: the source VM's, or (for a loaded snapshot)
    /// `/dev/kvm`, opened at the first spawn.
    kvm: Mutex<Option<Arc<Kvm>>>,
    /// How spawned VMs' threads are set up: as the source VM's, or (loaded) the defaults.
    setup: ThreadSetup,
    /// The frozen RAM.
    pub(crate) image: Arc<FrozenRam>,
    /// The vCPUs' and the VM's state.
    pub(crate) cpu: Arc<CpuState>,
    /// The UART's registers and pending input.
    pub(crate) serial: SerialState,
    /// Whether the VM has the debug-exit port.
    pub(crate) debug_exit: bool,
    /// Virtio devices.
    pub(crate) devices: Vec<FrozenDevice>,
    /// The identity of the VM it was taken from.
    pub(crate) identity: Identity,
    /// The network spawned VMs get unless their [`Child`] names one: the source VM's, with the
    /// policy it had at the capture and no published ports (a loaded snapshot: the defaults).
    pub(crate) network: Option<Network>,
    /// The guest's TCP connections at the capture, which each spawned VM's new network resets.
    pub(crate) network_connections: Vec<GuestConnection>,
    /// Children prepared ahead for this snapshot ([`Snapshot::prepare`],
    /// [`Snapshot::keep_ready`]).
    shells: Arc<ShellPool>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // The refill thread holds only the pool: told to stop, it ends after the child it is
        // making, if any; the pool's children go with the last holder.
        self.shells.stop_refilling();
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("memory_size", &self.memory_size())
            .field("vcpus", &self.vcpus())
            .field("devices", &self.devices.len())
            .field("identity", &self.identity)
            .field("prepared", &self.prepared())
            .finish_non_exhaustive()
    }
}

/// What a snapshot is made of, as a capture or a load puts it together.
pub(crate) struct SnapshotParts {
    pub kvm: Option<Arc<Kvm>>,
    pub setup: ThreadSetup,
    pub image: Arc<FrozenRam>,
    pub cpu: Arc<CpuState>,
    pub serial: SerialState,
    pub debug_exit: bool,
    pub devices: Vec<FrozenDevice>,
    pub identity: Identity,
    pub network: Option<Network>,
    pub network_connections: Vec<GuestConnection>,
}

impl Snapshot {
    pub(crate) fn new(parts: SnapshotParts) -> Self {
        Self {
            kvm: Mutex::new(parts.kvm),
            setup: parts.setup,
            image: parts.image,
            cpu: parts.cpu,
            serial: parts.serial,
            debug_exit: parts.debug_exit,
            devices: parts.devices,
            identity: parts.identity,
            network: parts.network,
            network_connections: parts.network_connections,
            shells: Arc::default(),
        }
    }

    /// The machine of a VM spawned from this snapshot with the KVM handle `kvm`, its threads set
    /// up as `setup` says (the kick handler installed) and the prepared child `shell`, if any.
    /// (The VM itself: [`Snapshot::spawn`], with the VM handle.)
    pub(crate) fn machine(
        &self,
        kvm: Arc<Kvm>,
        setup: ThreadSetup,
        child: Child,
        shell: Option<Shell>,
    ) -> Result<Machine, Error> {
        spawn::machine_from(kvm, setup, self, child, shell)
    }

    /// A child prepared for this snapshot, if one is ready.
    pub(crate) fn take_prepared(&self) -> Option<Shell> {
        let shell = self.shells.take();
        self.refill();
        shell
    }

    /// The KVM handle and thread setup VMs are spawned with (for a loaded snapshot, `/dev/kvm`
    /// opened now).
    pub(crate) fn host(&self) -> Result<(Arc<Kvm>, ThreadSetup), Error> {
        Ok((self.kvm()?, self.setup))
    }

    /// Creates `n` more children ahead of time for this snapshot (KVM VMs with memory slots
    /// over the image, interrupt controllers, vCPUs, started threads and disk overlays), so
    /// that the next spawns only load state and attach devices. [`Snapshot::prepared`] tells
    /// how many are ready.
    pub fn prepare(&self, n: usize) -> Result<(), Error> {
        let kvm = self.kvm()?;
        self.shells.prepare(&kvm, &self.shell_shape(), n)
    }

    /// Keeps `n` children prepared for this snapshot (see [`Snapshot::prepare`]): creates what is
    /// missing on a background thread now, and again after each spawn that used one, so that
    /// spawns (restores) in a row each find one ready. 0 stops refilling (children already
    /// prepared stay ready).
    pub fn keep_ready(&self, n: usize) -> Result<(), Error> {
        self.kvm()?;
        self.shells.set_target(n);
        self.refill();
        Ok(())
    }

    /// Starts the refill thread if the pool is short and none runs.
    fn refill(&self) {
        if let Ok(kvm) = self.kvm() {
            self.shells.refill(kvm, || self.shell_shape());
        }
    }

    /// How many children are prepared for this snapshot.
    pub fn prepared(&self) -> usize {
        self.shells.len()
    }

    /// Writes this snapshot to `dir` (created if missing; a snapshot already there is replaced,
    /// a directory holding other files is refused): see [`crate::Vm::snapshot`] for the format.
    /// The files are written into a fresh directory beside `dir` and fsynced, which then takes
    /// `dir`'s place in one step: a failure at any point leaves the old snapshot whole.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(), Error> {
        disk::save(self, dir.as_ref())
    }

    /// Reads the snapshot in `dir`. Refuses one that is incomplete, of another format or forkvm
    /// version, taken on another CPU model, whose state is out of range or damaged, or whose
    /// files are links, special files, another user's, or disagree with its state
    /// ([`Error::SnapshotInvalid`] says which, as a [`SnapshotError`]). The memory file is
    /// mapped: see [`LoadOptions::copy_memory`] for a directory others may change.
    pub fn load(dir: impl AsRef<Path>) -> Result<Arc<Snapshot>, Error> {
        Self::load_with(dir, LoadOptions::default())
    }

    /// [`Snapshot::load`] with `options`: the memory and disk files checked against their
    /// checksums, the memory copied into a sealed memory file.
    pub fn load_with(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Arc<Snapshot>, Error> {
        disk::load(dir.as_ref(), options).map(Arc::new)
    }

    /// Parses and range-checks the contents of a snapshot's `state.json` as [`Snapshot::load`]
    /// does, without its other files, KVM, or the checks of the host (forkvm version, CPU).
    pub fn check_state_file(bytes: &[u8]) -> Result<(), SnapshotError> {
        disk::check_state_file(bytes)
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.image.size()
    }

    /// How many vCPUs the VMs spawned from it have.
    pub fn vcpus(&self) -> usize {
        self.cpu.vcpus.len()
    }

    /// Who the VM it was taken from is; a spawned VM is the next generation.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Reads the snapshot's guest memory at guest-physical `addr` into `buf`: what the guest's
    /// memory held at the instant of the capture.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        self.image
            .map()?
            .memory
            .read_slice(buf, vm_memory::GuestAddress(addr))
            .map_err(|_| Error::GuestAddress {
                addr,
                len: buf.len(),
            })
    }

    /// The KVM handle VMs are spawned with (for a loaded snapshot, `/dev/kvm` opened now).
    fn kvm(&self) -> Result<Arc<Kvm>, Error> {
        let mut kvm = lock(&self.kvm);
        if let Some(kvm) = &*kvm {
            return Ok(kvm.clone());
        }
        let opened = Arc::new(crate::vstate::kvm::open_kvm(Path::new(
            crate::DEFAULT_KVM_DEVICE,
        ))?);
        crate::vstate::vcpu::install_kick_handler(self.setup.kick_signal, false)?;
        crate::seccomp::prepare(self.setup.seccomp).map_err(Error::Seccomp)?;
        *kvm = Some(opened.clone());
        Ok(opened)
    }

    /// The shape of the children spawned from this snapshot.
    fn shell_shape(&self) -> ShellShape {
        ShellShape {
            memory_size: self.image.size(),
            // At most MAX_MPTABLE_VCPUS (< 256) vCPUs, as checked at capture or load.
            vcpus: self.cpu.vcpus.len() as u8,
            disks: self
                .devices
                .iter()
                .filter_map(FrozenDevice::disk_size)
                .collect(),
            expected: Some(Expected::Image(self.image.clone())),
            network: self
                .devices
                .iter()
                .any(|device| device.state.device.needs().network)
                .then(|| self.network.clone().unwrap_or_default()),
            seccomp: self.setup.seccomp,
        }
    }
}
