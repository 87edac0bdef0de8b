//! How a guest ended, as [`crate::Vm::wait`] reports it.

use std::fmt;

pub use kvm_bindings::{kvm_regs, kvm_sregs};

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum GuestExit {
    /// The guest powered the machine off. `status` is the value a test guest wrote to the
    /// debug-exit port, if it used one.
    PoweredOff {
        /// Exit status from the debug-exit port.
        status: Option<u32>,
    },
    /// The guest asked for a reset (Linux `reboot`, through the i8042 controller). forkvm ends the
    /// VM rather than rebooting it, so this is how a Linux guest without ACPI shuts down.
    Reset,
    /// A vCPU hit a triple fault, which shuts an x86 machine down.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
        /// Its registers at the fault, if they could be read.
        registers: Option<Box<CpuRegisters>>,
    },
    /// KVM could not run the guest any further.
    Crashed(Box<Crash>),
    /// The host ended the VM with [`crate::Vm::stop`] (or by dropping it).
    Stopped,
}

/// A vCPU that KVM could not run.
#[derive(Clone, Debug, PartialEq)]
pub struct Crash {
    /// The vCPU.
    pub vcpu: u32,
    /// What KVM reported.
    pub reason: CrashReason,
    /// The vCPU's registers, if they could be read.
    pub registers: Option<CpuRegisters>,
}

/// What KVM reported when it stopped a vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashReason {
    /// `KVM_EXIT_INTERNAL_ERROR`, e.g. an instruction KVM's emulator cannot execute
    /// (suberror 1), with KVM's diagnostic words.
    InternalError {
        /// KVM's suberror code.
        suberror: u32,
        /// Diagnostic data.
        data: Vec<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    FailedEntry {
        /// Hardware failure reason.
        reason: u64,
        /// Physical CPU.
        cpu: u32,
    },
    /// The guest reported a crash through a system event.
    GuestCrash,
    /// An exit forkvm does not handle.
    UnexpectedExit(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

/// A vCPU's general-purpose and special registers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuRegisters {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers and EFER.
    pub sregs: kvm_sregs,
}

impl fmt::Display for CpuRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, s) = (&self.regs, &self.sregs);
        writeln!(
            f,
            "rip={:#018x} rsp={:#018x} rflags={:#x}",
            r.rip, r.rsp, r.rflags
        )?;
        writeln!(
            f,
            "rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(f, "rsi={:#x} rdi={:#x} rbp={:#x}", r.rsi, r.rdi, r.rbp)?;
        writeln!(
            f,
            "r8={:#x} r9={:#x} r10={:#x} r11={:#x}",
            r.r8, r.r9, r.r10, r.r11
        )?;
        writeln!(
            f,
            "r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
            r.r12, r.r13, r.r14, r.r15
        )?;
        writeln!(
            f,
            "cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            s.cs.selector, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PoweredOff { status: Some(s) } => write!(f, "guest powered off with status {s}"),
            Self::PoweredOff { status: None } => write!(f, "guest powered off"),
            Self::Reset => write!(f, "guest requested a reset"),
            Self::TripleFault { vcpu, registers } => {
                write!(f, "vCPU {vcpu} triple-faulted")?;
                registers.as_ref().map_or(Ok(()), |r| write!(f, "\n{r}"))
            }
            Self::Crashed(crash) => {
                write!(f, "vCPU {} crashed: {:?}", crash.vcpu, crash.reason)?;
                crash
                    .registers
                    .as_ref()
                    .map_or(Ok(()), |r| write!(f, "\n{r}"))
            }
            Self::Stopped => write!(f, "stopped by the host"),
        }
    }
}
