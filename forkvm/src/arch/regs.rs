//! Boot-time vCPU state: segments and control registers for the chosen entry protocol, identity
//! page tables for the 64-bit entry, MSRs, FPU and the local APIC's LINT pins.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{BootEntry, BootProtocol};
use crate::error::{Error, kvm_err};
use crate::layout::{
    BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PD_ADDR, PDPT_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT descriptor flags (access byte and granularity nibble).
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Builds a GDT descriptor.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The KVM segment a descriptor at GDT index `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT, and points the segment registers at them.
fn setup_segments(memory: &GuestMemoryMmap, sregs: &mut kvm_sregs, code: u16) -> Result<(), Error> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ];
    for (i, entry) in gdt.iter().enumerate() {
        write(memory, *entry, BOOT_GDT_ADDR + 8 * i as u64, "boot GDT")?;
    }
    write(memory, 0u64, BOOT_IDT_ADDR, "boot IDT")?;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(gdt[3], 3);
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages for the 64-bit entry.
fn setup_page_tables(memory: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(memory, PDPT_ADDR | PRESENT_RW, PML4_ADDR, "page tables")?;
    write(memory, PD_ADDR | PRESENT_RW, PDPT_ADDR, "page tables")?;
    for i in 0..512u64 {
        write(
            memory,
            (i << 21) | HUGE | PRESENT_RW,
            PD_ADDR + i * 8,
            "page tables",
        )?;
    }
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PG;
    Ok(())
}

fn write(memory: &GuestMemoryMmap, value: u64, addr: u64, what: &'static str) -> Result<(), Error> {
    memory.write_obj(value, GuestAddress(addr)).map_err(|e| {
        Error::Boot(crate::boot::BootError::Write {
            what,
            reason: e.to_string(),
        })
    })
}

/// Sets registers and segments so the boot vCPU starts at `entry`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    memory: &GuestMemoryMmap,
    entry: BootEntry,
) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Pvh => {
            // 32-bit protected mode, paging off, flat segments; rbx → hvm_start_info.
            setup_segments(memory, &mut sregs, CODE32)?;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_ADDR;
        }
        BootProtocol::Linux64 => {
            // Long mode on identity page tables; rsi → boot_params.
            setup_segments(memory, &mut sregs, CODE64)?;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            setup_page_tables(memory, &mut sregs)?;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// Sets the state every vCPU starts with: MSRs, FPU control words and the LAPIC's LINT pins
/// (LINT0 = ExtINT from the PIC, LINT1 = NMI), as firmware would leave them.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), Error> {
    let boot_msrs = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = boot_msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Setup {
        what: "boot MSRs",
        reason: format!("{e:?}"),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(Error::Setup {
            what: "boot MSRs",
            reason: format!("KVM refused MSR {:#x}", entries[written].index),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes = &mut lapic.regs[reg..reg + 4];
        let value = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        let value = (value & !0x700) | (mode << 8);
        for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_the_segments_linux_expects() {
        let code = segment(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!(
            (
                code.selector,
                code.type_,
                code.l,
                code.db,
                code.present,
                code.s
            ),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let code32 = segment(gdt_entry(CODE32, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment(gdt_entry(DATA, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.db), (16, 3, 1));
        let tss = segment(gdt_entry(TSS, 0, 0xfffff), 3);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn descriptor_splits_base_and_limit() {
        let entry = gdt_entry(DATA, 0x1234_5678, 0xabcde);
        let seg = segment(entry, 2);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
    }
}
