//! forkvm: an embeddable, in-process KVM virtual machine monitor.
//!
//! Build a VM with [`VmBuilder`], [`Vm::start`] it, and [`Vm::wait`] for how the guest ended:
//!
//! ```no_run
//! use forkvm::{ConsoleBuffer, ConsoleOutput, VmBuilder};
//!
//! let console = ConsoleBuffer::new();
//! let vm = VmBuilder::new()
//!     .kernel("vmlinux")
//!     .memory_mib(256)
//!     .console(ConsoleOutput::Buffer(console.clone()))
//!     .build()?;
//! vm.start()?;
//! println!("{}: {}", vm.wait()?, console.text());
//! # Ok::<(), forkvm::Error>(())
//! ```
#![warn(missing_debug_implementations)]

mod arch;
mod boot;
mod builder;
mod console;
mod error;
mod exit;
mod identity;
mod layout;
mod machine;
mod memory;
pub mod network;
mod phases;
mod reaper;
mod releases;
mod seccomp;
mod snapshot;
#[cfg(test)]
mod test_guest;
mod virtio;
mod vm;
mod vstate;

pub use boot::BootError;
pub use builder::{
    BalloonConfig, DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE, DEFAULT_MEMORY_MIB, DiskConfig,
    EMULATED_HOST_CMDLINE, PLATFORM_CMDLINE, VmBuilder, VsockConfig,
};
pub use console::{
    ConsoleBuffer, ConsoleCallback, ConsoleInput, ConsoleOutput, DEFAULT_CONSOLE_BUFFER_LIMIT,
};
pub use error::{Error, ErrorKind};
pub use exit::{CpuRegisters, Crash, CrashReason, GuestExit};
pub use forkvm_devices::chain::{ErrorChain, error_chain};
pub use forkvm_devices::virtio::balloon::{
    BalloonError, BalloonHandle, BalloonStats, stat_tag as balloon_stat_tag,
};
pub use forkvm_devices::virtio::rate_limit::{Bucket, RateLimit, RateLimitError};
pub use identity::Identity;
pub use layout::{IDENTITY_PAGE_ADDR, ZERO_PAGE_ADDR};
pub use memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB, MemoryError};
pub use network::{Network, NetworkHandle, NetworkPolicy};
pub use phases::take_phase_timings;
pub use reaper::pending_releases;
pub use releases::wait_for_releases;
#[cfg(feature = "bench-utils")]
#[doc(hidden)]
pub use seccomp::filter_this_thread_for_bench;
pub use seccomp::{
    SeccompDenials, SeccompError, SeccompPolicy, ThreadKind, seccomp_denials, seccomp_policy,
    set_seccomp_policy,
};
pub use snapshot::{
    CHECKSUM_FILE, Child, DISK_FILE_PREFIX, FileProblem, LoadOptions, MEMORY_FILE, SNAPSHOT_FORMAT,
    STATE_FILE, Snapshot, SnapshotError,
};
pub use virtio::{DeviceInfo, DeviceKind};
pub use vm::{Extensions, Vm, VsockDialer};
pub use vstate::run_state::PauseGuard;
pub use vstate::vcpu::{KICK_SIGNAL_OFFSET, kick_signal};
