//! x86_64 vCPU state at boot: the CPUID a guest sees, what the host can execute, and the
//! registers, MSRs and local APIC set before the first instruction.

pub mod cpuid;
pub mod probe;
pub mod regs;
pub mod state;
