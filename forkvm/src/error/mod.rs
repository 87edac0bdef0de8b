//! The errors the public API returns, each saying what failed and what to do about it.

use std::io;
use std::path::PathBuf;

use forkvm_devices::virtio::vsock::VsockError;
use thiserror::Error;

use crate::boot::BootError;
use crate::memory::MemoryError;
use crate::seccomp::SeccompError;

mod snapshot;

pub use snapshot::{FileProblem, SnapshotError};

/// What kind of failure an [`Error`] (or the guest agent client's `AgentError`) is, from
/// [`Error::kind`] (and `AgentError::kind`, in `forkvm-agent-client`).
///
/// This is the one classification of forkvm's errors: the C binding's status codes, the Python
/// binding's exception classes and the Node binding's error codes are each one `match` on it.
/// New kinds may be added; a `match` needs a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is not acceptable: no kernel, no vCPUs, too many, too little memory.
    InvalidArgument,
    /// KVM is missing, may not be opened, one of its calls failed, or probing it failed.
    Kvm,
    /// The kernel or initrd could not be loaded.
    Boot,
    /// Guest memory could not be created, frozen or accessed (an address outside guest RAM).
    Memory,
    /// A host file or socket failed: a disk image, the console output file, a snapshot's
    /// files, the agent's host-side I/O.
    Io,
    /// The VM lacks the device a call needs (no vsock device, no network).
    NoDevice,
    /// The vsock device could not be created, or a connection through it failed.
    Vsock,
    /// The VM was not started.
    NotStarted,
    /// The VM was already started (or stopped).
    AlreadyStarted,
    /// The VM is not running: it ended or was stopped.
    NotRunning,
    /// Something did not finish in time (a pause, an agent request).
    TimedOut,
    /// A directory holds no usable snapshot, or one taken by another forkvm or on another CPU.
    Snapshot,
    /// The guest agent did not come up in time (not booted yet, or no agent in this guest).
    AgentNotReady,
    /// The program to run does not exist in the guest.
    CommandNotFound,
    /// The connection to the guest agent was lost.
    ConnectionLost,
    /// The guest agent refused a request, or answered something unexpected.
    Agent,
    /// Any other failure of the VMM (a thread or device could not be set up).
    Other,
}

/// Everything that can go wrong building, starting or running a VM.
///
/// An error's message does not repeat its cause ([`std::error::Error::source`]);
/// [`error_chain`](crate::error_chain) gives both as one line.
#[derive(Debug, Error)]
#[non_exhaustive]
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
    #[error("cannot open {path}")]
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
    /// More memory than a guest can address (or than fits in a byte count).
    #[error("{mib} MiB of guest memory is too much: at most {max} MiB are allowed")]
    MemoryTooLarge {
        /// Requested size in MiB.
        mib: u64,
        /// Maximum in MiB.
        max: u64,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or boot parameters could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A KVM ioctl failed.
    #[error("{op} failed")]
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
    /// The program installed a handler for a signal forkvm needs (the process has one handler
    /// per signal, and forkvm does not silently replace the program's).
    #[error(
        "signal {signal} (forkvm's {what} signal) has a handler this program installed: pick another signal (VmBuilder::kick_signal_offset) or let forkvm replace it (VmBuilder::replace_signal_handler)"
    )]
    SignalTaken {
        /// The signal number.
        signal: i32,
        /// What forkvm uses it for.
        what: &'static str,
    },
    /// The seccomp filters of the VM's threads could not be readied.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A block device's image could not be opened.
    #[error("cannot open disk image {path}")]
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
    #[error("cannot connect to guest vsock port {port}")]
    VsockConnect {
        /// The guest port.
        port: u32,
        /// Why (`ConnectionRefused`: the guest refused; `TimedOut`: it did not answer).
        #[source]
        source: io::Error,
    },
    /// The console output file could not be opened.
    #[error("cannot open console output {path}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A VMM thread could not be started.
    #[error("cannot start the {what} thread")]
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
    #[error("cannot freeze virtio device type {device_type} for a fork")]
    DeviceFreeze {
        /// Its virtio device type.
        device_type: u32,
        /// Why.
        source: forkvm_devices::virtio::DeviceError,
    },
    /// A snapshot could not be written.
    #[error("cannot snapshot to {path}: {what}")]
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
        /// Why: the file or the state field that is wrong.
        reason: SnapshotError,
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
    /// A network call on a VM built without [`crate::VmBuilder::network`].
    #[error("this VM has no network: add one with VmBuilder::network")]
    NoNetwork,
    /// A published port could not be bound on the host.
    #[error("cannot publish a guest port on {host}")]
    Publish {
        /// The host address asked for.
        host: std::net::SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A rate limit with a bucket that cannot work (size or refill time 0).
    #[error("invalid rate limit")]
    InvalidRateLimit(#[source] forkvm_devices::virtio::rate_limit::RateLimitError),
    /// No virtio device at this index of [`crate::Vm::devices`].
    #[error("the VM has no virtio device {0}")]
    NoSuchDevice(usize),
    /// An in-process connection to a guest TCP port could not be set up.
    #[error("cannot connect to guest TCP port {port}")]
    NetworkConnect {
        /// The guest port.
        port: u16,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        // No wildcard: a new variant must be classified here.
        match self {
            Self::KvmMissing(_)
            | Self::KvmPermission(_)
            | Self::KvmOpen { .. }
            | Self::Kvm { .. }
            | Self::Probe(_) => K::Kvm,
            Self::NoKernel
            | Self::NoVcpus
            | Self::TooManyVcpus { .. }
            | Self::MemoryTooSmall { .. }
            | Self::InvalidRateLimit(_)
            | Self::MemoryTooLarge { .. }
            | Self::SignalTaken { .. } => K::InvalidArgument,
            Self::Memory(_) | Self::GuestAddress { .. } => K::Memory,
            Self::Boot(_) => K::Boot,
            Self::BlockImage { .. } | Self::ConsoleFile { .. } | Self::Snapshot { .. } => K::Io,
            Self::NoVsock | Self::NoNetwork | Self::NoSuchDevice(_) => K::NoDevice,
            Self::Publish { .. } | Self::NetworkConnect { .. } => K::Io,
            Self::Vsock(_) | Self::VsockConnect { .. } => K::Vsock,
            Self::NotStarted => K::NotStarted,
            Self::AlreadyStarted => K::AlreadyStarted,
            Self::NotRunning(_) => K::NotRunning,
            Self::PauseTimedOut => K::TimedOut,
            Self::SnapshotInvalid { .. } | Self::SnapshotIncompatible { .. } => K::Snapshot,
            Self::Setup { .. }
            | Self::Thread { .. }
            | Self::DeviceFreeze { .. }
            | Self::Seccomp(_) => K::Other,
        }
    }
}

/// Maps a failed KVM ioctl named `op` to [`Error::Kvm`].
pub(crate) fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// An [`Error::Setup`] for `what`, with `e` as its reason.
pub(crate) fn setup_err(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Setup {
        what,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use forkvm_devices::virtio::DeviceError;

    use super::*;
    use crate::memory::MemoryError;

    fn io() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    fn kvm() -> kvm_ioctls::Error {
        kvm_ioctls::Error::new(libc::EINVAL)
    }

    /// How many variants [`Error`] has.
    const VARIANTS: usize = 35;

    /// Numbers each variant (no wildcard: a new variant must be added here, then to `VARIANTS`
    /// and [`samples`]).
    fn variant(e: &Error) -> usize {
        match e {
            Error::KvmMissing(_) => 0,
            Error::KvmPermission(_) => 1,
            Error::KvmOpen { .. } => 2,
            Error::NoKernel => 3,
            Error::NoVcpus => 4,
            Error::TooManyVcpus { .. } => 5,
            Error::MemoryTooSmall { .. } => 6,
            Error::Memory(_) => 7,
            Error::Boot(_) => 8,
            Error::Kvm { .. } => 9,
            Error::Setup { .. } => 10,
            Error::Probe(_) => 11,
            Error::BlockImage { .. } => 12,
            Error::Vsock(_) => 13,
            Error::NoVsock => 14,
            Error::VsockConnect { .. } => 15,
            Error::ConsoleFile { .. } => 16,
            Error::Thread { .. } => 17,
            Error::AlreadyStarted => 18,
            Error::NotRunning(_) => 19,
            Error::PauseTimedOut => 20,
            Error::DeviceFreeze { .. } => 21,
            Error::Snapshot { .. } => 22,
            Error::SnapshotInvalid { .. } => 23,
            Error::SnapshotIncompatible { .. } => 24,
            Error::GuestAddress { .. } => 25,
            Error::NotStarted => 26,
            Error::NoNetwork => 27,
            Error::Publish { .. } => 28,
            Error::NetworkConnect { .. } => 29,
            Error::InvalidRateLimit(_) => 30,
            Error::NoSuchDevice(_) => 31,
            Error::MemoryTooLarge { .. } => 32,
            Error::SignalTaken { .. } => 33,
            Error::Seccomp(_) => 34,
        }
    }

    /// One of each variant, with the kind the bindings show for it.
    fn samples() -> Vec<(Error, ErrorKind)> {
        use ErrorKind as K;
        let path = || PathBuf::from("/x");
        vec![
            (Error::KvmMissing(path()), K::Kvm),
            (Error::KvmPermission(path()), K::Kvm),
            (
                Error::KvmOpen {
                    path: path(),
                    source: kvm(),
                },
                K::Kvm,
            ),
            (Error::NoKernel, K::InvalidArgument),
            (Error::NoVcpus, K::InvalidArgument),
            (
                Error::TooManyVcpus {
                    requested: 300,
                    max: 254,
                },
                K::InvalidArgument,
            ),
            (Error::MemoryTooSmall { mib: 1, min: 2 }, K::InvalidArgument),
            (Error::MemoryTooLarge { mib: 1, max: 0 }, K::InvalidArgument),
            (Error::Memory(MemoryError::Stat(io())), K::Memory),
            (
                Error::Boot(BootError::UnknownKernelFormat { path: path() }),
                K::Boot,
            ),
            (
                Error::Kvm {
                    op: "KVM_RUN",
                    source: kvm(),
                },
                K::Kvm,
            ),
            (
                Error::Setup {
                    what: "a device",
                    reason: "no".into(),
                },
                K::Other,
            ),
            (Error::Probe("no".into()), K::Kvm),
            (
                Error::BlockImage {
                    path: path(),
                    source: io(),
                },
                K::Io,
            ),
            (Error::Vsock(VsockError::InvalidCid(2)), K::Vsock),
            (Error::NoVsock, K::NoDevice),
            (Error::NoNetwork, K::NoDevice),
            (Error::NoSuchDevice(9), K::NoDevice),
            (
                Error::InvalidRateLimit(
                    forkvm_devices::virtio::rate_limit::RateLimitError::ZeroSize,
                ),
                K::InvalidArgument,
            ),
            (
                Error::Publish {
                    host: "127.0.0.1:1".parse().unwrap(),
                    source: io(),
                },
                K::Io,
            ),
            (
                Error::NetworkConnect {
                    port: 1,
                    source: io(),
                },
                K::Io,
            ),
            (
                Error::VsockConnect {
                    port: 1,
                    source: io(),
                },
                K::Vsock,
            ),
            (
                Error::SignalTaken {
                    signal: 36,
                    what: "vCPU kick",
                },
                K::InvalidArgument,
            ),
            (Error::Seccomp(SeccompError::Handler("no".into())), K::Other),
            (
                Error::ConsoleFile {
                    path: path(),
                    source: io(),
                },
                K::Io,
            ),
            (
                Error::Thread {
                    what: "vCPU",
                    source: io(),
                },
                K::Other,
            ),
            (Error::AlreadyStarted, K::AlreadyStarted),
            (Error::NotRunning(Box::new(None)), K::NotRunning),
            (Error::PauseTimedOut, K::TimedOut),
            (
                Error::DeviceFreeze {
                    device_type: 2,
                    source: DeviceError::BadRequest("no".into()),
                },
                K::Other,
            ),
            (
                Error::Snapshot {
                    path: path(),
                    what: "memory",
                    source: io(),
                },
                K::Io,
            ),
            (
                Error::SnapshotInvalid {
                    path: path(),
                    reason: SnapshotError::Replaced,
                },
                K::Snapshot,
            ),
            (
                Error::SnapshotIncompatible {
                    what: "CPU",
                    snapshot: "a".into(),
                    here: "b".into(),
                },
                K::Snapshot,
            ),
            (Error::GuestAddress { addr: 0, len: 1 }, K::Memory),
            (Error::NotStarted, K::NotStarted),
        ]
    }

    #[test]
    fn every_error_variant_has_its_kind() {
        let mut seen = BTreeSet::new();
        for (error, kind) in samples() {
            assert_eq!(error.kind(), kind, "{error:?}");
            seen.insert(variant(&error));
        }
        assert_eq!(seen, (0..VARIANTS).collect(), "a variant has no sample");
    }

    #[test]
    fn messages_leave_the_cause_to_the_chain() {
        let error = Error::BlockImage {
            path: "/x".into(),
            source: io(),
        };
        assert_eq!(error.to_string(), "cannot open disk image /x");
        let chain = crate::error_chain(&error);
        assert!(chain.starts_with("cannot open disk image /x: "), "{chain}");
        assert!(chain.ends_with(&io().to_string()), "{chain}");
        assert_eq!(chain.matches(&io().to_string()).count(), 1, "{chain}");

        // Through a transparent wrapper, the cause still comes once.
        let memory = Error::Memory(MemoryError::Freeze {
            what: "seal",
            source: io(),
        });
        assert_eq!(
            crate::error_chain(&memory),
            format!("cannot freeze guest memory: seal: {}", io())
        );
    }
}
