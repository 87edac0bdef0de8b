//! How a guest ended, as [`crate::Vm::wait`] reports it.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};

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

/// A vCPU's general-purpose registers, instruction pointer, flags, code and stack segment
/// selectors and control registers: what a fault or crash report shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuRegisters {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// General-purpose registers, in the order rax, rbx, rcx, rdx, rsi, rdi, rbp, r8–r15.
    pub gprs: [u64; 15],
    /// Code segment selector (its low two bits are the privilege level).
    pub cs: u16,
    /// Stack segment selector.
    pub ss: u16,
    /// Control registers 0, 2, 3 and 4.
    pub cr0: u64,
    /// Page-fault address.
    pub cr2: u64,
    /// Page-table root.
    pub cr3: u64,
    /// Control register 4.
    pub cr4: u64,
    /// Extended feature enable register (bit 10: long mode active).
    pub efer: u64,
}

/// Names of [`CpuRegisters::gprs`], in order.
const GPR_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

impl CpuRegisters {
    /// The registers as KVM reports them.
    pub(crate) fn from_kvm(r: &kvm_regs, s: &kvm_sregs) -> Self {
        Self {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
                r.r13, r.r14, r.r15,
            ],
            cs: s.cs.selector,
            ss: s.ss.selector,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

impl fmt::Display for CpuRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rip={:#018x} rsp={:#018x} rflags={:#x}",
            self.rip, self.rsp, self.rflags
        )?;
        for (line, names) in self.gprs.chunks(4).zip(GPR_NAMES.chunks(4)) {
            let words: Vec<String> = names
                .iter()
                .zip(line)
                .map(|(name, value)| format!("{name}={value:#x}"))
                .collect();
            writeln!(f, "{}", words.join(" "))?;
        }
        writeln!(
            f,
            "cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            self.cs, self.ss, self.cr0, self.cr2, self.cr3, self.cr4, self.efer
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
