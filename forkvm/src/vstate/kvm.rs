//! KVM itself: opening the device, the VM with its memory slots and interrupt controllers (no
//! PIT), and vCPUs with their CPUID.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::vcpu::Vcpu;
use crate::arch::cpuid;
use crate::arch::probe::HostCaps;
use crate::error::{Error, kvm_err, setup_err};
use crate::identity::IdentityPage;
use crate::layout::{IDENTITY_PAGE_ADDR, IDENTITY_PAGE_SIZE, KVM_TSS_ADDR};
use crate::memory::RamSlots;

/// KVM's supported CPUID, asked once per process: it does not change while KVM is loaded, and
/// asking costs ~1 ms on hosts that emulate the host `cpuid`s it makes (every fork of an
/// unprepared child and every [`crate::Vm::prepare_forks`] child asked again).
fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, Error> {
    static SUPPORTED: OnceLock<kvm_bindings::CpuId> = OnceLock::new();
    if let Some(supported) = SUPPORTED.get() {
        return Ok(supported.clone());
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(SUPPORTED.get_or_init(|| supported).clone())
}

/// Creates `count` vCPUs with their CPUID, then lets `init` give each its state (boot state,
/// or the state of the vCPU it continues).
pub(crate) fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    caps: &HostCaps,
    count: u8,
    mut init: impl FnMut(u8, &VcpuFd) -> Result<(), Error>,
) -> Result<Vec<Vcpu>, Error> {
    let span = crate::phases::span("vcpus.supported_cpuid");
    let supported = supported_cpuid(kvm)?;
    drop(span);
    (0..count)
        .map(|id| {
            let span = crate::phases::span("vcpus.create");
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            drop(span);
            let _span = crate::phases::span("vcpus.set_cpuid");
            fd.set_cpuid2(&cpuid::guest_cpuid(&supported, caps, id, count))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            init(id, &fd)?;
            Ok(Vcpu {
                fd,
                id: u32::from(id),
            })
        })
        .collect()
}

/// Opens KVM through the device node at `path`, telling a missing node from a forbidden one.
pub(crate) fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::KvmMissing(path.to_owned()))?;
    Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENOTDIR => Error::KvmMissing(path.to_owned()),
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.to_owned()),
        _ => Error::KvmOpen {
            path: path.to_owned(),
            source: e,
        },
    })
}

/// Creates the KVM VM with its memory slots (RAM — guest RAM, or placeholder RAM that will adopt
/// an image at the same addresses — and the identity page read-only where KVM can) and in-kernel
/// interrupt controllers.
///
/// No PIT: forkvm's guests time with the local APIC (TSC deadline; Linux with a TSC-deadline
/// APIC timer does not use the PIT), and KVM gives each PIT a kernel thread (`kvm-pit/<pid>`,
/// its task and 16 KiB stack) and timer state. Port accesses to 0x40-0x43 and 0x61 reach the
/// VMM's port bus instead, which ignores them. A snapshot of a VM that had one gets one back
/// (`arch::state`).
///
/// The memory slots go in before the irqchip: on some hosts (seen on kvm_pvm) adding the first
/// slot to a VM that already has an irqchip waits ~7 ms for KVM to synchronise, against ~0.1 ms
/// before it.
pub(crate) fn create_vm(
    kvm: &Kvm,
    ram: &impl RamSlots,
    identity: &IdentityPage,
) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mut slots: Vec<_> = ram
        .slots()
        .map_err(|e| setup_err("memory slot", e))?
        .into_iter()
        .map(|slot| (slot.guest_addr, slot.size, slot.host_addr, 0))
        .collect();
    let read_only = if kvm.check_extension(Cap::ReadonlyMem) {
        KVM_MEM_READONLY
    } else {
        0
    };
    slots.push((
        IDENTITY_PAGE_ADDR,
        IDENTITY_PAGE_SIZE,
        identity.host_addr(),
        read_only,
    ));
    for (slot, (guest_phys_addr, memory_size, userspace_addr, flags)) in
        slots.into_iter().enumerate()
    {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
        };
        // SAFETY: each slot covers exactly one mapping of `ram` or the identity page, which the
        // returned VM's owner keeps alongside the VM fd and drops only after it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    Ok(vm)
}
