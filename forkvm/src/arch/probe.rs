//! What the host's KVM can do, probed once per process.
//!
//! Some hosts (nested KVM such as `kvm_pvm`) run guest ring-0 code through KVM's instruction
//! emulator, which lacks some instructions a Linux kernel uses. Rather than guess from the host
//! CPU, forkvm boots a tiny real-mode probe VM:
//! 1. vCPU 0 executes `xrstor` — an instruction every hardware-virtualised host runs and such an
//!    emulator rejects — and forkvm watches how KVM exits;
//! 2. on an emulating host, vCPU 1 gets the filtered CPUID guests will get and reads it back with
//!    `cpuid`, showing which hidden features the host still lets through; those become kernel
//!    command-line switches ([`cpuid::unhidden_gap_switches`]).

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::cpuid::{self, SeenCpuid};
use crate::error::{Error, kvm_err};
use crate::memory::GuestMemoryMmap;

/// Facts about the host that shape the guest's CPUID and command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCaps {
    /// Guest ring-0 instructions are emulated by KVM (and some are missing).
    pub ring0_emulated: bool,
    /// The in-kernel LAPIC implements the TSC-deadline timer.
    pub tsc_deadline_timer: bool,
    /// Linux parameters switching off the emulator gaps CPUID could not hide (may be empty).
    pub linux_switches: String,
}

const PROBE_MEM_SIZE: usize = 0x4000;
/// The exception handler every real-mode vector points at (0000:0000): `out 0x81, al`.
const FAULT_HANDLER: [u8; 2] = [0xe6, 0x81];
const XRSTOR_CODE_ADDR: u64 = 0x1000;
/// `xrstor [bx]; out 0x80, al`.
const XRSTOR_CODE: [u8; 5] = [0x0f, 0xae, 0x2f, 0xe6, 0x80];
const XSAVE_AREA_ADDR: u64 = 0x2000;
const CPUID_CODE_ADDR: u64 = 0x1100;
/// Reports leaf 1 ECX, leaf 7 EBX and leaf 7 EDX on port 0x80 (32-bit `out`s).
const CPUID_CODE: [u8; 40] = [
    0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0x66, 0x31, 0xc9, // xor ecx, ecx
    0x0f, 0xa2, // cpuid
    0x66, 0x89, 0xc8, // mov eax, ecx
    0x66, 0xe7, 0x80, // out 0x80, eax
    0x66, 0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax, 7
    0x66, 0x31, 0xc9, // xor ecx, ecx
    0x0f, 0xa2, // cpuid
    0x66, 0x89, 0xd8, // mov eax, ebx
    0x66, 0xe7, 0x80, // out 0x80, eax
    0x66, 0x89, 0xd0, // mov eax, edx
    0x66, 0xe7, 0x80, // out 0x80, eax
];
const PORT_DONE: u16 = 0x80;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Probes the host once per process; later calls return the cached answer.
pub fn host_caps(kvm: &Kvm) -> Result<HostCaps, Error> {
    static CAPS: OnceLock<HostCaps> = OnceLock::new();
    if let Some(caps) = CAPS.get() {
        return Ok(caps.clone());
    }
    let caps = probe(kvm)?;
    Ok(CAPS.get_or_init(|| caps).clone())
}

fn probe(kvm: &Kvm) -> Result<HostCaps, Error> {
    let probe_err = |e: &dyn std::fmt::Display| Error::Probe(e.to_string());
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut caps = HostCaps {
        ring0_emulated: false,
        tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
        linux_switches: String::new(),
    };

    // Declared before the VM so the mapping outlives it.
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PROBE_MEM_SIZE)])
        .map_err(|e| probe_err(&e))?;
    for (bytes, addr) in [
        (&FAULT_HANDLER[..], 0),
        (&XRSTOR_CODE[..], XRSTOR_CODE_ADDR),
        (&CPUID_CODE[..], CPUID_CODE_ADDR),
    ] {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| probe_err(&e))?;
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let region = memory
        .find_region(GuestAddress(0))
        .ok_or_else(|| probe_err(&"no probe memory"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| probe_err(&e))? as u64,
    };
    // SAFETY: the slot covers exactly the mapping of `memory`, which is dropped after `vm`.
    unsafe { vm.set_user_memory_region(slot) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let Some(mut xrstor_vcpu) = real_mode_vcpu(&vm, 0, &supported, XRSTOR_CODE_ADDR, CR4_OSXSAVE)?
    else {
        // The host has no XSAVE at all: nothing to probe, and the guest will not see it either.
        return Ok(caps);
    };
    let mut regs = xrstor_vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    (regs.rax, regs.rdx, regs.rbx) = (1, 0, XSAVE_AREA_ADDR);
    xrstor_vcpu
        .set_regs(&regs)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    caps.ring0_emulated = match xrstor_vcpu.run().map_err(kvm_err("KVM_RUN"))? {
        VcpuExit::InternalError => true,
        VcpuExit::IoOut(PORT_DONE, _) => false,
        other => {
            log::debug!("cpu probe: xrstor ended with {other:?}; treating the host as native");
            false
        }
    };
    if !caps.ring0_emulated {
        return Ok(caps);
    }

    let guest_cpuid = cpuid::guest_cpuid(&supported, &caps, 0, 1);
    let mut cpuid_vcpu = real_mode_vcpu(&vm, 1, &guest_cpuid, CPUID_CODE_ADDR, 0)?
        .ok_or_else(|| probe_err(&"cannot start the CPUID probe vCPU"))?;
    let mut seen = [0u32; 3];
    for value in &mut seen {
        match cpuid_vcpu.run().map_err(kvm_err("KVM_RUN"))? {
            VcpuExit::IoOut(PORT_DONE, data) if data.len() == 4 => {
                *value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            other => return Err(probe_err(&format!("CPUID probe ended with {other:?}"))),
        }
    }
    let seen = SeenCpuid {
        leaf1_ecx: seen[0],
        leaf7_ebx: seen[1],
        leaf7_edx: seen[2],
    };
    caps.linux_switches = cpuid::unhidden_gap_switches(&seen).join(" ");
    Ok(caps)
}

/// Creates vCPU `id` in real mode at `rip` (segment base 0) with `cpuid` and extra CR4 bits.
/// Returns `None` if KVM refuses those CR4 bits.
fn real_mode_vcpu(
    vm: &VmFd,
    id: u64,
    cpuid: &CpuId,
    rip: u64,
    cr4: u64,
) -> Result<Option<VcpuFd>, Error> {
    let vcpu = vm.create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.cr4 |= cr4;
    if vcpu.set_sregs(&sregs).is_err() {
        return Ok(None);
    }
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    (regs.rip, regs.rflags) = (rip, 2);
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(Some(vcpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn probe_is_cached_and_recognises_an_emulating_host() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let first = host_caps(&kvm).unwrap();
        assert_eq!(host_caps(&kvm).unwrap(), first);
        eprintln!("host caps: {first:?}");
        // kvm_pvm runs guest ring 0 through KVM's emulator; the probe must notice.
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert!(first.ring0_emulated, "{first:?}");
        }
    }
}
