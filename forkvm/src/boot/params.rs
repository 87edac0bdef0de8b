//! The boot parameters a kernel reads at entry: the PVH `hvm_start_info` or the Linux zero page,
//! each with the guest's memory map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::GuestAddress;

use super::{BootError, InitrdPlacement};
use crate::layout::{
    CMDLINE_ADDR, HIMEM_START, IDENTITY_PAGE_ADDR, IDENTITY_PAGE_SIZE, MPTABLE_ADDR, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::GuestRam;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The guest's physical memory map as (address, size, type): low RAM up to the EBDA, the EBDA and
/// BIOS area reserved (the MP table lives there), then RAM from 1 MiB, split around the MMIO
/// hole, where the identity page is reserved.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_ADDR, E820_RAM),
        (MPTABLE_ADDR, HIMEM_START - MPTABLE_ADDR, E820_RESERVED),
    ];
    for range in &ram.ranges {
        let start = range.guest_addr.max(HIMEM_START);
        let end = range.guest_addr + range.size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map.push((IDENTITY_PAGE_ADDR, IDENTITY_PAGE_SIZE, E820_RESERVED));
    map.sort_unstable();
    map
}

fn write_err(what: &'static str) -> impl Fn(linux_loader::configurator::Error) -> BootError {
    move |e| BootError::Write {
        what,
        reason: e.to_string(),
    }
}

/// Writes `hvm_start_info`, the module list (the initrd) and the memory map for the PVH entry.
pub fn write_pvh(ram: &GuestRam, initrd: Option<InitrdPlacement>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    debug_assert!(memmap.len() <= PVH_MEMMAP_MAX_ENTRIES);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, &ram.memory).map_err(write_err("PVH start info"))
}

/// Writes the Linux zero page: the kernel's setup header (or a minimal one for an ELF image),
/// the command line and initrd location, and the e820 map.
pub fn write_zero_page(
    ram: &GuestRam,
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut zero_page = boot_params {
        hdr: header.unwrap_or_default(),
        ..Default::default()
    };
    let hdr = &mut zero_page.hdr;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(ram);
    for (slot, (addr, size, type_)) in zero_page.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    zero_page.e820_entries = map.len() as u8;
    let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&params, &ram.memory).map_err(write_err("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

    #[test]
    fn e820_reserves_the_ebda_and_skips_the_mmio_hole() {
        let ram = GuestRam::new(MMIO_HOLE_START + (64 << 20)).unwrap();
        assert_eq!(
            e820_map(&ram),
            vec![
                (0, MPTABLE_ADDR, E820_RAM),
                (MPTABLE_ADDR, HIMEM_START - MPTABLE_ADDR, E820_RESERVED),
                (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM),
                (IDENTITY_PAGE_ADDR, 4096, E820_RESERVED),
                (MMIO_HOLE_END, 64 << 20, E820_RAM),
            ]
        );
    }
}
