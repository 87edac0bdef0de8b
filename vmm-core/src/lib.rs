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

pub mod agent;
pub mod arch;
pub mod boot;
mod builder;
mod console;
mod error;
mod event_loop;
mod exit;
mod fork;
pub mod identity;
pub mod layout;
pub mod memory;
mod prepared;
mod run_state;
mod snapshot;
mod threads;
mod vcpu;
mod virtio;
mod vm;

pub use builder::{
    Balloon, DEFAULT_CMDLINE, DEFAULT_KVM_DEVICE, DEFAULT_MEMORY_MIB, Disk, EMULATED_HOST_CMDLINE,
    PLATFORM_CMDLINE, VmBuilder, Vsock,
};
pub use console::{
    ConsoleBuffer, ConsoleCallback, ConsoleInput, ConsoleOutput, DEFAULT_CONSOLE_BUFFER_LIMIT,
};
pub use error::{Error, ErrorKind};
pub use exit::{CpuRegisters, Crash, CrashReason, GuestExit};
pub use fork::Child;
pub use forkvm_devices::chain::{ErrorChain, error_chain};
pub use forkvm_devices::virtio::balloon::{
    BalloonError, BalloonHandle, BalloonStats, stat_tag as balloon_stat_tag,
};
pub use snapshot::{DISK_FILE_PREFIX, MEMORY_FILE, SNAPSHOT_FORMAT, STATE_FILE};
pub use vcpu::{KICK_SIGNAL_OFFSET, kick_signal};
pub use virtio::DeviceInfo;
pub use vm::Vm;
