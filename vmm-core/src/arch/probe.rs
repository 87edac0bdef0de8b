//! What the host's KVM can do, probed once per process.
//!
//! Some hosts (nested KVM such as `kvm_pvm`) run guest ring-0 code through KVM's instruction
//! emulator, which lacks some instructions a Linux kernel uses. Rather than guess from the host
//! CPU, forkvm boots a tiny real-mode probe VM that executes `xrstor` — an instruction every
//! hardware-virtualised host runs and such an emulator rejects — and watches how KVM exits.
//! The answer selects the CPUID adjustments in [`super::cpuid`].

use std::sync::OnceLock;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, kvm_err};
use crate::memory::GuestMemoryMmap;

/// Facts about the host that shape the guest's CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCaps {
    /// Guest ring-0 instructions are emulated by KVM (and some are missing).
    pub ring0_emulated: bool,
    /// The in-kernel LAPIC implements the TSC-deadline timer.
    pub tsc_deadline_timer: bool,
}

const PROBE_MEM_SIZE: usize = 0x4000;
/// The exception handler every real-mode vector points at (0000:0000): `out 0x81, al`.
const FAULT_HANDLER: [u8; 2] = [0xe6, 0x81];
const CODE_ADDR: u64 = 0x1000;
/// `xrstor [bx]; out 0x80, al`.
const PROBE_CODE: [u8; 5] = [0x0f, 0xae, 0x2f, 0xe6, 0x80];
const XSAVE_AREA_ADDR: u64 = 0x2000;
const PORT_DONE: u16 = 0x80;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Probes the host once per process; later calls return the cached answer.
pub fn host_caps(kvm: &Kvm) -> Result<HostCaps, Error> {
    static CAPS: OnceLock<HostCaps> = OnceLock::new();
    if let Some(caps) = CAPS.get() {
        return Ok(*caps);
    }
    let caps = HostCaps {
        ring0_emulated: xrstor_is_emulated(kvm)?,
        tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    Ok(*CAPS.get_or_init(|| caps))
}

/// Runs `xrstor` in guest ring 0 and reports whether KVM failed to emulate it.
fn xrstor_is_emulated(kvm: &Kvm) -> Result<bool, Error> {
    // Declared before the VM so the mapping outlives it.
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PROBE_MEM_SIZE)])
        .map_err(|e| Error::Probe(format!("cannot allocate probe memory: {e}")))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let write = |bytes: &[u8], addr| {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Probe(e.to_string()))
    };
    write(&FAULT_HANDLER, 0)?;
    write(&PROBE_CODE, CODE_ADDR)?;
    let region = memory
        .find_region(GuestAddress(0))
        .ok_or(Error::Probe("no probe memory".into()))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Probe(e.to_string()))? as u64,
    };
    // SAFETY: the slot covers exactly the mapping of `memory`, which is dropped after `vm`.
    unsafe { vm.set_user_memory_region(slot) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.cr4 |= CR4_OSXSAVE;
    if vcpu.set_sregs(&sregs).is_err() {
        // The host has no XSAVE at all: nothing to probe, and the guest will not see it either.
        return Ok(false);
    }
    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    (regs.rip, regs.rflags, regs.rax, regs.rdx, regs.rbx) = (CODE_ADDR, 2, 1, 0, XSAVE_AREA_ADDR);
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let emulated = match vcpu.run() {
        Ok(VcpuExit::InternalError) => true,
        Ok(VcpuExit::IoOut(PORT_DONE, _)) => false,
        Ok(other) => {
            log::debug!("cpu probe: xrstor ended with {other:?}; treating the host as native");
            false
        }
        Err(e) => return Err(kvm_err("KVM_RUN")(e)),
    };
    Ok(emulated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
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
