//! The errors the public API returns, each saying what failed and what to do about it.

use std::io;
use std::path::PathBuf;

use forkvm_devices::virtio::vsock::VsockError;
use thiserror::Error;

use crate::boot::BootError;
use crate::memory::MemoryError;

/// Everything that can go wrong building, starting or running a VM.
#[derive(Debug, Error)]
pub enum Error {
    /// The KVM device does not exist.
    #[error(
        "{0} does not exist: this host has no KVM (enable virtualization and load kvm_intel or kvm_amd)"
    )]
    KvmMissing(PathBuf),
    /// The KVM device exists but this user may not open it.
    #[error(
        "permission denied opening {0}: run as a user in the group that owns it (usually 'kvm')"
    )]
    KvmPermission(PathBuf),
    /// The KVM device could not be opened for another reason.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration names no kernel.
    #[error("no kernel given: set one with VmBuilder::kernel")]
    NoKernel,
    /// Zero vCPUs were requested.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs were requested than KVM (or the MP table) allows.
    #[error("{requested} vCPUs requested but this host allows at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// Host limit.
        max: u32,
    },
    /// Less memory than a guest can boot in.
    #[error("{mib} MiB of guest memory is too little: at least {min} MiB are needed")]
    MemoryTooSmall {
        /// Requested size in MiB.
        mib: u64,
        /// Minimum in MiB.
        min: u64,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or boot parameters could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device or other part of the VM could not be set up.
    #[error("cannot set up {what}: {reason}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The host probe VM failed.
    #[error("probing the host's KVM failed: {0}")]
    Probe(String),
    /// A block device's image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    BlockImage {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The vsock device could not be created (bad CID, or its Unix socket path is taken).
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// [`crate::Vm::vsock_connect`] on a VM built without [`crate::VmBuilder::vsock`].
    #[error("this VM has no vsock device: add one with VmBuilder::vsock")]
    NoVsock,
    /// A connection to a guest vsock port failed.
    #[error("cannot connect to guest vsock port {port}: {source}")]
    VsockConnect {
        /// The guest port.
        port: u32,
        /// Why (`ConnectionRefused`: the guest refused; `TimedOut`: it did not answer).
        #[source]
        source: io::Error,
    },
    /// The console output file could not be opened.
    #[error("cannot open console output {path}: {source}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A VMM thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `start()` was called on a VM that already started or was stopped.
    #[error("the VM was already started or stopped; build a new one")]
    AlreadyStarted,
    /// The VM is not running (it ended, or was stopped), so it cannot be paused or resumed.
    #[error("the VM is not running{}", match .0.as_ref() { Some(exit) => format!(" (it ended: {exit})"), None => String::new() })]
    NotRunning(Box<Option<crate::exit::GuestExit>>),
    /// The VM's threads did not stop for a pause in time (a device handler may be stuck).
    #[error("the VM's threads did not stop within 5 s; the VM keeps running")]
    PauseTimedOut,
    /// A virtio device could not be frozen for a fork.
    #[error("cannot freeze virtio device type {device_type} for a fork: {source}")]
    DeviceFreeze {
        /// Its virtio device type.
        device_type: u32,
        /// Why.
        source: forkvm_devices::virtio::DeviceError,
    },
    /// A snapshot could not be written.
    #[error("cannot snapshot to {path}: {what}: {source}")]
    Snapshot {
        /// The snapshot directory.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A directory does not hold a usable snapshot.
    #[error("{path} is not a usable snapshot: {reason}")]
    SnapshotInvalid {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A snapshot from another forkvm, format or host CPU: restoring it could break the guest.
    #[error(
        "the snapshot's {what} is {snapshot:?}, this host's is {here:?}: restore it where it was taken"
    )]
    SnapshotIncompatible {
        /// What differs.
        what: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// This host's value.
        here: String,
    },
    /// A guest memory access outside the guest's RAM.
    #[error("guest memory {addr:#x}..+{len:#x} is not all RAM")]
    GuestAddress {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// `wait()` was called on a VM that was never started.
    #[error("the VM was not started: call start() first")]
    NotStarted,
}

/// Maps a failed KVM ioctl named `op` to [`Error::Kvm`].
pub(crate) fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
